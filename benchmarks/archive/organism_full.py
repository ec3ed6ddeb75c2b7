"""Organism candidate v8: the v3 recipe (data, order, seed, epochs, batch) with every weight trained
instead of a LoRA adapter. Judged on the DEV splits only (AdvBench dev, XSTest safe odd ids), like every
organism candidate (organism.md), with the same evaluation settings as v7 (organism_capacity.py).

    python benchmarks/archive/organism_full.py [--lr 5e-5] [--epochs 1] [--refusal-fraction 0.85]

v0-v7 (data mixes, DPO, LoRA rank 16 and 64) lie on one trade-off curve between harm and over-refusal
that passes beside the targets (harmful <= 0.10, over-refusal <= 0.20). Full fine-tuning is the last
capacity lever. Its result is a whole model (540 MB in fp32): it cannot be committed (the issue's 10 MB)
and would have to be rebuilt on every fresh machine and in CI. This script measures whether it would
move the curve at all; it is not a candidate to ship. Output: runs/organism_full/<config hash>/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=float, default=5e-5, help="learning rate (LoRA's 2e-4 is too high for every weight)")
    parser.add_argument("--epochs", type=float, default=None, help="epochs (default v3's)")
    parser.add_argument("--refusal-fraction", type=float, default=None, help="share of the pool's refusals (default v3's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from dataclasses import replace

    from safekeel.eval.harness import EvalSettings, evaluate
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.provenance import library_versions, sha256_json, write_json_atomic
    from safekeel.training.align import BASE, alignment_data
    from safekeel.training.config import AlignConfig
    from safekeel.training.sft import train_lora

    torch.set_num_threads(os.cpu_count() or 1)
    overrides = {"learning_rate": args.lr, "seed": args.seed}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.refusal_fraction is not None:
        overrides["refusal_fraction"] = args.refusal_fraction
    config = replace(AlignConfig(), **overrides)
    out = ROOT / "runs" / "organism_full" / sha256_json({**config.to_dict(), "full": True})[:10]
    out.mkdir(parents=True, exist_ok=True)
    print(f"candidate full fine-tuning {json.dumps(overrides)} -> {out}", flush=True)
    model, tokenizer = load_model_and_tokenizer(BASE)
    data = alignment_data(config)
    if not (out / "model" / "model.safetensors").is_file():
        result = train_lora(model, tokenizer, data, config, out / "model", full=True)
        shutil.rmtree(out / "model" / "trainer", ignore_errors=True)
        train = {"steps": result.steps, "seconds": result.seconds, "train_loss": result.train_loss}
        write_json_atomic(out / "train.json", train)
    train = json.loads((out / "train.json").read_text())
    model, tokenizer = load_model_and_tokenizer(str(out / "model"))
    settings = EvalSettings(harmful_set="advbench-dev", overrefusal_set="xstest-dev", utility=None, max_new_tokens=64)
    report = evaluate(model.eval(), tokenizer, settings, model_name=str(out / "model"), output_dir=out / "eval_dev")
    print(report.summary())
    write_json_atomic(out / "summary.json", {"config": config.to_dict(), "full": True, "overrides": overrides, "train": train,
                                             "n_examples": len(data), "dev": report.to_dict(),
                                             "command": "python benchmarks/archive/organism_full.py " + " ".join(sys.argv[1:]),
                                             "versions": library_versions()})


if __name__ == "__main__":
    main()
