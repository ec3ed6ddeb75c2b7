"""Concept probes beyond harm (issue 34): toxicity and hazardous cyber knowledge from labelled data, tested out
of distribution; a harm probe trained on every prompt source and tested leave-one-source-out; token-level
(multiple-instance) toxicity probes against pooled ones; and contrastive training with safe lexical twins
for XSTest. Writes benchmarks/results/concept_probes.{json,md} and token_scores_toxicity.html.

    python benchmarks/concept_probes.py                    # everything (~25 min of 1-thread CPU cold, ~3 min cached)
    python benchmarks/concept_probes.py --extract-only     # (re)build the activation cache only
    python benchmarks/concept_probes.py --render-only      # re-render the .md from the .json

Hidden states are cached in benchmarks/cache/concept_probes/<model fingerprint>/ (delete it to rebuild).
Probes are saved (versioned, model-fingerprinted) to --monitor-dir (default runs/concept_probes/<model>): copy
the sub-folders you want into the served model's monitor folder. Hygiene: layer and pooling chosen on dev
splits, thresholds on benign calibration sets, numbers reported on sets never used before.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = ROOT / "benchmarks" / "results"
TARGET_FPR = 0.01


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-safe", help="registered model name or any local model folder")
    parser.add_argument("--layers", default="6,9,12,15,18,21,24", help="candidate probe layers")
    parser.add_argument("--poolings", default="last,mean,max")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "cache" / "concept_probes")
    parser.add_argument("--monitor-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--parts", default="toxicity,cyber,harm,token,xstest")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the .json/.md/.html go")
    parser.add_argument("--extract-only", action="store_true")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    from concept_probes_report import render

    if args.render_only:
        render(json.loads((args.results / "concept_probes.json").read_text()), args.results)
        return

    import torch

    from concept_probes_parts import Context, cyber, harm_and_xstest, toxicity, token_level
    from safekeel.models.registry import load_model_and_tokenizer, resolve_model
    from safekeel.monitors.concepts import FeatureStore
    from safekeel.provenance import library_versions, write_json_atomic

    torch.set_num_threads(args.threads)
    started = time.time()
    parts = set(args.parts.split(","))
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    model_path = resolve_model(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    n_blocks = model.config.num_hidden_layers
    layers = [n for n in layers if n < n_blocks] or [n_blocks // 2]
    store = FeatureStore(model, tokenizer, model_path, args.cache, layers, args.poolings.split(","), max_tokens=128)
    cyber_store = FeatureStore(model, tokenizer, model_path, args.cache, layers, args.poolings.split(","), max_tokens=192)
    monitor_dir = args.monitor_dir or ROOT / "runs" / "concept_probes" / Path(str(args.model)).name
    ctx = Context(args.model, store, cyber_store, monitor_dir, layers, args.poolings.split(","), TARGET_FPR, model_path,
                  args.extract_only, results_dir=args.results)
    report: dict = {"command": "python benchmarks/concept_probes.py " + " ".join(sys.argv[1:]), "model": args.model,
                    "model_fingerprint": store.fingerprint, "machine": f"{os.cpu_count()} CPU cores shared with a background benchmark, no GPU; "
                    f"torch threads {args.threads}", "layers": layers, "poolings": args.poolings.split(","), "target_fpr": TARGET_FPR,
                    "monitor_dir": str(monitor_dir), "concepts": []}
    if "toxicity" in parts or "token" in parts:
        row, detail = toxicity(ctx)
        if row:
            report["concepts"].append(row)
            report["toxicity"] = detail
        if "token" in parts:
            report["token_level"] = token_level(ctx, detail)
    if "cyber" in parts:
        row, detail = cyber(ctx)
        if row:
            report["concepts"].append(row)
            report["cyber"] = detail
    if "harm" in parts or "xstest" in parts:
        row, loso, xstest = harm_and_xstest(ctx, with_xstest="xstest" in parts)
        if row:
            report["concepts"].append(row)
            report["harm_loso"] = loso
        if xstest:
            report["xstest"] = xstest
    report["extraction_seconds"] = round(store.seconds + cyber_store.seconds + (ctx.long_store.seconds if ctx.long_store else 0), 1)
    report["seconds"] = round(time.time() - started, 1)
    report["versions"] = library_versions()
    if args.extract_only:
        print(f"activation cache ready in {report['seconds']:.0f} s ({report['extraction_seconds']:.0f} s of forwards)")
        return
    write_json_atomic(args.results / "concept_probes.json", relative_paths(report))
    render(report, args.results)


def relative_paths(value):
    """The report with paths inside the checkout written relative to it (a committed file names no machine's folders)."""
    if isinstance(value, dict):
        return {key: relative_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [relative_paths(item) for item in value]
    if isinstance(value, str) and value.startswith(str(ROOT) + "/"):
        return value[len(str(ROOT)) + 1:]
    return value


if __name__ == "__main__":
    random.seed(0)
    main()
