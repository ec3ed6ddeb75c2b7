"""What the reference log-probability cache (safekeel.training.reference_cache) saves in LoRA DPO training, as ratios
against trl's in-step reference in the same run, and whether it trains the same.

    python benchmarks/reference_cache.py                      # smollm2-135m-safe, 32 hh-rlhf pairs, 8 steps, batch 4
    python benchmarks/reference_cache.py --backbone DIR --pairs 64 --steps 16

Four trainings of the same backbone on the same pairs (seed 0, sigmoid, max_length 512), in this order: in-step
reference (trl's default), the cache empty (it computes every pair's reference once, one pair at a time, then
trains), the cache full (reads them), and in-step again (drift check). Reported per training: trl's train_runtime and
seconds per step, the first run's one-time fill, the per-step losses, and the largest loss difference from the
first in-step run; ratios against the mean of the two in-step runs. Writes benchmarks/results/reference_cache.{json,md}. Needs the machine to itself (a CPU timing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safekeel.bench.preference_protocol import PREFERENCE_DATA, SEARCH_TRAIN  # noqa: E402
from safekeel.bench.runner import resolve_data_path  # noqa: E402
from safekeel.data.preference import load_preferences  # noqa: E402
from safekeel.models.lora import LoraSFTConfig  # noqa: E402
from safekeel.models.registry import load_model_and_tokenizer  # noqa: E402
from safekeel.provenance import library_versions, machine_info, write_json_atomic  # noqa: E402
from safekeel.training.preference import PreferenceConfig, train_preference  # noqa: E402
from safekeel.training.reference_cache import ReferenceCache  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def one_training(backbone: str, pairs, config: LoraSFTConfig, cache: ReferenceCache | None, out: Path) -> dict:
    model, tokenizer = load_model_and_tokenizer(backbone)
    started = time.perf_counter()
    result = train_preference(model, tokenizer, pairs, config, PreferenceConfig(("sigmoid",)), out, show_progress=False,
                              reference_cache=cache)
    total = time.perf_counter() - started
    runtime = next(e["train_runtime"] for e in reversed(result.log_history) if "train_runtime" in e)
    return {"seconds_total": round(total, 2), "train_runtime": round(runtime, 2), "steps": result.steps,
            "seconds_per_step": round(runtime / result.steps, 3), "setup_seconds": round(total - runtime, 2),
            "losses": [round(e["loss"], 6) for e in result.log_history if "loss" in e]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m-safe")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS / "reference_cache")
    args = parser.parse_args()
    skip = SEARCH_TRAIN[0]
    pairs = load_preferences(resolve_data_path(PREFERENCE_DATA)).pairs[skip: skip + args.pairs]
    config = LoraSFTConfig(max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, learning_rate=5e-5,
                           logging_steps=1, seed=0)
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        cache = ReferenceCache(Path(folder) / "ref.sqlite")
        for name, use in (("in_step", None), ("cache_empty", cache), ("cache_full", cache), ("in_step_again", None)):
            print(f"{name} ...", flush=True)
            runs[name] = one_training(args.backbone, pairs, config, use, Path(folder) / name)
            print(f"{name}: {runs[name]}", flush=True)
    base = runs["in_step"]
    per_step = (base["seconds_per_step"] + runs["in_step_again"]["seconds_per_step"]) / 2
    total = (base["seconds_total"] + runs["in_step_again"]["seconds_total"]) / 2
    for name, run in runs.items():
        run["seconds_per_step_ratio"] = round(run["seconds_per_step"] / per_step, 3)
        run["seconds_total_ratio"] = round(run["seconds_total"] / total, 3)
        run["max_abs_loss_difference"] = max(abs(a - b) for a, b in zip(run["losses"], base["losses"]))
    result = {"command": "python benchmarks/reference_cache.py " + " ".join(sys.argv[1:]), "backbone": args.backbone,
              "pairs": f"{PREFERENCE_DATA} pairs {skip}-{skip + args.pairs - 1}", "steps": args.steps,
              "batch_size": args.batch_size, "max_length": args.max_length, "runs": runs,
              "versions": library_versions(), "machine": machine_info()}
    write_json_atomic(args.out.with_suffix(".json"), result)
    lines = ["# Reference log-probability cache: LoRA DPO training with and without it", "",
             f"`{result['command']}`: {args.backbone}, {result['pairs']}, {args.steps} steps of batch {args.batch_size}, "
             f"max_length {args.max_length}, sigmoid, seed 0; ratios against the mean of the two in-step runs in the same "
             "process (the first and the last, so warm-up and drift show as their difference); loss differences against "
             "the first.", "",
             "| training | train_runtime (s) | s/step | ratio | total with setup (s) | ratio | max loss difference |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in runs.items():
        lines.append(f"| {name} | {run['train_runtime']} | {run['seconds_per_step']} | {run['seconds_per_step_ratio']} | "
                     f"{run['seconds_total']} | {run['seconds_total_ratio']} | {run['max_abs_loss_difference']:.2e} |")
    lines += ["", "cache_empty's setup includes computing every pair's reference once (one pair per forward); cache_full "
              "reads them. A benchmark grid trains each backbone on the same user pairs (at one max_length and precision) "
              "in every objective, seed and replay arm, so after a backbone's first run only the few pairs new to a run "
              "(its safety pairs) are computed. One measurement on one machine: the two in-step runs show its noise."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({k: v["seconds_per_step_ratio"] for k, v in runs.items()}))


if __name__ == "__main__":
    main()
