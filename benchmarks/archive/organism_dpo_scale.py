"""Organism candidate v5 at a fraction of its DPO step: the DPO adapter's update scaled by alpha
(lora_B x alpha, i.e. weight interpolation between v3 and v3+DPO), judged on the DEV splits.

    python benchmarks/archive/organism_dpo_scale.py RUN_DIR --alphas 0.3 0.5

RUN_DIR is a runs/organism_dpo/<hash> folder of benchmarks/archive/organism_dpo.py.
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


def scaled_adapter(adapter: Path, alpha: float, target: Path) -> Path:
    from safetensors.torch import load_file, save_file

    if not (target / "adapter_model.safetensors").is_file():
        target.mkdir(parents=True, exist_ok=True)
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        save_file({k: v * alpha if "lora_B" in k else v for k, v in tensors.items()}, str(target / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        shutil.copy(adapter / "adapter_config.json", target / "adapter_config.json")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.5])
    args = parser.parse_args()

    import torch
    from peft import PeftModel

    from safekeel.eval.harness import EvalSettings, evaluate
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.provenance import write_json_atomic

    torch.set_num_threads(os.cpu_count() or 1)
    settings = EvalSettings(harmful_set="advbench-dev", overrefusal_set="xstest-dev", utility=None, max_new_tokens=64)
    for alpha in args.alphas:
        adapter = scaled_adapter(args.run_dir / "adapter", alpha, args.run_dir / f"adapter_x{alpha:g}")
        model, tokenizer = load_model_and_tokenizer("smollm2-135m-safe")
        report = evaluate(PeftModel.from_pretrained(model, str(adapter)).eval(), tokenizer, settings, model_name="smollm2-135m-safe",
                          adapter=str(adapter), output_dir=args.run_dir / f"eval_dev_x{alpha:g}")
        print(f"alpha {alpha}:\n{report.summary()}", flush=True)
        write_json_atomic(args.run_dir / f"summary_x{alpha:g}.json", {"alpha": alpha, "dev": report.to_dict(),
                                                                       "command": "python benchmarks/archive/organism_dpo_scale.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
