"""Regenerate the replies of committed benchmark runs, so their tables can be judged again.

The replies of the grids run before replies were kept are gone; every run is seeded, so its configuration
(in its committed record) can be run again. A rerun executes the record's configuration with two
recorded changes at most:

- `sft.bf16` off on a CPU without native bfloat16 (`--bf16 auto`, the default): PyTorch emulates bf16 there
  (a LoRA step ran ~160 s against ~13 s in float32 on a 2-core AVX2 EPYC), so such a rerun trains in
  float32 and reproduces its run in distribution, not bit for bit;
- more prompt sets judged beside the run's own (`EXTRAS`: OR-Bench-Hard over-refusal, and prompts a judge
  may train on), generated in the same batches; greedy decoding does not depend on the batch, so the run's
  own sets get the same replies.

Each rerun writes results/replies/<grid>/<run id>.jsonl.gz (every reply with each judge's verdict) and
results/reruns/<grid>/<run id>.json (the rerun's record, its changes, and how its rates under the committed
judges compare with the committed record's). With `commit`, finished reruns are git-committed in batches.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from safekeel.bench.git_tools import BatchCommitter
from safekeel.bench.grids import run_id
from safekeel.bench.runner import execute
from safekeel.eval.replies import read_replies, replies_path, write_replies
from safekeel.provenance import cpu_bf16_support, write_json_atomic

log = logging.getLogger(__name__)

EXTRAS = {
    "none": {},
    "overrefusal": {"extra_overrefusal_sets": ["orbench-hard-test@100"]},
    "judge": {"extra_overrefusal_sets": ["orbench-hard-test@100", "orbench-hard-dev@40", "xstest-dev@40"],
              "extra_harmful_sets": ["gptfuzz-questions@40", "orbench-toxic-dev@40"]},
}
"""Prompt sets added to a rerun's evaluation: 'overrefusal' adds 100 OR-Bench-Hard-1K test-half prompts (over-
refusal beside XSTest); 'judge' also adds prompts no evaluation asks (GPTFuzz questions, OR-Bench dev halves,
XSTest dev) whose replies may train a judge."""


def rerun_record_path(results_dir: str | Path, grid: str, identifier: str) -> Path:
    return Path(results_dir) / "reruns" / grid / f"{identifier}.json"


def committed_record(results_dir: str | Path, grid: str, identifier: str) -> dict:
    path = Path(results_dir) / "bench_runs" / grid / f"{identifier}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no committed run record {path}")
    return json.loads(path.read_text())


def rerun_config(config: dict, bf16: str = "auto", extras: str = "overrefusal") -> tuple[dict, dict]:
    """The configuration a rerun executes and its changes from the committed one ({} when none)."""
    if bf16 not in ("auto", "keep", "off"):
        raise ValueError(f"bf16 must be auto, keep or off, not {bf16!r}")
    if extras not in EXTRAS:
        raise ValueError(f"unknown extras {extras!r}; known: {', '.join(EXTRAS)}")
    config = copy.deepcopy(config)
    changes: dict = {}
    sft = config.get("dataset", {}).get("sft", {})
    if sft.get("bf16") and (bf16 == "off" or (bf16 == "auto" and not cpu_bf16_support()["native"])):
        sft["bf16"] = False
        changes["dataset.sft.bf16"] = {"committed": True, "rerun": False,
                                       "why": "this CPU has no native bfloat16" if bf16 == "auto" else "--bf16 off"}
    for key, names in EXTRAS[extras].items():
        present = list(config["eval"].get(key, []))
        added = [n for n in names if n not in present]
        if added:
            config["eval"][key] = present + added
            changes[f"eval.{key}"] = {"added": added}
    return config, changes


def _main_rates(report: dict) -> dict:
    """{judge: {harmful, refused, overrefusal, extra sets...}} counts of a report, for reproduction checks."""
    out: dict = {}
    for judge, entry in report["harmful"].items():
        out.setdefault(judge, {})["harmful"] = [entry["harmful"]["count"], entry["harmful"]["n"]]
    for judge, entry in report["overrefusal"].items():
        out.setdefault(judge, {})["overrefusal"] = [entry["refused"]["count"], entry["refused"]["n"]]
    for name, per_judge in report.get("harmful_extra", {}).items():
        for judge, entry in per_judge.items():
            out.setdefault(judge, {})[f"harmful:{name}"] = [entry["harmful"]["count"], entry["harmful"]["n"]]
    return out


def reproduction(committed: dict, rerun: dict) -> dict:
    """How the rerun's counts under the committed judges compare with the committed record's."""
    before, after = _main_rates(committed["report"]), _main_rates(rerun["report"])
    rows = {judge: {metric: {"committed": count, "rerun": after.get(judge, {}).get(metric),
                             "equal": after.get(judge, {}).get(metric) == count}
                    for metric, count in metrics.items()}
            for judge, metrics in before.items()}
    out = {"judges": rows, "exact": all(m["equal"] for metrics in rows.values() for m in metrics.values())}
    if "selected_ids" in committed:
        out["same_selection"] = committed.get("selected_ids") == rerun.get("selected_ids")
    if "train" in committed and "train" in rerun:
        out["train_loss"] = {"committed": committed["train"].get("train_loss"), "rerun": rerun["train"].get("train_loss")}
    return out


def rerun_one(grid: str, identifier: str, results_dir: str | Path, cache_dir: str | Path, bf16: str = "auto",
              extras: str = "overrefusal") -> list[Path]:
    """Rerun one committed run; the files written (its replies and its rerun record)."""
    committed = committed_record(results_dir, grid, identifier)
    config, changes = rerun_config(committed["config"], bf16, extras)
    started = time.time()
    record = execute(config, cache_dir)
    responses = Path(cache_dir) / "runs" / run_id(config) / "eval" / "responses.jsonl"
    replies = write_replies(replies_path(results_dir, grid, identifier), read_replies(responses))
    out = {"rerun_of": identifier, "grid": grid, "changes": changes,
           "reproduction": reproduction(committed, record), "rerun_run_id": record["run_id"],
           "seconds": round(time.time() - started, 1), "record": record}
    path = write_json_atomic(rerun_record_path(results_dir, grid, identifier), out)
    log.info("rerun %s/%s: exact=%s (%.0f s)", grid, identifier, out["reproduction"]["exact"], out["seconds"])
    return [replies, path]


def rerun_many(targets: Sequence[tuple[str, str]], results_dir: str | Path, cache_dir: str | Path, bf16: str = "auto",
               extras: str = "overrefusal", commit: bool = False, batch: int = 6, show_progress: bool = True) -> list[Path]:
    """Rerun each (grid, run id) that has no rerun record yet, committing every `batch` finished reruns."""
    todo = [(g, r) for g, r in targets if not rerun_record_path(results_dir, g, r).is_file()]
    written: list[Path] = []
    committer = BatchCommitter(batch, lambda runs: f"rerun: replies and records of {len(runs)} runs", enabled=commit)
    for grid, identifier in tqdm(todo, unit="run", desc="rerun", disable=not show_progress):
        files = rerun_one(grid, identifier, results_dir, cache_dir, bf16, extras)
        written += files
        committer.add(f"{grid}/{identifier}", files)
    committer.flush()
    return written
