"""Organism candidate v7: the v3 recipe with more adapter capacity. Judged on the DEV splits only
(AdvBench dev, XSTest safe odd ids), like every organism candidate (organism.md).

    python benchmarks/archive/organism_capacity.py --rank 64 [--alpha 128] [--lr 2e-4] [--epochs 1]

Seven candidates (organism.md) trace one trade-off curve between harm and over-refusal when the data
or the objective changes at LoRA rank 16. The hypothesis tested here: at r=16 the 135M model separates
requests by their verb ("kill", "butcher") and not by its object, and more capacity lets the same
data draw the line better. Everything but the adapter's rank (and alpha, kept at 2 x rank unless
given) is v3's AlignConfig: the same data, seed, order, rate and epochs. The adapter is trained from
the raw SmolLM2-135M-Instruct, evaluated on top of it (unmerged; the merge is exact up to float
rounding) and written with its provenance under runs/organism_capacity/<config hash>/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default 2 x rank, as v3's 32 for 16)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default v3's)")
    parser.add_argument("--epochs", type=float, default=None, help="epochs (default v3's)")
    parser.add_argument("--refusal-fraction", type=float, default=None, help="share of the pool's refusals (default v3's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from dataclasses import replace
    from peft import PeftModel

    from safekeel.eval.harness import EvalSettings, evaluate
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.provenance import library_versions, sha256_json, write_json_atomic
    from safekeel.training.align import BASE, train_aligned_adapter
    from safekeel.training.config import AlignConfig

    torch.set_num_threads(os.cpu_count() or 1)
    overrides = {"lora_r": args.rank, "lora_alpha": args.alpha or 2 * args.rank, "seed": args.seed}
    if args.lr is not None:
        overrides["learning_rate"] = args.lr
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.refusal_fraction is not None:
        overrides["refusal_fraction"] = args.refusal_fraction
    config = replace(AlignConfig(), **overrides)
    out = ROOT / "runs" / "organism_capacity" / sha256_json(config.to_dict())[:10]
    out.mkdir(parents=True, exist_ok=True)
    print(f"candidate {json.dumps(overrides)} -> {out}", flush=True)
    if not (out / "adapter" / "adapter_model.safetensors").is_file():
        train_aligned_adapter(out / "adapter", config)
    alignment = json.loads((out / "adapter" / "alignment_provenance.json").read_text())
    model, tokenizer = load_model_and_tokenizer(BASE)
    adapted = PeftModel.from_pretrained(model, str(out / "adapter")).eval()
    settings = EvalSettings(harmful_set="advbench-dev", overrefusal_set="xstest-dev", utility=None, max_new_tokens=64)
    report = evaluate(adapted, tokenizer, settings, model_name=BASE, adapter=str(out / "adapter"), output_dir=out / "eval_dev")
    print(report.summary())
    write_json_atomic(out / "summary.json", {"config": config.to_dict(), "overrides": overrides, "alignment": alignment,
                                             "dev": report.to_dict(),
                                             "command": "python benchmarks/archive/organism_capacity.py " + " ".join(sys.argv[1:]),
                                             "versions": library_versions()})


if __name__ == "__main__":
    main()
