"""The package's one JSON Lines reader and writer: plain or gzip-compressed (by a `.gz` name), one JSON value
per line, blank lines skipped. A line that is not JSON raises a DatasetError naming the file and the line.

(Uploaded datasets go through `safekeel.data.formats`, which validates record by record and can skip bad lines;
this module is for files the package itself reads and writes.)
"""

from __future__ import annotations

import gzip
import io
import json
import os
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

from safekeel.data.formats import DatasetError

Source = Union[str, "os.PathLike[str]", Traversable]
"""A file path, or a package resource (importlib.resources.files(...) / name)."""


def read_text(source: Source) -> str:
    """The text of a JSONL file (UTF-8), decompressed when its name ends in .gz."""
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
    raw = source.read_bytes()
    try:
        return (gzip.decompress(raw) if source.name.endswith(".gz") else raw).decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(str(source), None, None, f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (OSError, EOFError) as error:  # gzip.BadGzipFile, a truncated stream
        raise DatasetError(str(source), None, None, f"not a readable gzip file ({error})") from None


def iter_jsonl(source: Source) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line, numbered from 1 as an editor shows them."""
    for number, line in enumerate(read_text(source).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(str(source), number, None, f"invalid JSON: {error.msg} (column {error.colno})") from None


def read_jsonl(source: Source) -> list[Any]:
    """Every value of a JSONL file (.jsonl or .jsonl.gz, a path or a package resource), in file order."""
    return [value for _, value in iter_jsonl(source)]


def dumps_jsonl(rows: Iterable[Any], *, sort_keys: bool = False, ensure_ascii: bool = True) -> str:
    return "".join(json.dumps(row, ensure_ascii=ensure_ascii, sort_keys=sort_keys) + "\n" for row in rows)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any], *, sort_keys: bool = False, ensure_ascii: bool = True,
                compress: bool | None = None) -> Path:
    """Write rows as JSON lines, atomically (a temporary file renamed into place). Compressed when `compress`
    (default: when the name ends in .gz), byte-for-byte reproducibly: level 9, no timestamp, no file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dumps_jsonl(rows, sort_keys=sort_keys, ensure_ascii=ensure_ascii).encode("utf-8")
    if path.name.endswith(".gz") if compress is None else compress:
        buffer = io.BytesIO()
        with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as handle:
            handle.write(data)
        data = buffer.getvalue()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
