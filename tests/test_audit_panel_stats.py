"""The audit panel's statistics (benchmarks/audit_panel_stats.py) on synthetic audits with known answers: families,
the gate's thresholds set on calibration benign variants only, and correlations that hold a family out together."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import audit_panel_stats as stats  # noqa: E402

from safekeel.audit.predict import fit_predictor  # noqa: E402


def test_families_group_draws_mixes_and_pure_bad():
    assert [stats.family(n) for n in ("gsm8k_0", "gsm8k_1", "fpr_gsm8k_4", "samsum_mix10", "samsum_1", "alpaca_safety_mix3",
                                      "alpaca_safety_0", "pure_bad_10", "pure_bad_100", "identity_shift_aoa", "alpaca_bottom100",
                                      "nearest_harmful")] == \
        ["gsm8k", "gsm8k", "gsm8k", "samsum", "samsum", "alpaca_safety", "alpaca_safety", "pure_bad", "pure_bad",
         "identity_shift_aoa", "alpaca_bottom100", "nearest_harmful"]


def _audit(name, kind, score, per_example, trained=False, attack_kind=None):
    return {"name": name, "kind": kind, "trained": trained, "attack_kind": attack_kind, "n_examples": len(per_example),
            "features": {"harmful_request_fraction": score, "harmful_answer_fraction": 0.0, "persona_override_fraction": 0.0},
            "per_example": {"harmful_similarity": per_example, "gated": [0] * len(per_example)},
            "harmful_indices": list(range(len(per_example))) if kind == "attack" else []}


def test_the_gate_sets_thresholds_on_calibration_benign_variants_only():
    """Held-out benign draws (3-4) are far above the calibration ones: they set no threshold (dataset level or per
    example), so they show up as false positives on the held-out side only."""
    calibration = [_audit(f"fpr_src_{d}", "benign", 0.01 * d, [0.1 * d] * 10) for d in range(3)]
    held_out = [_audit(f"fpr_src_{d}", "benign", 0.9, [0.95] * 10) for d in (3, 4)]
    attacks = [_audit("attack_a", "attack", 0.5, [0.5] * 10, attack_kind="harmful"),
               _audit("attack_b", "attack", 0.01, [0.1] * 10, attack_kind="harmful_mix")]
    gate = stats.gate_detection(calibration + held_out + attacks)
    row = gate["dataset_level"]["harmful_request_fraction"]
    assert row["threshold"] == pytest.approx(0.02) and row["false_positive_rate"] == 0.0
    assert row["false_positive_rate_held_out"] == 1.0 and row["by_kind"] == {"harmful": 1.0, "harmful_mix": 0.0}
    example = gate["per_example"]["harmful_similarity"]
    assert example["threshold"] == pytest.approx(0.2) and example["n_benign_examples"] == 30
    assert example["false_positive_rate_held_out"] == 1.0 and example["detection_pooled"] == 0.5


def test_correlations_hold_families_out_and_report_size_and_the_selected_score():
    """Four families of near-copies: within a family the score tracks the increase perfectly, across families it
    does not. Leave-one-dataset-out would be flattered by the copies; leave-one-family-out is not."""
    rng = np.random.default_rng(0)
    audits, increases = [], {}
    for f, (base_x, base_y) in enumerate([(0.1, 0.4), (0.4, 0.1), (0.7, 0.3), (1.0, 0.2)]):
        for copy in range(3):
            name = f"src{f}_{copy}"
            x = base_x + 0.01 * copy
            audits.append({"name": name, "n_examples": 100 - copy, "features": {"lda_mean_projection": x, "noise": float(rng.random())}})
            increases[name] = {"increase": base_y + 0.01 * copy}
    out = stats.correlations(audits, increases, n_boot=200)
    row = next(r for r in out["scores"] if r["score"] == "lda_mean_projection")
    assert row["n"] == 12 and row["n_families"] == 4 and row["held_out_unit"] == "family"
    plain = fit_predictor([{"name": a["name"], "features": {"lda_mean_projection": a["features"]["lda_mean_projection"]},
                            "increase": increases[a["name"]]["increase"]} for a in audits], features=("lda_mean_projection",))
    assert row["leave_one_out_rho"] < plain.quality["leave_one_out_rho"]  # the copies flatter the per-dataset figure
    assert row["ci_low"] is not None and row["ci_low"] <= row["spearman_rho"] <= row["ci_high"]
    assert any(r["score"] == stats.SIZE_SCORE for r in out["scores"])  # the dataset's size, as a score of its own
    assert out["selected"]["n_families"] == 4 and out["selected"]["held_out_unit"] == "family"
    assert out["families"]["src2_1"] == "src2"


def test_the_combined_per_example_score_fires_when_any_score_is_unusual_for_benign_data():
    """Benign examples spread over [0, 1) in two scores; one attack is extreme in the first score only, the other in
    the second only: each single score catches half, their max-percentile combination catches both, and its
    calibration false-positive rate stays at most the target."""
    rng = np.random.default_rng(0)

    def audit(name, kind, sim, answer, attack_kind=None):
        a = _audit(name, kind, 0.0, list(sim), attack_kind=attack_kind)
        a["per_example"]["answer_score"] = list(answer)
        return a

    benign = [audit(f"fpr_src_{d}", "benign", rng.random(400), rng.random(400)) for d in range(3)]
    attacks = [audit("attack_a", "attack", [5.0] * 10, [0.5] * 10, attack_kind="harmful"),
               audit("attack_b", "attack", [0.5] * 10, [5.0] * 10, attack_kind="harmful_mix")]
    gate = stats.gate_detection(benign + attacks)
    assert gate["per_example"]["harmful_similarity"]["by_kind"] == {"harmful": 1.0, "harmful_mix": 0.0}
    assert gate["per_example"]["answer_score"]["by_kind"] == {"harmful": 0.0, "harmful_mix": 1.0}
    combined = gate["per_example"][stats.COMBINED]
    assert combined["by_kind"] == {"harmful": 1.0, "harmful_mix": 1.0} and combined["false_positive_rate"] <= 0.01
    assert "lda_projection" not in gate["per_example"]  # a score some audit lacks is left out, not combined


def test_the_goals_are_read_off_the_report_met_missed_or_pending():
    gate = {"detection_rate_at_1pct_fpr": {"by_kind": {"harmful": 1.0, "harmful_mix": 0.33}, "false_positive_rate_held_out": 0.08}}
    rows = [{"score": "a", "leave_one_out_rho": 0.9}, {"score": "b", "leave_one_out_rho": 0.5}]
    out = {"gate": gate, "correlations": {"content": rows}, "pending": None,
           "prediction": {"content": {"selected": {"leave_one_out_rho": 0.62, "n": 20}}}, "policy": {"pending": "runs missing"}}
    found = stats.goals(out)
    # the honest figure decides (0.62 < 0.7), though the best single score picked afterwards reaches 0.9
    assert found["prediction"]["content"]["status"] == "missed"
    assert found["prediction"]["content"]["best_single_score"] == {"score": "a", "leave_one_out_rho": 0.9}
    assert found["gate"] == {"by_kind": {"harmful": 1.0, "harmful_mix": 0.33}, "false_positive_rate_held_out": 0.08,
                             "status": "missed", "kinds_missed": ["harmful_mix"]}
    assert found["policy"] == {"status": "pending"}
    out["prediction"]["content"]["selected"]["leave_one_out_rho"] = 0.75
    out["policy"] = {"verdict": {"cases": ["matches the default's safety at less compute"], "text": "matches"}}
    found = stats.goals(out)
    assert found["prediction"]["content"]["status"] == "met" and found["policy"]["status"] == "met"
    out["pending"] = "measured on all 3 seeds: 12 of 20"  # an incomplete panel decides nothing yet
    assert stats.goals(out)["prediction"]["content"]["status"] == "pending"
    out["policy"] = {"verdict": {"cases": ["neither"], "text": "neither: ..."}}
    assert stats.goals(out)["policy"]["status"] == "missed"
    assert "**missed**" in "\n".join(stats.render_goals(stats.goals(out)))
