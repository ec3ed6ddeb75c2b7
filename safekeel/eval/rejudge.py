"""`safekeel rejudge`: judge kept replies again, without generating anything.

A target is a grid name (every run of benchmarks/results/bench_runs/<grid>/ that has kept replies), a run
record (.json) or a replies file (.jsonl.gz / responses.jsonl). A run's replies are
results/replies/<grid>/<run id>.jsonl.gz; when they come from a rerun (results/reruns/<grid>/<run id>.json),
the rerun's record is the one rejudged (its replies are the rerun's), and the rerun's changes are reported.

For each run: the judge's rates recomputed from the replies, and, where the record holds rates of the same
judge, whether the recomputed counts equal them (a check that the kept replies are the ones judged).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from safekeel.eval.harness import rejudge_rows
from safekeel.eval.replies import read_replies, replies_path


@dataclass
class KeptRun:
    grid: str
    run_id: str
    record: dict | None
    """The record whose replies these are (a rerun's own record for rerun replies), None for a bare replies file."""
    replies: Path
    changes: dict = field(default_factory=dict)
    """How the replies' run differed from the committed run (reruns), {} when they are the committed run's."""


def find_runs(target: str, results_dir: str | Path) -> list[KeptRun]:
    """The runs a target names that have kept replies (a grid's runs without replies are skipped)."""
    results_dir = Path(results_dir)
    path = Path(target)
    if path.suffix == ".gz" or path.name.endswith(".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"no replies file {path}")
        return [KeptRun(path.parent.name, path.name.split(".")[0], None, path)]
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"no run record {path}")
        return _kept(results_dir, path.parent.name, path.stem, json.loads(path.read_text()), required=True)
    runs_dir = results_dir / "bench_runs" / target
    if not runs_dir.is_dir():
        known = sorted(p.name for p in (results_dir / "bench_runs").glob("*") if p.is_dir())
        raise FileNotFoundError(f"{target!r} is neither a replies file, a run record nor a grid (grids: {', '.join(known)})")
    out: list[KeptRun] = []
    for record_path in sorted(runs_dir.glob("*.json")):
        out += _kept(results_dir, target, record_path.stem, json.loads(record_path.read_text()), required=False)
    return out


def _kept(results_dir: Path, grid: str, run_id: str, committed: dict, required: bool) -> list[KeptRun]:
    replies = replies_path(results_dir, grid, run_id)
    if not replies.is_file():
        if required:
            raise FileNotFoundError(f"run {run_id} has no kept replies ({replies}): rerun it with benchmarks/rerun.py")
        return []
    rerun = results_dir / "reruns" / grid / f"{run_id}.json"
    if rerun.is_file():
        data = json.loads(rerun.read_text())
        return [KeptRun(grid, run_id, data["record"], replies, data.get("changes", {}))]
    return [KeptRun(grid, run_id, committed, replies)]


def _counts(summary: dict, metric: str) -> list[int] | None:
    entry = summary.get(metric)
    return [entry["count"], entry["n"]] if entry else None


def rejudge_run(run: KeptRun, judges: Sequence[str]) -> dict:
    """{"summaries": rejudged rates, "reproduces": {judge: bool} for judges the record already holds, "record":
    the record with the judges' rates put in (a copy)}."""
    rows = read_replies(run.replies)
    summaries = rejudge_rows(rows, judges)
    reproduces: dict[str, bool] = {}
    record = copy.deepcopy(run.record) if run.record is not None else None
    if record is not None:
        report = record["report"]
        for judge in judges:
            if judge in report["harmful"]:
                same = all(_counts(report["harmful"][judge], m) == _counts(summaries["harmful"][judge], m)
                           for m in ("harmful", "refused"))
                same = same and _counts(report["overrefusal"][judge], "refused") == _counts(summaries["safe"][judge], "refused")
                reproduces[judge] = same
            report["harmful"][judge] = summaries["harmful"][judge]
            report["overrefusal"][judge] = summaries["safe"][judge]
            for kind, section in (("harmful_extra", "harmful_extra"), ("safe_extra", "overrefusal_extra")):
                for name, per_judge in summaries[kind].items():
                    report.setdefault(section, {}).setdefault(name, {})[judge] = per_judge[judge]
    return {"summaries": summaries, "reproduces": reproduces, "record": record}


def _rate_text(entry: dict | None) -> str:
    return "-" if not entry or entry.get("rate") is None else f"{entry['rate']:.3f} ({entry['count']}/{entry['n']})"


def rejudge_table(targets: Sequence[str], judge: str, results_dir: str | Path, out_dir: str | Path | None = None) -> tuple[str, list[dict]]:
    """A markdown table of every target run rejudged by `judge`, and the per-run results. With out_dir, the
    rejudged records are written to out_dir/bench_runs/<grid>/<run id>.json."""
    from safekeel.provenance import write_json_atomic

    lines = [f"| grid | run | harmful [{judge}] | refused | incoherent | hollow | over-refusal | reproduces | rerun changes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    results = []
    for target in targets:
        for run in find_runs(target, results_dir):
            result = rejudge_run(run, [judge])
            harmful = result["summaries"]["harmful"][judge]
            safe = result["summaries"]["safe"][judge]
            reproduces = result["reproduces"].get(judge)
            lines.append(f"| {run.grid} | {run.run_id} | {_rate_text(harmful.get('harmful'))} | {_rate_text(harmful.get('refused'))} | "
                         f"{_rate_text(harmful.get('incoherent'))} | {_rate_text(harmful.get('hollow'))} | {_rate_text(safe.get('refused'))} | "
                         f"{'-' if reproduces is None else ('yes' if reproduces else 'NO')} | {', '.join(sorted(run.changes)) or '-'} |")
            results.append({"grid": run.grid, "run_id": run.run_id, "reproduces": reproduces, "changes": run.changes,
                            "summaries": result["summaries"]})
            if out_dir is not None and result["record"] is not None:
                write_json_atomic(Path(out_dir) / "bench_runs" / run.grid / f"{run.run_id}.json", result["record"])
    if not results:
        raise FileNotFoundError(f"none of {list(targets)} has kept replies under {results_dir}")
    return "\n".join(lines), results
