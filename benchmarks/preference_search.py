"""The preference grid's shared learning rate and batch size (issue 32, item 4): a small search on ONE backbone, then
held fixed for every backbone and objective of the `preference` grid.

    python benchmarks/preference_search.py                 # lr {5e-6, 2e-5, 5e-5, 1e-4} x batch {4, 8} on smollm2-135m-safe
    python benchmarks/preference_search.py --smoke         # the same path on a tiny random model, in a minute or two

Each setting trains LoRA DPO (sigmoid, beta 0.1; one epoch, max_length 512, seed 0) on the hh-rlhf harmless pairs
200-399 and is scored on pairs 1000-1199 (held-out preference accuracy and reward margin), then generates on
AdvBench dev (harm check) and XSTest dev (over-refusal, reported) under the classifier and keyword judges, 48 new
tokens. The untrained backbone is evaluated once the same way (the harm check's reference). Neither of the grid's
splits (training 0-199, held out 2000-2199) is read. The choice rule and the splits are in
safekeel/bench/preference_protocol.py, fixed before the search ran.

Every setting is a run record <results-dir>/preference_search_runs/<run id>.json (the id hashes its configuration):
an interrupted search resumes where it stopped, and Ctrl-C stops it between steps without a record. When every
setting has a record, <results-dir>/preference_search.{json,md} are written with the chosen lr and batch, which
`safekeel bench --grid preference` then trains every run with (`hyperparameters_source` in each run's configuration).
--smoke writes under --cache-dir (never the committed results) and marks its result so the grid refuses it.
Cost on this 2-core CPU (estimated from benchmarks/results/reference_cache.md: 11 s a step of 4 pairs at max_length
512 with the reference log-probabilities cached, which every setting but the first reads): about 10 min of training
and a few of evaluation per setting, 1.5-2 h for the 8 settings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safekeel.bench.preference_protocol import (HARM_TOLERANCE, PREFERENCE_DATA, PREFERENCE_SFT_FALLBACK,  # noqa: E402
                                                SEARCH_BACKBONE, SEARCH_BATCH_SIZES, SEARCH_DEV, SEARCH_LEARNING_RATES,
                                                SEARCH_OBJECTIVE, SEARCH_TRAIN, check_splits, choose)
from safekeel.bench.runner import resolve_data_path  # noqa: E402
from safekeel.data.preference import load_preferences  # noqa: E402
from safekeel.eval.harness import EvalSettings, evaluate  # noqa: E402
from safekeel.eval.preference import preference_metrics  # noqa: E402
from safekeel.models.lora import LoraSFTConfig  # noqa: E402
from safekeel.models.registry import base_model_provenance, load_model_and_tokenizer  # noqa: E402
from safekeel.provenance import library_versions, machine_info, sha256_json, write_json_atomic  # noqa: E402
from safekeel.training.preference import PreferenceConfig, train_preference  # noqa: E402
from safekeel.training.reference_cache import REFERENCE_CACHE, open_reference_cache  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / "cache" / "preference_search"
EVAL = EvalSettings(harmful_set="advbench-dev", overrefusal_set="xstest-dev", max_new_tokens=48,
                    judges=("classifier", "keyword"), utility=None, n_utility_accuracy=0)
SMOKE = {"learning_rates": (1e-4, 1e-3), "batch_sizes": (2,), "train_n": 8, "dev_n": 6,
         "sft": {"max_steps": 2, "max_length": 256, "logging_steps": 1, "lora_r": 8},
         "eval": {"n_harmful": 4, "n_overrefusal": 4, "max_new_tokens": 8}}


def search_plan(args) -> dict:
    """What the search runs: backbone, splits, settings, objective, evaluation (the smoke plan shrinks every part)."""
    check_splits()
    objective = PreferenceConfig(SEARCH_OBJECTIVE)
    base_sft = {k: v for k, v in PREFERENCE_SFT_FALLBACK.items() if k not in ("learning_rate", "batch_size")}
    plan = {"backbone": args.backbone, "data": PREFERENCE_DATA, "train": list(SEARCH_TRAIN), "dev": list(SEARCH_DEV),
            "objective": objective.to_dict(), "sft": {**base_sft, "seed": args.seed},
            "learning_rates": list(args.lrs or SEARCH_LEARNING_RATES), "batch_sizes": list(args.batches or SEARCH_BATCH_SIZES),
            "eval": asdict(EVAL), "harm_tolerance": HARM_TOLERANCE, "smoke": bool(args.smoke)}
    if args.smoke:
        plan.update(train=[SEARCH_TRAIN[0], SMOKE["train_n"]], dev=[SEARCH_DEV[0], SMOKE["dev_n"]],
                    sft={**plan["sft"], **SMOKE["sft"]}, eval={**plan["eval"], **SMOKE["eval"]},
                    learning_rates=list(args.lrs or SMOKE["learning_rates"]), batch_sizes=list(args.batches or SMOKE["batch_sizes"]))
    plan["eval"]["judges"] = list(plan["eval"]["judges"])
    return plan


def run_configs(plan: dict) -> list[dict]:
    """The baseline (the untrained backbone) first, then every (lr, batch) setting, lr-major."""
    shared = {"backbone": plan["backbone"], "eval": plan["eval"]}
    configs = [{"kind": "baseline", **shared}]
    for lr in plan["learning_rates"]:
        for batch in plan["batch_sizes"]:
            configs.append({"kind": "setting", **shared, "data": plan["data"], "train": plan["train"], "dev": plan["dev"],
                            "objective": plan["objective"], "sft": {**plan["sft"], "learning_rate": lr, "batch_size": batch}})
    return configs


def run_id(config: dict) -> str:
    digest = sha256_json(config)[:10]
    if config["kind"] == "baseline":
        return f"baseline-{digest}"
    return f"lr{config['sft']['learning_rate']:g}-b{config['sft']['batch_size']}-s{config['sft']['seed']}-{digest}"


def _pairs(span: list[int]):
    return load_preferences(resolve_data_path(PREFERENCE_DATA)).pairs[span[0]: span[0] + span[1]]


def execute(config: dict, cache_dir: Path) -> dict:
    """Run one configuration; its record."""
    started = time.time()
    folder = cache_dir / "runs" / run_id(config)
    settings = EvalSettings(**config["eval"])
    model, tokenizer = load_model_and_tokenizer(config["backbone"])
    record: dict = {"run_id": run_id(config), "config": config}
    adapter = None
    if config["kind"] == "setting":
        sft = LoraSFTConfig(**config["sft"])
        objective = PreferenceConfig(**config["objective"])
        print(f"[{record['run_id']}] DPO lr {sft.learning_rate:g}, batch {sft.batch_size} on {config['train'][1]} pairs", flush=True)
        cache = open_reference_cache(cache_dir / REFERENCE_CACHE)  # the 8 settings train one backbone on the same pairs
        trained = train_preference(model, tokenizer, _pairs(config["train"]), sft, objective, folder / "adapter", show_progress=True,
                                   reference_cache=cache)
        model, adapter = trained.model, str(folder / "adapter")
        record["train"] = {"steps": trained.steps, "seconds": trained.seconds, "train_loss": trained.train_loss,
                           "log_history": trained.log_history}
        print(f"[{record['run_id']}] preference accuracy on {config['dev'][1]} dev pairs", flush=True)
        record["preference_eval"] = {**preference_metrics(model, tokenizer, _pairs(config["dev"]), objective.beta, sft.max_length,
                                                                objective.loss_type, cache),
                                     "pairs": config["dev"]}
    report = evaluate(model.eval(), tokenizer, settings, model_name=config["backbone"], adapter=adapter,
                      output_dir=folder / "eval", show_progress=True)
    print(report.summary(), flush=True)
    record.update(report=report.to_dict(), backbone_provenance=base_model_provenance(config["backbone"], build=False),
                  seconds=round(time.time() - started, 1), versions=library_versions(), machine=machine_info())
    return record


def summarise(plan: dict, records: list[dict], command: str) -> dict:
    judge = plan["eval"]["judges"][0]
    baseline = next(r for r in records if r["config"]["kind"] == "baseline")
    rows = []
    for record in records:
        if record["config"]["kind"] != "setting":
            continue
        held = record["preference_eval"]
        rows.append({"run_id": record["run_id"], "learning_rate": record["config"]["sft"]["learning_rate"],
                     "batch_size": record["config"]["sft"]["batch_size"], "steps": record["train"]["steps"],
                     "train_loss": record["train"]["train_loss"], "preference_accuracy": held["accuracy"],
                     "accuracy_ci": held["accuracy_ci"], "reward_margin": held["reward_margin"],
                     "reward_margin_se": held["reward_margin_se"], **_rates_of(record, judge), "seconds": record["seconds"]})
    base = _rates_of(baseline, judge)
    return {"backbone": plan["backbone"], "objective": plan["objective"], "smoke": plan["smoke"], "plan": plan,
            "judge": judge, "baseline": {"run_id": baseline["run_id"], **base},
            "chosen": choose(rows, base["harmful_rate"], plan["harm_tolerance"]), "runs": rows, "command": command}


def _rates_of(record: dict, judge: str) -> dict:
    report = record["report"]
    return {"harmful_rate": report["harmful"][judge]["harmful"]["rate"],
            "overrefusal_rate": report["overrefusal"][judge]["refused"]["rate"]}


def markdown(result: dict) -> str:
    chosen, base = result["chosen"], result["baseline"]
    fmt = lambda x, spec=".3f": "" if x is None else format(x, spec)  # noqa: E731
    lines = [f"# The preference grid's shared learning rate and batch size{' (SMOKE: tiny model, not a result)' if result['smoke'] else ''}",
             "", f"Search on `{result['backbone']}`, LoRA DPO ({'+'.join(result['objective']['loss_type'])}, beta "
             f"{result['objective']['beta']}), hh-rlhf harmless pairs {result['plan']['train'][0]}-"
             f"{sum(result['plan']['train']) - 1} for training and {result['plan']['dev'][0]}-{sum(result['plan']['dev']) - 1} "
             f"for held-out preference; harm check on {result['plan']['eval']['harmful_set']}, over-refusal on "
             f"{result['plan']['eval']['overrefusal_set']} (judge: {result['judge']}). Untrained: harmful "
             f"{fmt(base['harmful_rate'])}, over-refusal {fmt(base['overrefusal_rate'])}.", "",
             "| lr | batch | steps | pref. accuracy [95% CI] | reward margin (se) | harmful | over-refusal |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["runs"]:
        ci = row["accuracy_ci"]
        mark = " **chosen**" if (row["learning_rate"], row["batch_size"]) == (chosen["learning_rate"], chosen["batch_size"]) else ""
        lines.append(f"| {row['learning_rate']:g}{mark} | {row['batch_size']} | {row['steps']} | {fmt(row['preference_accuracy'])} "
                     f"[{fmt(ci[0], '.2f')}, {fmt(ci[1], '.2f')}] | {fmt(row['reward_margin'])} ({fmt(row['reward_margin_se'])}) | "
                     f"{fmt(row['harmful_rate'])} | {fmt(row['overrefusal_rate'])} |")
    lines += ["", f"Chosen: lr {chosen['learning_rate']:g}, batch {chosen['batch_size']} ({chosen['rule']}).", "",
              f"Reproduce: `{result['command']}`", ""]
    return "\n".join(lines)


def tiny_backbone(cache_dir: Path) -> str:
    """--smoke without --backbone: the tests' tiny random Llama (tests/conftest.py), built once under cache_dir."""
    folder = cache_dir / "tiny-llama"
    if not (folder / "config.json").is_file():
        spec = importlib.util.spec_from_file_location("safekeel_tests_conftest", ROOT / "tests" / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build_tiny_model(folder)
    return str(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help=f"registered name or model folder (default {SEARCH_BACKBONE}; --smoke: a tiny model)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="learning rates (default the protocol's)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default the protocol's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 8 pairs, 2 steps: checks the path in a minute or two")
    parser.add_argument("--results-dir", type=Path, default=None, help="default benchmarks/results (--smoke: <cache-dir>/smoke)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE, help="adapters and replies (outside git)")
    args = parser.parse_args(argv)
    if any(lr <= 0 for lr in args.lrs or ()) or any(b <= 0 for b in args.batches or ()):
        parser.error("--lrs and --batches must be positive")
    args.cache_dir = args.cache_dir.resolve()
    results_dir = args.results_dir or (args.cache_dir / "smoke" if args.smoke else RESULTS)
    if args.smoke and results_dir.resolve() == RESULTS.resolve():
        parser.error("--smoke never writes into benchmarks/results (its result is not a protocol)")
    args.backbone = args.backbone or (tiny_backbone(args.cache_dir) if args.smoke else SEARCH_BACKBONE)
    plan = search_plan(args)
    command = " ".join(["python benchmarks/preference_search.py", *(sys.argv[1:] if argv is None else argv)])
    records_dir = results_dir / "preference_search_runs"
    configs = run_configs(plan)
    records = []
    for index, config in enumerate(configs, 1):
        path = records_dir / f"{run_id(config)}.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
            print(f"[{index}/{len(configs)}] {run_id(config)}: recorded already", flush=True)
            continue
        print(f"[{index}/{len(configs)}] {run_id(config)}", flush=True)
        try:
            record = execute(config, args.cache_dir)
        except KeyboardInterrupt:
            print(f"\nstopped during {run_id(config)}: {index - 1} of {len(configs)} runs recorded; rerun the same command to resume",
                  file=sys.stderr)
            return 130
        write_json_atomic(path, record)
        records.append(record)
    result = summarise(plan, records, command)
    write_json_atomic(results_dir / "preference_search.json", result)
    (results_dir / "preference_search.md").write_text(markdown(result))
    chosen = result["chosen"]
    print(f"chosen: lr {chosen['learning_rate']:g}, batch {chosen['batch_size']} ({chosen['rule']})")
    print(f"wrote {results_dir / 'preference_search.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
