"""Replies kept: every evaluated reply with each judge's verdict, as (gzip-compressed) JSON lines.

A row is {"set", "kind" (harmful | safe | harmful_extra | safe_extra), "id" (the prompt's id in its set),
"prompt", "response", "error", "judgements": {judge: {refused, coherent, reason, score, ...}}}, in the order
the evaluation generated them. Benchmark run records keep theirs beside them, compressed:
benchmarks/results/replies/<grid>/<run id>.jsonl.gz (`safekeel rejudge` reads them back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from safekeel.data.jsonl import iter_jsonl, write_jsonl


def read_replies(path: str | Path) -> list[dict]:
    """Rows of a responses.jsonl or a .jsonl.gz replies file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no replies file at {path}")
    rows = []
    for number, row in iter_jsonl(path):
        missing = {"kind", "prompt", "response"} - set(row)
        if missing:
            raise ValueError(f"{path}:{number}: a replies row needs {sorted(missing)}")
        rows.append(row)
    return rows


def _compact(row: dict) -> dict:
    """A row without empty fields (reasons and errors are mostly empty): smaller files, same content."""
    judgements = {name: {k: v for k, v in j.items() if v not in ("", None)} | {"refused": j.get("refused")}
                  for name, j in row.get("judgements", {}).items()}
    out = {k: v for k, v in row.items() if k != "judgements" and v is not None}
    return out | {"judgements": judgements}


def write_replies(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows as gzip-compressed JSON lines, atomically and byte-for-byte reproducibly (no timestamp)."""
    return write_jsonl(path, (_compact(row) for row in rows), sort_keys=True, ensure_ascii=False, compress=True)


def replies_path(results_dir: str | Path, grid: str, run_id: str) -> Path:
    """Where a benchmark run's replies are kept beside its record."""
    return Path(results_dir) / "replies" / grid / f"{run_id}.jsonl.gz"
