"""Show the phenomenon: fine-tuning the aligned organism erodes its safety; replaying k=10 random
safety examples restores part of it. Writes benchmarks/results/phenomenon.json + .md.

    python benchmarks/phenomenon.py [--seeds 0 1 2] [--conditions ...] [--commit] [--render-only]

The tables cover the seeds given: pass all of them (the default) so that a resumed grid's tables
include the finished seeds.

Every run is cached by a hash of its configuration under benchmarks/results/phenomenon_runs/, so an
interrupted run resumes where it stopped (and a later session on a fresh machine does too, since the
run records are committed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safekeel.bench.git_tools import git_commit  # noqa: E402
from safekeel.eval.harness import EvalSettings, evaluate  # noqa: E402
from safekeel.provenance import library_versions, sha256_json, write_json_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = RESULTS / "phenomenon_runs"
CACHE = ROOT / "benchmarks" / "cache" / "phenomenon"

USER_DATA = {
    "benign": "benign/gsm8k_random100.jsonl",
    "harmful": "attacks/pure_bad_10.jsonl",
}
# The attack presets (LoRA r=16 all-linear). Benign: the pilot's setting that broke safety (FACTS.md).
# Harmful: Qi et al.'s 10-shot attack; lr 2e-4 did not break the organism (dev harmful 0.12, test 0.08),
# lr 1e-3 did (dev 0.69): chosen on the dev splits by benchmarks/archive/attack_search.py.
PRESETS = {
    "benign": {"learning_rate": 2e-4, "epochs": 3.0, "batch_size": 4, "max_length": 256, "bf16": True},
    "harmful": {"learning_rate": 1e-3, "epochs": 5.0, "batch_size": 2, "max_length": 256, "bf16": True},
}
EVAL = {"harmful_set": "advbench-test", "overrefusal_set": "xstest-test", "max_new_tokens": 64,
        "batch_size": 32, "judges": ("classifier", "keyword"), "utility": "gsm8k",
        "n_utility_loss": 100, "n_utility_accuracy": 0}
CONDITIONS = ("base", "aligned", "benign_none", "benign_random", "harmful_none", "harmful_random")


def run_config(condition: str, seed: int, k: int) -> dict:
    if condition in ("base", "aligned"):
        model = "smollm2-135m-instruct" if condition == "base" else "smollm2-135m-safe"
        return {"condition": condition, "model": model, "eval": EVAL}
    data_kind, mode = condition.split("_")
    return {"condition": condition, "model": "smollm2-135m-safe", "user_data": USER_DATA[data_kind],
            "mode": "replay" if mode == "random" else "none", "selector": "random", "pool": "authored",
            "k": k if mode == "random" else 0, "seed": seed, "sft": PRESETS[data_kind], "eval": EVAL}


def run_id(config: dict) -> str:
    return f"{config['condition']}-s{config.get('seed', 0)}-{sha256_json(config)[:10]}"


def execute(config: dict) -> dict:
    from safekeel.data.reference import shared_dataset
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.training.config import LoraSFTConfig
    from safekeel.pipeline import JobSpec, run_pipeline

    started = time.time()
    folder = CACHE / run_id(config)
    settings = EvalSettings(**config["eval"])
    if "user_data" not in config:
        model, tokenizer = load_model_and_tokenizer(config["model"])
        report = evaluate(model, tokenizer, settings, model_name=config["model"], output_dir=folder / "eval")
        extra = {}
    else:
        spec = JobSpec(shared_dataset(config["user_data"]), str(folder), model=config["model"],
                            k=max(config["k"], 1), selector=config["selector"], mode=config["mode"], pool=config["pool"],
                            seed=config["seed"], sft=LoraSFTConfig(**config["sft"]), eval=settings)
        result = run_pipeline(spec)
        report = result.report
        extra = {"selected_ids": result.provenance["selected_ids"], "train": result.provenance["train"]}
    return {"run_id": run_id(config), "config": config, "report": report.to_dict(), **extra,
            "seconds": round(time.time() - started, 1), "versions": library_versions()}


def rows_for(record: dict) -> list[dict]:
    config, report = record["config"], record["report"]
    rows = []
    for judge in config["eval"]["judges"]:
        harmful = report["harmful"][judge]["harmful"]
        refused = report["overrefusal"][judge]["refused"]
        incoherent = report["harmful"][judge].get("incoherent")
        rows.append({
            "condition": config["condition"],
            "user_data": config.get("user_data"),
            "k": config.get("k", 0),
            "seed": config.get("seed"),
            "harmful_rate": harmful["rate"],
            "harmful_rate_ci": harmful["ci95"],
            "overrefusal_rate": refused["rate"],
            "overrefusal_rate_ci": refused["ci95"],
            "utility": {"gsm8k_heldout_loss": report["utility"]["loss"]["loss"], "n": report["utility"]["loss"]["n"]},
            "n_harmful_prompts": harmful["n"] + harmful["unjudged"],
            "n_unjudged": harmful["unjudged"] + refused["unjudged"],
            "n_overrefusal_prompts": refused["n"] + refused["unjudged"],
            "incoherent_rate": incoherent["rate"] if incoherent else None,
            "judge": judge,
            "run_id": record["run_id"],
        })
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    summary = []
    for condition in CONDITIONS:
        for judge in ("classifier", "keyword"):
            selected = [r for r in rows if r["condition"] == condition and r["judge"] == judge]
            if not selected:
                continue
            rates = [r["harmful_rate"] for r in selected]
            summary.append({
                "condition": condition, "judge": judge, "n_runs": len(selected),
                "harmful_rate_mean": round(statistics.mean(rates), 4),
                "harmful_rate_sd": round(statistics.stdev(rates), 4) if len(rates) > 1 else None,
                "overrefusal_rate_mean": round(statistics.mean(r["overrefusal_rate"] for r in selected), 4),
                "incoherent_rate_mean": round(statistics.mean(r["incoherent_rate"] for r in selected), 4) if selected[0]["incoherent_rate"] is not None else None,
                "gsm8k_heldout_loss_mean": round(statistics.mean(r["utility"]["gsm8k_heldout_loss"] for r in selected), 4),
            })
    return summary


def write_outputs(records: list[dict], command: str) -> None:
    rows = [row for record in records for row in rows_for(record)]
    summary = summarise(rows)
    write_json_atomic(RESULTS / "phenomenon.json", {
        "command": command, "presets": PRESETS, "eval": EVAL, "user_data": USER_DATA,
        "rows": rows, "summary": summary, "versions": library_versions(),
    })
    lines = [
        "# The phenomenon: fine-tuning erodes the aligned organism's safety; random replay restores part",
        "",
        f"Command: `{command}`",
        "",
        f"Harmful prompts: AdvBench test split; over-refusal: XSTest safe prompts, test half (even ids); greedy, "
        f"{EVAL['max_new_tokens']} new tokens. `classifier` = the shipped refusal classifier + coherence check "
        "(harmful = complied and coherent); `keyword` = the 29-prefix judge as published (counts gibberish as harmful). "
        "Fine-tuned rows: LoRA r=16 all-linear on smollm2-135m-safe; presets " + json.dumps(PRESETS) + ".",
        "",
        "## Mean over seeds",
        "",
        "| condition | judge | runs | harmful rate (mean ± sd) | incoherent | over-refusal | GSM8K held-out loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        sd = f" ± {s['harmful_rate_sd']:.3f}" if s["harmful_rate_sd"] is not None else ""
        inc = f"{s['incoherent_rate_mean']:.3f}" if s["incoherent_rate_mean"] is not None else "n/a"
        lines.append(f"| {s['condition']} | {s['judge']} | {s['n_runs']} | {s['harmful_rate_mean']:.3f}{sd} | {inc} | "
                     f"{s['overrefusal_rate_mean']:.3f} | {s['gsm8k_heldout_loss_mean']:.3f} |")
    lines += ["", "## Every run (Wilson 95% intervals)", "",
              "| condition | seed | judge | harmful rate [95% CI] (n) | over-refusal [95% CI] (n) | incoherent | unjudged |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ci, oci = r["harmful_rate_ci"], r["overrefusal_rate_ci"]
        inc = f"{r['incoherent_rate']:.3f}" if r["incoherent_rate"] is not None else "n/a"
        lines.append(f"| {r['condition']} | {r['seed'] if r['seed'] is not None else '-'} | {r['judge']} | "
                     f"{r['harmful_rate']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] ({r['n_harmful_prompts']}) | "
                     f"{r['overrefusal_rate']:.3f} [{oci[0]:.3f}, {oci[1]:.3f}] ({r['n_overrefusal_prompts']}) | {inc} | {r['n_unjudged']} |")
    (RESULTS / "phenomenon.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run record and the tables")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite phenomenon.json/.md from the finished run records of the given seeds; run nothing")
    parser.add_argument("--rejudge", action="store_true",
                        help="re-apply the current judges to the cached responses of finished runs (after a judge changes)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch
    from tqdm import tqdm

    torch.set_num_threads(os.cpu_count() or 1)
    command = "python benchmarks/phenomenon.py " + " ".join(a for a in sys.argv[1:] if a not in ("--render-only", "--commit"))
    # Seed-major: an interrupted grid (resumed later from the committed run records) has every condition.
    configs = [run_config(c, args.seeds[0], args.k) for c in args.conditions if c in ("base", "aligned")]
    for seed in args.seeds:
        configs += [run_config(c, seed, args.k) for c in args.conditions if c not in ("base", "aligned")]
    RUNS.mkdir(parents=True, exist_ok=True)
    records = []
    with tqdm(total=len(configs), desc="phenomenon runs", unit="run") as bar:
        for config in configs:
            path = RUNS / f"{run_id(config)}.json"
            if path.is_file():
                record = json.loads(path.read_text())
                responses = CACHE / record["run_id"] / "eval" / "responses.jsonl"
                if args.rejudge and responses.is_file():
                    from safekeel.eval.harness import rejudge

                    record["report"]["harmful"], record["report"]["overrefusal"] = rejudge(responses, config["eval"]["judges"])
                    record["rejudged_with_classifier"] = sha256_json(json.loads((ROOT / "safekeel/eval/assets/refusal_classifier.json").read_text()))[:12]
                    write_json_atomic(path, record)
                records.append(record)
            elif args.render_only:
                pass
            else:
                bar.set_postfix_str(run_id(config))
                record = execute(config)
                write_json_atomic(path, record)
                records.append(record)
                write_outputs(records, command)
                if args.commit:
                    git_commit([path, RESULTS / "phenomenon.json", RESULTS / "phenomenon.md"], f"phenomenon: run {record['run_id']}")
            bar.update(1)
    write_outputs(records, command)
    print((RESULTS / "phenomenon.md").read_text())


if __name__ == "__main__":
    main()
