"""Measure the monitors on the aligned organism: harm probes and the refusal direction, TopK SAEs
trained on streamed activations, an SAE sweep with early kills, SAE-latent probes against the dense
probe, and (separately, through the service) the serving overhead. Writes
benchmarks/results/monitors.{json,md}.

    python benchmarks/monitors.py                      # probes + SAE sweep + SAE probes (~30 min here)
    python benchmarks/guard_overhead.py --suite monitors --monitor-dir $SAFEKEEL_HOME/monitors/smollm2-135m-safe
    python benchmarks/monitors.py --render-only        # re-render the .md (merges monitor_overhead.json)

The monitors are saved to $SAFEKEEL_HOME/monitors/<model> (or --monitor-dir), where `safekeel serve`
loads them. Hygiene: layers, poolings and SAE-probe settings are chosen on validation splits
(AdvBench dev vs Alpaca), thresholds on a separate benign calibration sample, numbers reported on
splits never used before (AdvBench test, HarmBench, JBB, XSTest). The SAE corpus holds no prompt of
any reported split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-safe")
    parser.add_argument("--monitor-dir", type=Path, default=None)
    parser.add_argument("--layers", default="3,6,9,12,15,18,21,24,27", help="candidate probe layers")
    parser.add_argument("--sae-tokens", type=int, default=300_000, help="training tokens per SAE")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--probes-only", action="store_true",
                        help="rerun only the dense probe suite (current validation rule), save those probes, and merge into "
                             "monitors.json, keeping the SAE sections (the first suite's report is kept as probe_suite_first)")
    args = parser.parse_args()
    if args.render_only:
        render(json.loads((RESULTS / "monitors.json").read_text()))
        return

    import numpy as np
    import torch

    from safekeel.models.registry import load_model_and_tokenizer, resolve_model
    from safekeel.monitors.capture import ActivationReader, model_fingerprint, render_requests
    from safekeel.monitors.probes import calibrate_threshold, detection_metrics
    from safekeel.monitors.sae import SaeConfig, TopKSAE, evaluate_sae
    from safekeel.monitors.sae_probe import SaeProbeConfig, fit_sae_probe
    from safekeel.monitors.suite import (ProbeSuiteConfig, activation_stream, reference_splits, sae_corpus, train_probe_suite,
                                        validation_metrics)
    from safekeel.monitors.sweep import KillRule, run_sweep
    from safekeel.paths import safekeel_home
    from safekeel.provenance import library_versions, write_json_atomic

    torch.set_num_threads(args.threads)
    started = time.time()
    monitor_dir = args.monitor_dir or safekeel_home() / "monitors" / args.model
    work = ROOT / "runs" / "monitors"
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    fingerprint = model_fingerprint(resolve_model(args.model))

    # 1. dense probes and the refusal direction
    suite_config = ProbeSuiteConfig(model=args.model, layers=[int(x) for x in args.layers.split(",")])
    splits = reference_splits(suite_config.n_benign, suite_config.seed, suite_config.xstest_validation)
    suite = train_probe_suite(suite_config, monitor_dir, splits=splits, model=model, tokenizer=tokenizer)
    print(f"probes done in {suite.report['seconds']:.0f} s", flush=True)
    if args.probes_only:
        report = json.loads((RESULTS / "monitors.json").read_text())
        if report["model_fingerprint"] != fingerprint:
            raise SystemExit("monitors.json was measured on another model; run the full benchmark")
        report.setdefault("probe_suite_first", report["probe_suite"])
        report["probe_suite"] = {k: v for k, v in suite.report.items() if k != "versions"}
        report["command_probes"] = "python benchmarks/monitors.py " + " ".join(sys.argv[1:])
        write_json_atomic(RESULTS / "monitors.json", report)
        render(report)
        return
    layer = suite.token_layer  # the layer the mean-pooled probe chose on validation: SAEs read it too
    middle = model.config.num_hidden_layers // 2
    hook, hook_middle = f"layers.{layer}", f"layers.{middle if middle != layer else max(0, middle - 1)}"
    d_in = model.config.hidden_size

    # 2+3. SAEs in ONE pass over the model: a sweep queue run 3 at a time on one activation stream.
    # The first three are the SAEs we want (two sizes at the probe layer, one at another layer); the
    # rest are configurations that should not make it (far too sparse, learning rates far off), which
    # the kill rules stop early so that their slot goes to the next in the queue.
    texts = sae_corpus(tokenizer, splits, n_alpaca=12000, n_gsm8k=1500)
    held_out, train_texts = texts[:300], texts[300:]
    reader = ActivationReader(model, tokenizer, sorted({hook, hook_middle}, key=lambda h: int(h.split(".")[1])))

    def sae(name, hookpoint, expansion=8, k=32, lr=None):
        return SaeConfig(hookpoint=hookpoint, d_in=d_in, expansion_factor=expansion, k=k, lr=lr, batch_size=2048,
                         max_tokens=args.sae_tokens, dead_tokens=100_000, name=name)

    sweep_configs = [sae(f"{hook}-8x-k32", hook), sae(f"{hook}-16x-k32", hook, expansion=16), sae(f"{hook_middle}-8x-k32", hook_middle),
                     sae(f"{hook}-8x-k1-too-sparse", hook, k=1), sae(f"{hook}-8x-k32-lr0.1", hook, lr=0.1),
                     sae(f"{hook}-8x-k32-lr1e-6", hook, lr=1e-6)]
    rules = [KillRule("fvu_ema", 0.6, after_steps=40), KillRule("dead_fraction", 0.5, after_steps=60)]
    sweep_started = time.time()
    sweep = run_sweep(sweep_configs, activation_stream(reader, train_texts, epochs=3), work / "sweep", kill_rules=rules,
                      parallel=3, model_hash=fingerprint, progress=True,
                      extra={"corpus": "Alpaca (unused by probes) + GSM8K train + AdvBench train + authored", "model": args.model})
    sweep_seconds = time.time() - sweep_started
    sweep_json = json.loads(sweep.path.read_text())
    saes = []
    for record in sweep.records:
        if record.status != "completed":
            continue
        trained = TopKSAE.load(record.folder, expected_model_hash=fingerprint)
        metrics = evaluate_sae(trained, reader.token_batches(held_out, 32))
        saes.append({"name": record.name, "hookpoint": trained.cfg.hookpoint, "num_latents": trained.num_latents, "k": trained.cfg.k,
                     "train_tokens": record.tokens, "steps": record.steps, "train": record.metrics,
                     "held_out": {"fvu": round(metrics.fvu, 4), "l0": round(metrics.l0, 2),
                                  "dead_fraction": round(metrics.dead_fraction, 4), "tokens": metrics.tokens},
                     "folder": record.folder})
        print(saes[-1], flush=True)

    # 4. SAE-latent probes vs the dense probes at the same layer (settings chosen on validation)
    main_sae = TopKSAE.load(sweep.record(f"{hook}-8x-k32").folder, expected_model_hash=fingerprint)
    hidden = suite.sequences
    candidates = []
    for pooling in ("max", "mean", "last"):
        for n_features in (None, 32):
            probe = fit_sae_probe(SaeProbeConfig(hook, pooling, n_features), main_sae, hidden["harmful_train"], hidden["benign_train"])
            val = validation_metrics(lambda name: [probe.score_sequence(h) for h in hidden[name]], splits)
            candidates.append({"probe": probe.config.name, "val": val, "_probe": probe})
    chosen = max(candidates, key=lambda c: (c["val"]["auroc"], c["val"]["tpr_at_0.01_fpr_oracle"]))
    sae_probe = chosen["_probe"]
    scores = {name: np.array([sae_probe.score_sequence(h) for h in hidden[name]]) for name in hidden}
    sae_probe.threshold = calibrate_threshold(scores["benign_calibration"], 0.01)
    sae_tests = {name: detection_metrics(scores[h], scores[b], sae_probe.threshold) for name, (h, b) in splits.pairs.items()}
    sae_probe.metadata.update({"role": "sae_probe", "model": args.model, "model_fingerprint": fingerprint,
                               "training_data_sha256": splits.sha256(), "validation": chosen["val"], "tests": sae_tests,
                               "sae": f"{hook}-8x-k32"})
    sae_probe.save(monitor_dir / "sae_probe")
    dense_same_layer = [row for row in suite.report["grid"] if row["layer"] == layer and row["method"] == "logistic"]

    report = {
        "command": "python benchmarks/monitors.py " + " ".join(sys.argv[1:]), "model": args.model,
        "model_fingerprint": fingerprint, "monitor_dir": str(monitor_dir), "machine": "2 CPU cores, no GPU",
        "probe_suite": {k: v for k, v in suite.report.items() if k != "versions"},
        "saes": saes, "sae_corpus_texts": len(train_texts),
        "sweep": {"rules": sweep_json["kill_rules"], "runs": sweep_json["runs"], "seconds": round(sweep_seconds, 1),
                  "total_estimated_seconds_saved": sweep_json["total_estimated_seconds_saved"]},
        "sae_probe": {"chosen": chosen["probe"], "validation": chosen["val"], "threshold": sae_probe.threshold,
                      "tests": sae_tests, "candidates": [{k: v for k, v in c.items() if k != "_probe"} for c in candidates],
                      "top_latents": sae_probe.top_latents(), "dense_same_layer_validation": dense_same_layer},
        "seconds": round(time.time() - started, 1), "versions": library_versions(),
    }
    write_json_atomic(RESULTS / "monitors.json", report)
    render(report)


def render(report: dict) -> None:
    """monitors.md from monitors.json (+ monitor_overhead.json when the overhead run exists)."""
    overhead_path = RESULTS / "monitor_overhead.json"
    overhead = json.loads(overhead_path.read_text()) if overhead_path.is_file() else None
    suite = report["probe_suite"]
    lines = ["# Monitors on the aligned organism", "", f"Command: `{report['command']}` (model {report['model']}, "
             f"fingerprint {report['model_fingerprint']}); {report['machine']}; {report['seconds']:.0f} s.", "",
             "Harmful = 1, benign = 0. AUROC; TPR and FPR at the threshold calibrated on "
             f"{suite['data']['benign_calibration']} held-out benign Alpaca prompts for 1% FPR (the deployment numbers); "
             "`oracle` = TPR at 1% FPR read off the test set's own ROC. Layer, pooling and method chosen on AdvBench dev vs "
             "Alpaca validation; nothing below was seen before the report. `layers.N` = residual stream entering block N.", "",
             "## Dense probes", "",
             "| monitor | chosen on validation | test set | n (harmful+benign) | AUROC | TPR at threshold | FPR at threshold | TPR@1%FPR oracle |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    first = report.get("probe_suite_first")
    sae_entry = {"probe": report["sae_probe"]["chosen"], "tests": report["sae_probe"]["tests"]}
    chosen = dict(suite["chosen"]) if first else {**suite["chosen"], "sae_probe": sae_entry}
    for role, entry in chosen.items():
        for name, m in entry["tests"].items():
            lines.append(f"| {role} | {entry['probe']} | {name} | {m['n_harmful']}+{m['n_benign']} | {m['auroc']:.3f} | "
                         f"{m['tpr_at_threshold']:.3f} | {m['fpr_at_threshold']:.3f} | {m['tpr_at_0.01_fpr_oracle']:.3f} |")
    if first:
        lines += ["", f"Shipped probes from `{report['command_probes']}`, chosen on the mean validation AUROC over "
                  "AdvBench dev vs Alpaca and XSTest's dev half (odd ids) unsafe vs safe; XSTest is then tested on its other half only.", "",
                  "The first run chose on AdvBench dev vs Alpaca alone, which saturated (AUROC 1.0 at most layers), so the first "
                  "layer tried won the tie; its choices under shift (the SAE sections below compare against these). Its 'in "
                  "distribution' row is leaky: SafeTuneBed's AdvBench test split shares 125 of its 156 prompts with the train "
                  "split the probes were fitted on (the shipped run tests on the 52 behaviours in neither).", "",
                  "| monitor | chosen on AdvBench dev only | test set | n | AUROC | TPR at threshold | FPR at threshold |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for role, entry in {**first["chosen"], "sae_probe": sae_entry}.items():
            for name, m in entry["tests"].items():
                lines.append(f"| {role} | {entry['probe']} | {name} | {m['n_harmful']}+{m['n_benign']} | {m['auroc']:.3f} | "
                             f"{m['tpr_at_threshold']:.3f} | {m['fpr_at_threshold']:.3f} |")
    lines += ["", "Validation grid (mean validation AUROC of the shipped selection):", "",
              "| layer | " + " | ".join(sorted({f"{r['method']}/{r['pooling']}" for r in suite["grid"]})) + " |"]
    columns = sorted({f"{r['method']}/{r['pooling']}" for r in suite["grid"]})
    lines.append("| --- |" + " --- |" * len(columns))
    for layer in sorted({r["layer"] for r in suite["grid"]}):
        cells = {f"{r['method']}/{r['pooling']}": f"{r['val']['auroc']:.3f}" for r in suite["grid"] if r["layer"] == layer}
        lines.append(f"| {layer} | " + " | ".join(cells.get(c, "") for c in columns) + " |")
    lines += ["", "## Sparse autoencoders (TopK, AuxK; trained on streamed activations, several per forward)", "",
              f"The completed runs of the sweep below (one activation stream, 3 SAEs at a time); {report['sae_corpus_texts']} corpus texts; "
              "held-out: 300 other corpus texts.", "",
              "| SAE | hookpoint | latents | k | train tokens | held-out FVU | L0 | dead fraction (held-out) | dead fraction (train) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in report["saes"]:
        lines.append(f"| {s['name']} | {s['hookpoint']} | {s['num_latents']} | {s['k']} | {s['train_tokens']} | {s['held_out']['fvu']:.3f} | "
                     f"{s['held_out']['l0']:.1f} | {s['held_out']['dead_fraction']:.3f} | {s['train']['dead_fraction']:.3f} |")
    sweep = report["sweep"]
    lines += ["", "## Sweep with early kills", "", "Rules: " + "; ".join(f"{r['metric']} > {r['above']} after {r['after_steps']} steps"
                                                                       for r in sweep["rules"]) + f". {sweep['seconds']:.0f} s; "
              f"estimated time saved by the kills: {sweep['total_estimated_seconds_saved']:.0f} s.", "",
              "| run | status | steps run / budget | kill reason | final FVU (EMA) | dead fraction | est. seconds saved |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sweep["runs"]:
        m = r.get("metrics") or {}
        fvu = f"{m['fvu_ema']:.3f}" if m.get("fvu_ema") is not None else ""
        dead = f"{m['dead_fraction']:.3f}" if m.get("dead_fraction") is not None else ""
        saved = f"{r['estimated_seconds_saved']:.0f}" if r.get("estimated_seconds_saved") is not None else ""
        lines.append(f"| {r['name']} | {r['status']} | {r['steps']} / {r['budget_steps']} | {r.get('kill_reason') or ''} | {fvu} | {dead} | {saved} |")
    stream_tokens = max((r.get("started_at_stream_tokens") or 0) + r["tokens"] for r in sweep["runs"])
    killed = [r for r in sweep["runs"] if r["status"] == "killed"]
    if killed and stream_tokens:
        left = max(r["budget_steps"] * r["config"]["batch_size"] - r["tokens"] for r in killed)
        per_token = sweep["seconds"] / stream_tokens
        lines += ["", f"`est. seconds saved` counts the killed SAEs' own compute only. The wall time saved is larger: "
                      f"the killed runs were the last in the queue, so without the kills the shared activation stream (the model "
                      f"forward) would have run about {left} more tokens, at the measured {per_token * 1000:.1f} s per 1,000 stream "
                      f"tokens: about {left * per_token / 60:.0f} minutes."]
    sp = report["sae_probe"]
    lines += ["", "## SAE-latent probe vs the dense probe", "",
              f"Chosen on validation: {sp['chosen']} (val AUROC {sp['validation']['auroc']:.3f}). Candidates:", "",
              "| SAE probe | val AUROC | val TPR@1%FPR |", "| --- | --- | --- |"]
    for c in sp["candidates"]:
        lines.append(f"| {c['probe']} | {c['val']['auroc']:.3f} | {c['val']['tpr_at_0.01_fpr_oracle']:.3f} |")
    lines += ["", "Dense logistic probes at the same layer (validation): " + ", ".join(
        f"{r['pooling']} {r['val']['auroc']:.3f}" for r in sp["dense_same_layer_validation"]) + ".",
              "Most harmful-leaning latents: " + ", ".join(f"#{t['latent']} ({t['weight']})" for t in sp["top_latents"]) + "."]
    if overhead:
        lines += ["", "## Serving overhead (vLLM; `" + overhead["command"] + "`)", "",
                  f"{overhead['prompts']} prompts x {overhead['rounds']} rounds per policy, {overhead['concurrency']} concurrent streams, "
                  f"max_tokens {overhead['max_tokens']}; the same adapter behind every policy; ratios against policy `off` in the same run.", "",
                  "| policy | token throughput ratio | latency p50 ratio | TTFT p50 (s) | TTFT ratio |", "| --- | --- | --- | --- | --- |"]
        for r in overhead["rows"]:
            lines.append(f"| {r['guard']} | {r['token_throughput_ratio']} | {r['latency_p50_ratio']} | {r['ttft_p50_s']} | {r['ttft_p50_ratio']} |")
        layers = [int(c["probe"].split("layers.")[1].split("-")[0]) for c in suite["chosen"].values()]
        baseline = next(r for r in overhead["rows"] if r["guard"] == "none")["ttft_p50_s"]
        deltas = [r["ttft_p50_s"] - baseline for r in overhead["rows"] if r["guard"] != "none"]
        lines += ["", f"`log` and `flag` score every request with all four saved monitors: one forward of the rendered request through "
                      f"the base model's first {max(layers) + 1} blocks (the deepest hookpoint is layers.{max(layers)}) plus the SAE "
                      "encoding, in the API process beside vLLM on the same 2 cores, before generation starts: it shows in the time "
                      f"to first token (+{min(deltas):.2f} to +{max(deltas):.2f} s) more than in end-to-end latency. The run-to-run noise of this benchmark is about "
                      "10% (guard_overhead.md)."]
    (RESULTS / "monitors.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
