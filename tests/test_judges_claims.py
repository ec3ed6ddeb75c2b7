"""The sampled grids' summary (benchmarks/judges_claims.grid_summary): grouping by condition, and the difference from
replay:random on the same dataset and seed, from the grid's own run or else the selectors grid's."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from judges_claims import grid_summary, render_grid_summary  # noqa: E402


def _run(grid, dataset, mode, selector, harmful, census=None, pool="authored", k=10):
    rates = {"harmful": harmful, "refused": 1 - harmful, "incoherent": 0.0, "hollow": 0.1,
             "overrefusal_xstest": 0.3, "overrefusal_orbench": 0.5, "n_harmful": 156}
    return {"grid": grid, "run_id": f"{dataset}-{mode}-{selector}",
            "condition": {"dataset": dataset, "mode": mode, "selector": selector, "k": k if mode != "none" else 0,
                          "pool": pool if mode != "none" else None, "seed": 0},
            "rates": {"classifier": rates, "content": dict(rates)},
            "census": None if census is None else {"harmful_content": census, "refusal": 0.8, "hollow": 0.1}}


def test_conditions_are_grouped_and_compared_with_random_on_the_same_datasets():
    runs = [_run("selectors", "a", "replay", "random", 0.20, 0.010), _run("selectors", "b", "replay", "random", 0.30, 0.020),
            _run("selectors", "a", "replay", "dpp", 0.10, 0.000), _run("selectors", "b", "replay", "dpp", 0.40),
            _run("selectors", "c", "replay", "dpp", 0.50, 0.030),  # no random run on c: left out of the difference
            _run("modes", "a", "icl", "random", 0.05, 0.002),  # the modes grid has no random: the selectors grid's
            _run("modes", "a", "replay", "random", 0.25, pool="safety_tuned_llamas"),
            _run("confirm", "a", "replay", "forgetting", 0.0, 0.0)]  # the confirm grid has its own test
    summary = {(e["grid"], e["condition"]): e for e in grid_summary(runs)}
    assert set(summary) == {("selectors", "replay:random"), ("selectors", "replay:dpp"), ("modes", "icl:random"),
                            ("modes", "replay:random (safety_tuned_llamas)")}
    dpp = summary[("selectors", "replay:dpp")]
    assert dpp["runs"] == 3 and dpp["census_runs"] == 2 and dpp["datasets"] == ["a", "b", "c"]
    assert abs(dpp["mean"]["classifier_harmful"] - 1.0 / 3) < 1e-9
    assert dpp["minus_random"]["classifier_harmful"]["n"] == 2
    assert abs(dpp["minus_random"]["classifier_harmful"]["mean"]) < 1e-9  # a: -0.10, b: +0.10
    assert dpp["minus_random"]["census_harmful_content"]["n"] == 1  # b's census is not complete
    assert abs(dpp["minus_random"]["census_harmful_content"]["mean"] + 0.010) < 1e-9
    icl = summary[("modes", "icl:random")]
    assert abs(icl["minus_random"]["classifier_harmful"]["mean"] + 0.15) < 1e-9
    assert "minus_random" not in summary[("selectors", "replay:random")]
    table = "\n".join(render_grid_summary(grid_summary(runs)))
    assert "| selectors | replay:dpp | 3 (2) | 0.333 (+0.000, 2) | 0.015 (-0.010, 1) |" in table
    assert render_grid_summary([]) == []
