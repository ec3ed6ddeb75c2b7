"""Replies kept: every evaluated reply with each judge's verdict, as (gzip-compressed) JSON lines.

A row is {"set", "kind" (harmful | safe | harmful_extra | safe_extra), "id" (the prompt's id in its set),
"prompt", "response", "error", "judgements": {judge: {refused, coherent, reason, score, ...}}}, in the order
the evaluation generated them. Benchmark run records keep theirs beside them, compressed:
benchmarks/results/replies/<grid>/<run id>.jsonl.gz (`safekeel rejudge` reads them back).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterable


def read_replies(path: str | Path) -> list[dict]:
    """Rows of a responses.jsonl or a .jsonl.gz replies file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no replies file at {path}")
    raw = path.read_bytes()
    text = gzip.decompress(raw).decode() if path.suffix == ".gz" else raw.decode()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for number, row in enumerate(rows, 1):
        missing = {"kind", "prompt", "response"} - set(row)
        if missing:
            raise ValueError(f"{path}:{number}: a replies row needs {sorted(missing)}")
    return rows


def _compact(row: dict) -> dict:
    """A row without empty fields (reasons and errors are mostly empty): smaller files, same content."""
    judgements = {name: {k: v for k, v in j.items() if v not in ("", None)} | {"refused": j.get("refused")}
                  for name, j in row.get("judgements", {}).items()}
    out = {k: v for k, v in row.items() if k != "judgements" and v is not None}
    return out | {"judgements": judgements}


def write_replies(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows as gzip-compressed JSON lines, atomically and byte-for-byte reproducibly (no timestamp)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(_compact(row), ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as handle:
        handle.write(text.encode())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path


def replies_path(results_dir: str | Path, grid: str, run_id: str) -> Path:
    """Where a benchmark run's replies are kept beside its record."""
    return Path(results_dir) / "replies" / grid / f"{run_id}.jsonl.gz"
