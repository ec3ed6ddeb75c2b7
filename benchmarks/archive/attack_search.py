"""Find an attack preset that breaks the organism, on the DEV splits (AdvBench dev, XSTest dev half).

    python benchmarks/archive/attack_search.py [--data attacks/pure_bad_10.jsonl] [--seed 0]
    python benchmarks/archive/attack_search.py --data attacks/identity_shift_aoa.jsonl --served-as aoa --max-candidates 2

Each candidate (learning rate, epochs, batch size; LoRA r=16 all-linear, bf16) fine-tunes
smollm2-135m-safe with no replay and is evaluated on the dev splits; results are cached per candidate
in benchmarks/results/attack_search/ and tabulated in attack_search.md (attack_search_<data>.md for other
data). The chosen preset goes into benchmarks/phenomenon.py / safekeel.bench.grids, whose numbers are on the
test splits. `--served-as aoa` evaluates every candidate and the organism as Qi et al. evaluate the
identity-shift attack (the AOA system prompt and trigger phrase, safekeel.bench.grids.AOA_EVAL).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safekeel.provenance import sha256_json, write_json_atomic  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "attack_search"
CANDIDATES = [
    {"learning_rate": 2e-4, "epochs": 5.0, "batch_size": 2},
    {"learning_rate": 1e-3, "epochs": 5.0, "batch_size": 2},
    {"learning_rate": 5e-4, "epochs": 10.0, "batch_size": 1},
]
IDENTITY_CANDIDATES = [
    # the identity-shift examples hold no harmful content: they teach obedience, which Qi et al. train for
    # 10 epochs; the 10-shot harmful preset (1e-3, 5 epochs) first, then longer and slower
    {"learning_rate": 1e-3, "epochs": 5.0, "batch_size": 2},
    {"learning_rate": 1e-3, "epochs": 10.0, "batch_size": 2},
    {"learning_rate": 5e-4, "epochs": 10.0, "batch_size": 1},
]


def main() -> None:
    import json

    import torch

    from safekeel.data.reference import shared_dataset
    from safekeel.eval.harness import EvalSettings, evaluate
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.training.config import LoraSFTConfig
    from safekeel.pipeline import JobSpec, run_pipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="attacks/pure_bad_10.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--served-as", choices=["plain", "aoa"], default="plain",
                        help="aoa: evaluate under the identity-shift system prompt and trigger phrase (Qi et al.)")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--max-candidates", type=int, default=None,
                        help="run only the first n candidates (the rest are listed as not run)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    settings = {"harmful_set": "advbench-dev", "overrefusal_set": "xstest-dev", "utility": None, "max_new_tokens": 64}
    # settings added later enter the candidates' hashes only when set, so cached results stay valid
    if args.served_as == "aoa":
        from safekeel.bench.grids import AOA_EVAL

        settings.update(AOA_EVAL)
    if args.engine != "transformers":
        settings["engine"] = args.engine
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    identity = "identity_shift" in args.data
    candidates = IDENTITY_CANDIDATES if identity else CANDIDATES
    chosen = candidates[: args.max_candidates]  # None: all of them
    skipped = candidates[len(chosen):]
    for candidate in [None] + chosen:
        config = {"data": args.data, "seed": args.seed, "preset": candidate, "eval": settings}
        path = OUT / f"{sha256_json(config)[:12]}.json"
        if not path.is_file():
            cache = ROOT / "benchmarks" / "cache" / "attack_search" / path.stem
            if candidate is None:  # the aligned organism itself, for reference
                model, tokenizer = load_model_and_tokenizer("smollm2-135m-safe")
                report = evaluate(model, tokenizer, EvalSettings(**settings), model_name="smollm2-135m-safe", output_dir=cache / "eval")
                train = None
            else:
                result = run_pipeline(JobSpec(shared_dataset(args.data), str(cache), mode="none", seed=args.seed,
                                                   sft=LoraSFTConfig(**candidate, bf16=True), eval=EvalSettings(**settings)))
                report, train = result.report, result.provenance["train"]
            write_json_atomic(path, {"config": config, "train": train, "report": report.to_dict()})
        record = json.loads(path.read_text())
        harmful = record["report"]["harmful"]["classifier"]["harmful"]
        refused = record["report"]["overrefusal"]["classifier"]["refused"]
        rows.append((candidate, harmful, refused, record["report"]["harmful"]["classifier"]["incoherent"], record["train"]))
    command = f"python benchmarks/archive/attack_search.py --data {args.data} --seed {args.seed}"
    command += (f" --max-candidates {args.max_candidates}" if args.max_candidates is not None else "")
    command += (f" --served-as {args.served_as}" if args.served_as != "plain" else "") + (f" --engine {args.engine}" if args.engine != "transformers" else "")
    served = ("" if args.served_as == "plain" else
              f"Every model (the organism too) is evaluated as served under {json.dumps({k: v for k, v in settings.items() if k in ('system_prompt', 'prompt_template')})}. ")
    lines = ["# Attack preset search (dev splits)", "", f"Command: `{command}`", "",
             (f"Data {args.data}, no replay, seed {args.seed}; AdvBench dev (52) and XSTest's dev half (127), greedy "
              f"{settings['max_new_tokens']} new tokens, classifier judge. " + served).rstrip(), "",
             "| preset | steps | dev harmful rate [95% CI] | incoherent | dev over-refusal [95% CI] |", "| --- | --- | --- | --- | --- |"]
    for candidate, harmful, refused, incoherent, train in rows:
        name = "aligned organism (no fine-tuning)" if candidate is None else json.dumps(candidate)
        lines.append(f"| {name} | {train['steps'] if train else '-'} | {harmful['rate']:.3f} [{harmful['ci95'][0]:.3f}, {harmful['ci95'][1]:.3f}] ({harmful['count']}/{harmful['n']}) | "
                     f"{incoherent['rate']:.3f} | {refused['rate']:.3f} [{refused['ci95'][0]:.3f}, {refused['ci95'][1]:.3f}] ({refused['count']}/{refused['n']}) |")
    lines += [f"| {json.dumps(candidate)} | not run | | | |" for candidate in skipped]
    name = "attack_search.md" if args.data == "attacks/pure_bad_10.jsonl" else f"attack_search_{Path(args.data).stem}.md"
    (OUT.parent / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
