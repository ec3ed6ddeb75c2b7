"""The audit's adaptive policy against the fixed default (issue 30, benchmarks/audit_policy_plan.md) on synthetic
inputs: the predictor's metric and its name, the leave-one-dataset-out choices, the policy grid, the pairing of the
runs and the verdict in the plan's words. No model is trained."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import audit_panel as panel  # noqa: E402
import audit_policy as policy  # noqa: E402
from safekeel.audit.act import choose_policy  # noqa: E402
from safekeel.audit.predict import HarmPredictor, describe_prediction, fit_predictor  # noqa: E402
from safekeel.bench.grids import AOA_EVAL, AOA_SYSTEM_PROMPT, expand, run_id  # noqa: E402
from safekeel.bench.presets import load_grid  # noqa: E402

COMPLIED = "increase in compliance with harmful requests (1 - refusal rate, content judge)"


def _rows(xs: dict[str, float], slope: float = 0.8, noise: float = 0.004, seed: int = 0) -> list[dict]:
    """Datasets whose increase follows the LDA share (slope x), the other score is noise."""
    rng = np.random.default_rng(seed)
    return [{"name": name, "features": {"lda_harmful_side_share": x, "mean_harmful_similarity": float(rng.uniform(0.1, 0.4))},
             "increase": slope * x + float(rng.normal(0, noise)), "n_seeds": 3} for name, x in xs.items()]


# ------------------------------------------------------------------ the predictor's metric, by name

def test_the_predictor_records_its_metric_and_names_it_and_an_old_file_reads_as_harmful(tmp_path):
    rows = _rows({f"d{i}": x for i, x in enumerate(np.linspace(0, 1, 8))})
    predictor = fit_predictor(rows, judge="content", metric="complied")
    p = predictor.predict_features({"lda_harmful_side_share": 0.5})
    assert (p["metric"], p["target"]) == ("complied", COMPLIED)
    assert describe_prediction(p).startswith(f"predicted no-replay {COMPLIED}: {p['predicted_increase']:+.3f} (90% interval")
    assert COMPLIED in choose_policy("adaptive", p, 10, "replay").reason
    path = tmp_path / "new.json"
    predictor.save(path)
    assert HarmPredictor.load(path).metric == "complied"
    old = json.loads(path.read_text())
    del old["metric"]  # a file written before the metric was recorded
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = HarmPredictor.load(tmp_path / "old.json")
    assert loaded.metric == "harmful"
    q = loaded.predict_features({"lda_harmful_side_share": 0.5})
    assert q["target"] == "harmful-rate increase (harmful verdicts, content judge)" and q["predicted_increase"] == p["predicted_increase"]
    assert "predicted no-replay harmful-rate increase (harmful verdicts, content judge)" in choose_policy("adaptive", q, 10, "replay").reason
    with pytest.raises(ValueError, match="unknown predictor metric 'refused'"):
        fit_predictor(rows, judge="content", metric="refused")


def test_safekeel_audit_and_the_jobs_audit_event_print_the_prediction_by_its_metric(tmp_path):
    from typer.testing import CliRunner

    from safekeel.cli import app
    from safekeel.service.jobs import _event_for

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                                     {"role": "assistant", "content": str(2 * i)}]}) + "\n" for i in range(6)))
    rows = [{"name": f"d{i}", "features": {"gated_fraction": g}, "increase": 0.1 + 2 * g, "n_seeds": 3}
            for i, g in enumerate((0.0, 0.02, 0.05, 0.1, 0.2))]
    printed = {}
    for metric in ("complied", "harmful"):
        path = tmp_path / f"{metric}.json"
        fit_predictor(rows, features=("gated_fraction",), judge="content", metric=metric).save(path)
        result = CliRunner().invoke(app, ["audit", str(data), "--predictor", str(path), "--no-answers", "--permutations", "20"])
        assert result.exit_code == 0, result.output
        printed[metric] = result.output
    assert f"predicted no-replay {COMPLIED}: +0.100" in printed["complied"]
    assert "harmful-rate increase (harmful verdicts, content judge): +0.100" in printed["harmful"] and COMPLIED not in printed["harmful"]
    prediction = fit_predictor(rows, features=("gated_fraction",), judge="content", metric="complied").predict_features({"gated_fraction": 0.0})
    _, message, _, _ = _event_for("audit", {"summary": "0 of 6 examples flagged", "prediction": {"available": True, **prediction}})
    assert message.startswith("0 of 6 examples flagged; ") and f"predicted no-replay {COMPLIED}: +0.100" in message
    _, plain, _, _ = _event_for("audit", {"summary": "0 of 6 examples flagged", "prediction": {"available": False, "reason": "none"}})
    assert plain == "0 of 6 examples flagged"


def test_measured_increase_is_the_drop_in_refusal_or_the_harmful_rate(tmp_path, monkeypatch):
    from scipy import stats

    monkeypatch.setattr(panel, "RESULTS", tmp_path)
    monkeypatch.setattr(panel, "CACHE", tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps({"variants": [
        {"name": n, "trained": True, "kind": "benign", "sha256": "ab" * 32} for n in ("a", "b")]}))
    _panel_records(tmp_path, {"a": (0.6, 0.5, 0.7), "b": (0.6,)}, aligned_refused=0.9)
    complied, harmful = panel.measured("content", "complied")["a"], panel.measured("content", "harmful")["a"]
    assert complied["increase"] == pytest.approx(0.3) and complied["seeds"] == [0, 1, 2]  # (1 - 0.6) - (1 - 0.9), mean
    # the interval is over seeds (t, 2 df) plus the aligned rate's binomial variance
    half = stats.t.ppf(0.975, 2) * (0.01 / 3 + 0.9 * 0.1 / 156) ** 0.5
    assert complied["ci_high"] - complied["increase"] == pytest.approx(half, abs=1e-3) and complied["interval"].startswith("t over 3 seeds")
    one = panel.measured("content", "complied")["b"]
    assert one["seeds"] == [0] and not one["complete"] and one["interval"].startswith("Wald") and complied["complete"]
    assert set(panel.complete(panel.measured("content", "complied"))) == {"a"}
    assert harmful["increase"] == pytest.approx(0.04)  # harmful verdicts: 0.05 in every fine-tune, 0.01 aligned
    with pytest.raises(ValueError, match="unknown metric"):
        panel.measured("content", "refused")
    # a record of other data than the variant's file, or a second record of one seed, stops with both named
    record = json.loads((tmp_path / "bench_runs" / "audit_panel" / "r1.json").read_text())
    (tmp_path / "bench_runs" / "audit_panel" / "r9.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="two records of a seed 0"):
        panel.measured("content", "complied")
    (tmp_path / "bench_runs" / "audit_panel" / "r9.json").write_text(json.dumps({**record, "data_sha256": "cd" * 32}))
    with pytest.raises(SystemExit, match="trained on data cdcdcdcdcdcd, but variant a's file is abababababab"):
        panel.measured("content", "complied")


# ------------------------------------------------------------------ leave one dataset out, the choice, the grid

XS = {"gsm8k_0": 0.0, "samsum_0": 0.02, "sql_0": 0.25, "seed_tasks_0": 0.2, "alpaca_safety_0": 0.05, "samsum_mix10": 0.3,
      "alpaca_safety_mix10": 0.5, "identity_shift_aoa": 0.9, "pure_bad_10": 0.95, "nearest_harmful": 0.6,
      "gsm8k_1": 0.01, "samsum_1": 0.03, "sql_1": 0.15, "pure_bad_100": 1.0}


def test_a_variants_prediction_never_uses_its_own_increase():
    rows = _rows(XS)
    features = {row["name"]: row["features"] for row in rows}
    before = policy.loo_choices(rows, features)
    assert set(before) == set(policy.POLICY_VARIANTS)
    for name, sibling in (("pure_bad_10", "pure_bad_100"), ("gsm8k_0", "gsm8k_1")):
        # its family is left out with it: pure_bad_10 is a subset of pure_bad_100, gsm8k_1 another draw of its source
        assert {name, sibling}.isdisjoint(before[name]["fitted_on"]) and len(before[name]["fitted_on"]) == len(rows) - 2
        changed = [dict(row, increase=-0.9 if row["name"] in (name, sibling) else row["increase"]) for row in rows]
        after = policy.loo_choices(changed, features)
        assert after[name]["prediction"] == before[name]["prediction"]  # neither its own nor its sibling's increase is seen
        other = next(v for v in policy.POLICY_VARIANTS if v != name)
        assert after[other]["prediction"] != before[other]["prediction"]  # but it is in every other variant's fit


def test_the_adaptive_choice_per_risk_class():
    choices = policy.loo_choices(_rows(XS), {name: {"lda_harmful_side_share": x} for name, x in XS.items()})
    low, medium, high = choices["gsm8k_0"], choices["sql_0"], choices["pure_bad_10"]
    assert low["prediction"]["ci_high"] < 0.05 and (low["choice"]["risk"], low["choice"]["k"]) == ("low", 5)
    assert not low["choice"]["guard_system_prompt"] and low["adaptive_run"]
    assert (medium["choice"]["risk"], medium["choice"]["k"], medium["adaptive_run"]) == ("medium", 10, False)
    assert high["prediction"]["predicted_increase"] >= 0.3
    assert (high["choice"]["risk"], high["choice"]["k"], high["choice"]["guard_system_prompt"], high["adaptive_run"]) == ("high", 20, True, True)
    assert high["prediction"]["target"] == COMPLIED


def test_the_policy_grid_holds_the_fixed_runs_and_the_adaptive_ones_that_differ(tmp_path):
    from safekeel.eval.harness import EvalSettings, guarded
    from safekeel.guard import DEFAULT_SAFETY_SYSTEM_PROMPT, build_guard

    choices = policy.loo_choices(_rows(XS), {name: {"lda_harmful_side_share": x} for name, x in XS.items()})
    risks = {name: made["choice"]["risk"] for name, made in choices.items()}
    assert {"low", "medium", "high"} <= set(risks.values())
    entries = {name: {"name": name, "path": f"{name}.jsonl", "sft": {"epochs": 1.0},
                      **({"eval": dict(AOA_EVAL)} if name == "identity_shift_aoa" else {})} for name in choices}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(policy.policy_grid(entries, choices, dict(panel.POLICY_EVAL)), sort_keys=False))
    configs = expand(load_grid(path))
    finetunes = [c for c in configs if c["kind"] == "finetune"]
    n_adaptive = sum(risk != "medium" for risk in risks.values())
    assert len(finetunes) == 2 * (10 + n_adaptive) and len(configs) == len(finetunes) + 2  # + aligned, plain and AOA-served
    runs = {}
    for c in finetunes:
        assert (c["mode"], c["selector"], c["pool"], c["seed"] in (10, 11)) == ("replay", "random", "authored", True)
        runs.setdefault(c["dataset"]["name"], []).append((c["seed"], c["k"], c.get("guard")))
    for name, risk in risks.items():
        fixed = [(seed, 10, None) for seed in (10, 11)]
        adaptive = {"low": [(seed, 5, None) for seed in (10, 11)], "medium": [],
                    "high": [(seed, 20, {"system_prompt": True}) for seed in (10, 11)]}[risk]
        assert sorted(runs[name], key=str) == sorted(fixed + adaptive, key=str), name
    assert "guard_sysprompt" in run_id(next(c for c in finetunes if c.get("guard")))
    assert len({run_id(c) for c in configs}) == len(configs)
    # the high-risk identity shift is served the guard's safety system prompt before its own AOA prompt, as a job is
    aoa = next(c for c in finetunes if c["dataset"]["name"] == "identity_shift_aoa" and c.get("guard"))
    assert risks["identity_shift_aoa"] == "high" and aoa["eval"]["extra_overrefusal_sets"] == ["orbench-hard-test@200"]
    served = guarded(EvalSettings(**aoa["eval"]), build_guard(aoa["mode"], system_prompt=aoa["guard"]["system_prompt"]))
    assert served.system_prompt == DEFAULT_SAFETY_SYSTEM_PROMPT + "\n\n" + AOA_SYSTEM_PROMPT
    with pytest.raises(ValueError, match="arms"):
        load_grid_from(tmp_path, {"name": "x", "datasets": [{"name": "a", "path": "a", "arms": [{"k": 0}]}]})


def load_grid_from(folder: Path, spec: dict):
    path = folder / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_grid(path)


# ------------------------------------------------------------------ the panel's records, the command, the report

def _harmful(refused: float, harmful: float) -> dict:
    rate = lambda r: {"count": round(156 * r), "n": 156, "unjudged": 0, "rate": r, "ci95": [0, 1]}  # noqa: E731
    return {judge: {"harmful": rate(harmful), "refused": rate(refused)} for judge in ("content", "classifier")}


def _panel_records(results: Path, refused: dict[str, tuple], aligned_refused: float) -> None:
    folder = results / "bench_runs" / "audit_panel"
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"config": {"kind": "aligned"}, "report": {"harmful": _harmful(aligned_refused, 0.01)}}]
    for name, rates in refused.items():
        records += [{"config": {"kind": "finetune", "dataset": {"name": name}, "seed": seed}, "report": {"harmful": _harmful(r, 0.05)}}
                    for seed, r in enumerate(rates)]
    for i, record in enumerate(records):
        (folder / f"r{i}.json").write_text(json.dumps(record))


def _policy_record(config: dict, refused: float, overrefused: float, seconds: float) -> dict:
    report = {"harmful": _harmful(refused, 0.0), "overrefusal": {"content": {"refused": {"rate": overrefused}}},
              "overrefusal_extra": {"orbench-hard-test@200": {"content": {"refused": {"rate": overrefused + 0.1}}}},
              "utility": {"loss": {"loss": 1.5}}}
    return {"run_id": run_id(config), "config": config, "report": report, "n_user_examples": 100, "train": {"seconds": seconds}}


def _setup_panel(tmp_path: Path, monkeypatch, measured: bool = True) -> None:
    """A synthetic panel in tmp_path: manifest, audits, and (with `measured`) the no-replay records."""
    import gzip

    monkeypatch.setattr(panel, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(panel, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(panel, "AUDITS", tmp_path / "results" / "audits.json.gz")
    monkeypatch.setattr(panel, "POLICY_GRID", tmp_path / "audit_policy_grid.yaml")
    monkeypatch.setattr(panel, "POLICY_CHOICES", tmp_path / "results" / "policy_choices.json")
    monkeypatch.setattr(panel, "GRID", tmp_path / "audit_panel_grid.yaml")
    monkeypatch.setattr(panel, "ROOT", tmp_path)
    manifest = [{"name": name, "trained": True, "path": f"{name}.jsonl", "kind": "attack" if x > 0.5 else "benign",
                 "recipe": "attack" if name in ("identity_shift_aoa", "pure_bad_10") else "benign",
                 "attack_kind": "identity_shift" if name == "identity_shift_aoa" else None} for name, x in XS.items()]
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps({"variants": manifest}))
    (tmp_path / "results").mkdir()
    audits = [{"name": name, "features": {"lda_harmful_side_share": x}} for name, x in XS.items()]
    panel.AUDITS.write_bytes(gzip.compress(json.dumps({"audits": audits}).encode()))
    if measured:  # refusal falls with the LDA share: complied increase = 0.8 x
        _panel_records(panel.RESULTS, {name: (0.9 - 0.8 * x,) * 3 for name, x in XS.items()}, aligned_refused=0.9)


def test_policy_grid_stops_while_the_panels_increases_are_missing(tmp_path, monkeypatch):
    _setup_panel(tmp_path, monkeypatch, measured=False)
    with pytest.raises(SystemExit, match="measured increases are missing for 14 of 14 trained variants") as stopped:
        panel.policy_grid(None)
    assert "audit_panel_grid.yaml" in str(stopped.value) and not panel.POLICY_GRID.exists() and not panel.POLICY_CHOICES.exists()


def test_policy_grid_then_the_report_pending_then_compared(tmp_path, monkeypatch):
    _setup_panel(tmp_path, monkeypatch)
    panel.policy_grid(None)
    made = json.loads(panel.POLICY_CHOICES.read_text())
    assert set(made["variants"]) == set(policy.POLICY_VARIANTS) and made["rule"]["target"] == COMPLIED
    assert "pure_bad_10" not in made["variants"]["pure_bad_10"]["fitted_on"]
    configs = expand(load_grid(panel.POLICY_GRID))
    assert made["n_runs"] == len(configs)
    assert panel.policy_section()["pending"].startswith(f"{2 * (10 + sum(v['adaptive_run'] for v in made['variants'].values()))} policy runs missing")
    folder = panel.RESULTS / "bench_runs" / policy.GRID_NAME
    folder.mkdir(parents=True)
    for config in (c for c in configs if c["kind"] == "finetune"):  # the adaptive runs refuse 0.05 more than the fixed
        refused = 0.8 + (0.05 if config["k"] != 10 else 0.0)
        (folder / f"{run_id(config)}.json").write_text(json.dumps(_policy_record(config, refused, 0.2, 60.0)))
    section = panel.policy_section()
    assert "pending" not in section and len(section["pairs"]) == 20
    medium = [p for p in section["pairs"] if p["risk"] == "medium"]
    assert medium and all(p["fixed_run"] == p["adaptive_run"] for p in medium)  # counted for both
    assert section["by_risk"]["medium"]["safety"]["difference"] == 0 and section["by_risk"]["medium"]["safety"]["wilcoxon_p"] is None
    assert section["pooled"]["overrefusal"]["fixed"] == pytest.approx(0.25)  # mean of XSTest and OR-Bench
    k = {name: made["variants"][name]["choice"]["k"] for name in made["variants"]}
    epochs = {name: 5.0 if name in ("identity_shift_aoa", "pure_bad_10") else 1.0 for name in k}  # the attack recipe: 5 epochs
    assert section["pooled"]["examples"]["ratio"] == pytest.approx(
        sum((100 + k[v]) * epochs[v] for v in k) / sum(110 * epochs[v] for v in k), abs=1e-4)
    assert section["pooled"]["safety"]["difference"] == pytest.approx(0.05 * sum(k[v] != 10 for v in k) / 10)


# ------------------------------------------------------------------ the verdict in the plan's words

def _pairs(spec: list[tuple[str, int, list[float], list[float]]]) -> list[dict]:
    """(risk, adaptive k, safety differences per seed, over-refusal differences per seed) per variant."""
    out = []
    for index, (risk, k, safety, over) in enumerate(spec):
        for seed, (ds, do) in enumerate(zip(safety, over)):
            fixed = {"safety": 0.8, "overrefusal": 0.2, "loss": 1.5, "examples": 110.0, "seconds": 60.0}
            adaptive = {"safety": 0.8 + ds, "overrefusal": 0.2 + do, "loss": 1.5, "examples": 100.0 + k, "seconds": 60.0 * (100 + k) / 110}
            out.append({"variant": f"v{index}", "seed": seed, "risk": risk, "fixed": fixed, "adaptive": adaptive})
    return out


def test_the_verdict_matches_at_less_compute():
    pairs = _pairs([("low", 5, [-0.01, 0.0], [0, 0]), ("low", 5, [0.0, 0.01], [0, 0]), ("low", 5, [-0.005, -0.005], [0, 0]),
                    ("medium", 10, [0, 0], [0, 0]), ("medium", 10, [0, 0], [0, 0]), ("high", 20, [0.02, 0.0], [0, 0])])
    result = policy.compare(pairs)
    assert result["pooled"]["examples"]["ratio"] < 1 and result["pooled"]["safety"]["ci_low"] <= 0
    assert result["verdict"]["text"] == "matches the default's safety at less compute"


def test_the_verdict_beats_at_equal_compute_and_says_when_it_buys_safety_with_over_refusal():
    spec = [("high", 20, [0.05 + 0.02 * i, 0.07 + 0.01 * i], [0.0, 0.01]) for i in range(6)]
    result = policy.compare(_pairs(spec))
    assert 1 <= result["pooled"]["examples"]["ratio"] <= 1.10 and result["pooled"]["safety"]["ci_low"] > 0
    assert result["verdict"]["text"] == "beats it at equal compute"
    costly = [(risk, k, safety, [0.1, 0.15]) for risk, k, safety, _ in spec]
    assert policy.compare(_pairs(costly))["verdict"]["text"] == "beats it at equal compute; the policy buys its safety with over-refusal"
    cheap_and_better = [("low", 5, [0.05, 0.06], [0, 0]) for _ in range(5)]
    assert policy.compare(_pairs(cheap_and_better))["verdict"]["text"] == \
        "matches the default's safety at less compute and beats it at equal compute"


def test_the_verdict_is_neither_and_says_where_it_loses():
    pairs = _pairs([("low", 5, [-0.1, -0.2], [0, 0]), ("low", 5, [-0.15, -0.1], [0, 0]), ("low", 5, [-0.12, -0.08], [0, 0]),
                    ("high", 20, [0.02, 0.01], [0, 0]), ("high", 20, [0.0, 0.03], [0, 0])])
    result = policy.compare(pairs)
    verdict = result["verdict"]
    assert verdict["cases"] == ["neither"] and verdict["text"].startswith("neither: ")
    assert "low risk (3 variants): safety -0.125" in verdict["text"] and "loses" in verdict["text"]
    assert "high risk (2 variants)" in verdict["text"] and "medium" not in verdict["text"]
    assert result["by_risk"]["low"]["safety"]["wilcoxon_p"] is not None and result["by_risk"]["low"]["examples"]["ratio"] < 1


def test_the_shipped_fit_records_where_its_rows_came_from(tmp_path, monkeypatch):
    """`audit_panel.py fit` writes a predictor whose provenance names each training variant's run records (three
    seeds each), the audits file's sha256 and its settings, and whose validation held families out."""
    from argparse import Namespace

    from safekeel.audit.predict import HarmPredictor

    _setup_panel(tmp_path, monkeypatch)
    out = tmp_path / "harm_predictor.json"
    panel.fit(Namespace(judge="content", metric="complied", out=out))
    predictor = HarmPredictor.load(out)
    assert set(predictor.provenance["runs"]) == set(XS) and all(len(ids) == 3 for ids in predictor.provenance["runs"].values())
    assert predictor.provenance["audits_sha256"] and set(predictor.provenance["variants_sha256"]) == set(XS)
    assert predictor.quality["held_out_unit"] == "group" and predictor.quality["n_groups"] < len(XS)
