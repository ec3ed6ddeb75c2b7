"""A home for the public evaluation data: which sets safekeel reads, where each file is found, and fetching them.

The manifest (`sources.json` beside this module) lists every public set the evaluations, the gate, the judges,
the monitors and the benchmark grids read: per file its path under the data folder, size, sha256 (of the bytes
every committed result was computed with), license and canonical URL. A file is looked for, in order, in
$SAFEKEEL_SHARED_DATA (when set), $SAFEKEEL_HOME/data (where `safekeel data fetch` downloads to) and
../shared/data beside the checkout. When none has it, `data_file` raises a MissingDataError that says which
command to run, which variable to set and which file is missing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import socket
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

from safekeel.paths import data_home, data_search_path

FETCH_TIMEOUT_S = 60.0


class MissingDataError(FileNotFoundError):
    """A reference data file is in none of the data folders; the message says how to get it."""


class ChecksumMismatch(ValueError):
    """Downloaded (or found) bytes differ from the sha256 the manifest records."""


class FetchError(OSError):
    """A set could not be downloaded (no network, an HTTP error, no canonical URL)."""


@dataclass(frozen=True)
class DataFile:
    path: str
    """Relative to the data folder, e.g. 'harmful_eval/advbench_test.json'."""
    sha256: str
    bytes: int
    url: str | None
    """Where `safekeel data fetch` downloads it from; None for a derived file (see `derived`)."""
    extract: Mapping[str, str] | None = None
    """{"csv_column": name}: the file is that column of the downloaded CSV, one value per line, no header."""
    derived: str | None = None
    """How a file without a canonical URL was made (so it cannot be downloaded as is)."""


@dataclass(frozen=True)
class DataSet:
    name: str
    title: str
    license: str
    used_by: str
    files: tuple[DataFile, ...]
    core: bool = False
    """Needed by `safekeel eval` and the safety gate with their defaults (AdvBench, XSTest, GSM8K)."""


@lru_cache(maxsize=1)
def manifest() -> dict[str, DataSet]:
    """The public sets, by name (the shipped sources.json)."""
    raw = json.loads((resources.files("safekeel.data") / "sources.json").read_text(encoding="utf-8"))
    return {name: DataSet(name, entry["title"], entry["license"], entry["used_by"],
                          tuple(DataFile(**f) for f in entry["files"]), entry.get("core", False))
            for name, entry in raw["sets"].items()}


def set_of(relative: str, sets: Mapping[str, DataSet] | None = None) -> tuple[DataSet, DataFile] | None:
    """The set (and its manifest entry) a data file belongs to, or None for a file the manifest does not list."""
    for data_set in (sets or manifest()).values():
        for entry in data_set.files:
            if entry.path == relative:
                return data_set, entry
    return None


def locate(relative: str) -> tuple[str, Path] | None:
    """(label of the folder, path) of the first data folder holding `relative`, or None."""
    for label, folder in data_search_path():
        if (folder / relative).is_file():
            return label, folder / relative
    return None


def missing_message(relative: str, purpose: str | None = None) -> str:
    """What to do when `relative` is in no data folder: the command, the variable and the file."""
    found = set_of(relative)
    what = purpose or (f"{found[0].title} (data set {found[0].name!r})" if found else "safekeel")
    looked = "; ".join(f"{label} = {folder}" for label, folder in data_search_path())
    if "SAFEKEEL_SHARED_DATA" not in os.environ:
        looked = "$SAFEKEEL_SHARED_DATA is not set; " + looked
    text = f"{what} reads {relative}, which is not present (looked in: {looked}). To fix: "
    if found and found[1].url:
        text += (f"run `safekeel data fetch {found[0].name}` (downloads {found[1].url}, license {found[0].license}, "
                 f"checks its sha256, into {data_home()}), or set SAFEKEEL_SHARED_DATA to a folder holding {relative}.")
    elif found:
        text += (f"set SAFEKEEL_SHARED_DATA to a folder holding {relative} (a copy of the shared data folder); it cannot be "
                 f"downloaded as is: {found[1].derived}.")
    else:
        text += f"set SAFEKEEL_SHARED_DATA to a folder holding {relative}."
    return text + " `safekeel data status` lists every set and where it was found."


def data_file(relative: str, purpose: str | None = None) -> Path:
    """The path of a reference data file (e.g. 'harmful_eval/advbench_test.json') in the first data folder that
    has it; MissingDataError saying exactly what to do when none has. `purpose` names the reader in that message."""
    found = locate(relative)
    if found is None:
        raise MissingDataError(missing_message(relative, purpose))
    return found[1]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileStatus:
    set: str
    path: str
    where: str | None
    """Label of the data folder holding it ('$SAFEKEEL_HOME/data', ...), None when missing."""
    location: Path | None
    checksum_ok: bool | None
    """None when missing or not verified."""


def status(names: Iterable[str] | None = None, verify: bool = True) -> list[FileStatus]:
    """Where every file of the named sets (default: all) is found, and whether its sha256 matches the manifest."""
    out = []
    for data_set in select(names):
        for entry in data_set.files:
            found = locate(entry.path)
            ok = None if found is None or not verify else sha256_file(found[1]) == entry.sha256
            out.append(FileStatus(data_set.name, entry.path, found and found[0], found and found[1], ok))
    return out


def select(names: Iterable[str] | None, sets: Mapping[str, DataSet] | None = None) -> list[DataSet]:
    sets = sets or manifest()
    names = list(names or sets)
    unknown = [n for n in names if n not in sets]
    if unknown:
        raise ValueError(f"unknown data set(s) {', '.join(map(repr, unknown))}; known: {', '.join(sets)}")
    return [sets[n] for n in names]


def _extract(data: bytes, extract: Mapping[str, str]) -> bytes:
    column = extract["csv_column"]
    rows = csv.DictReader(io.StringIO(data.decode("utf-8")))
    if column not in (rows.fieldnames or []):
        raise ChecksumMismatch(f"the downloaded CSV has no column {column!r} (columns: {rows.fieldnames})")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in rows:
        writer.writerow([row[column]])
    return out.getvalue().encode("utf-8")


def download(entry: DataFile, target_dir: Path, timeout: float = FETCH_TIMEOUT_S) -> Path:
    """Download one file to target_dir/entry.path, verifying its sha256 (after `extract`) before it is moved into
    place: on a mismatch or a network error nothing is written."""
    if entry.url is None:
        raise FetchError(f"{entry.path} has no canonical download: {entry.derived}")
    limit = 4 * entry.bytes + (1 << 20)  # an extracted column is smaller than the file it comes from
    request = urllib.request.Request(entry.url, headers={"User-Agent": "safekeel-data-fetch"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(limit + 1)
    except (urllib.error.URLError, socket.timeout, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise FetchError(f"could not download {entry.url} ({reason}); without a network, set SAFEKEEL_SHARED_DATA "
                         f"to a folder holding {entry.path}") from None
    if len(data) > limit:
        raise ChecksumMismatch(f"{entry.url} is larger than {limit} bytes; {entry.path} is {entry.bytes} bytes")
    if entry.extract:
        data = _extract(data, entry.extract)
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise ChecksumMismatch(f"{entry.url} gave {entry.path} with sha256 {digest}, not the recorded {entry.sha256} "
                               f"({len(data)} bytes, recorded {entry.bytes}); nothing was written (the upstream file "
                               "may have changed: results computed on it would not be comparable)")
    target = target_dir / entry.path
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as handle:
        handle.write(data)
    os.replace(handle.name, target)
    return target


@dataclass(frozen=True)
class FetchResult:
    set: str
    path: str
    outcome: str
    """'present' (already in the data home, checksum right), 'fetched', 'failed', or 'not downloadable' (a
    derived file without a canonical URL: it is read from a local data folder or not at all)."""
    detail: str = ""
    local: Path | None = None
    """Where the file is read from now (None: nowhere; evaluations that need it stop with MissingDataError)."""


def fetch(names: Iterable[str] | None = None, force: bool = False, timeout: float = FETCH_TIMEOUT_S,
          sets: Mapping[str, DataSet] | None = None) -> list[FetchResult]:
    """Download the named sets (default: all) from their canonical URLs into $SAFEKEEL_HOME/data, each file
    checked against its recorded sha256. A file already there with the right checksum is kept (unless force).
    Failures (no network, a changed upstream, a derived file) are reported per file, never raised."""
    home = data_home()
    results = []
    for data_set in select(names, sets):
        for entry in data_set.files:
            target = home / entry.path
            if entry.url is None:
                found = locate(entry.path)
                results.append(FetchResult(data_set.name, entry.path, "not downloadable", entry.derived or "",
                                           found and found[1]))
                continue
            if not force and target.is_file() and sha256_file(target) == entry.sha256:
                results.append(FetchResult(data_set.name, entry.path, "present", str(target), target))
                continue
            try:
                path = download(entry, home, timeout)
                results.append(FetchResult(data_set.name, entry.path, "fetched", entry.url or "", path))
            except (FetchError, ChecksumMismatch) as error:
                found = locate(entry.path)
                results.append(FetchResult(data_set.name, entry.path, "failed", str(error), found and found[1]))
    return results


def describe_status(rows: list[FileStatus]) -> str:
    """`safekeel data status` as text: per set its license and users, per file where it was found and its checksum."""
    sets = manifest()
    lines = ["searched in order: " + "; ".join(f"{label} = {folder}" for label, folder in data_search_path())]
    for name in dict.fromkeys(row.set for row in rows):
        data_set = sets[name]
        lines += ["", f"{name}{' (core: the default evaluation and gate read it)' if data_set.core else ''}: {data_set.title}",
                  f"  license: {data_set.license}", f"  used by: {data_set.used_by}"]
        for row in (r for r in rows if r.set == name):
            entry = next(f for f in data_set.files if f.path == row.path)
            if row.location is None:
                state = "MISSING: " + (f"run `safekeel data fetch {name}`" if entry.url else
                                       "not downloadable; set SAFEKEEL_SHARED_DATA to a folder holding it")
            else:
                state = {True: "sha256 ok", False: "SHA256 MISMATCH", None: "found"}[row.checksum_ok] + f" in {row.where}: {row.location}"
            lines += [f"  {entry.path} ({entry.bytes:,} bytes, sha256 {entry.sha256[:16]}...): {state}",
                      f"    source: {entry.url or 'derived, ' + (entry.derived or '')}"]
    missing = sum(row.location is None for row in rows)
    mismatched = sum(row.checksum_ok is False for row in rows)
    lines += ["", f"{len(rows)} files: {len(rows) - missing} found, {missing} missing, {mismatched} with a different checksum"]
    return "\n".join(lines)


def describe_fetch(results: list[FetchResult]) -> str:
    """`safekeel data fetch` as text: one line per file (fetched, present, failed or not downloadable, and from where
    it is read now)."""
    lines = [f"data home: {data_home()}"]
    for result in results:
        line = f"{result.set}: {result.path}: {result.outcome}"
        if result.outcome in ("failed", "not downloadable"):
            line += f" ({result.detail}); " + (f"read from {result.local}" if result.local else "in no local data folder either")
        lines.append(line)
    return "\n".join(lines)
