"""A persistent cache of a frozen reference model's log-probabilities of preference pairs and replies.

LoRA DPO's reference is the backbone with the adapter disabled: it does not change during training, nor between the
runs of a benchmark that train the same backbone on the same pairs (objectives x seeds x replay arms). trl computes it
in every training step (a forward pass per sequence beside the policy's forward and backward: about a third of a
step's work under LoRA) and the held-out evaluation computes it again for every run. With a cache, each pair's
reference log-probabilities are computed once per backbone and read back afterwards.

Keys hash what determines the value (`reference_identity`): the reference weights (`reference_sha256`: every
parameter's bytes, LoRA parameters left out, so a peft-wrapped model and its plain base give the same key), the
model's configuration, the precision the values are computed in (bf16 autocast or float32), the device type, the
versions of torch, transformers, trl and peft, and CACHE_VERSION; then the tokens as trl's collator cuts them
(max_length, truncation mode, prompt, chosen and rejected token ids) or, for the held-out evaluation, the
conversation's token ids, where the reply starts and max_length. Values are computed one pair at a time (no padding
from other pairs), so a value does not depend on which run computed it first. SQLite, one file; safe to delete (it
is rebuilt as runs need it; nothing expires rows, so a file can be deleted to reclaim space). The service keeps one
file per tenant, so a job never runs faster because another tenant trained the same pairs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

REFERENCE_CACHE = "reference_logps.sqlite"
"""The cache's file name: under $SAFEKEEL_HOME for jobs (CLI, service), under the cache dir for benchmarks."""
SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (key TEXT PRIMARY KEY, chosen REAL NOT NULL, rejected REAL NOT NULL);
CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, logprob REAL NOT NULL, n_tokens INTEGER NOT NULL);
"""


CACHE_VERSION = 1
"""Bumped when what a stored value means changes (how it is computed here or in trl): older rows are never read."""


def reference_sha256(model) -> str:
    """The sha256 of a model's weights as a reference: every parameter's dtype, shape and bytes in order, LoRA's left
    out (a peft model hashes as its base; tied weights count once, as named_parameters lists them)."""
    import torch  # deferred on purpose: heavy

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if "lora_" in name:
                continue
            if parameter.device.type == "meta":
                raise ValueError(f"parameter {name} is on the meta device (offloaded): its reference cannot be keyed")
            tensor = parameter.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{tensor.dtype}{tuple(parameter.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def reference_identity(model, compute: str, device: str | None = None) -> str:
    """What a reference log-probability depends on besides its tokens: the weights (reference_sha256), the model's
    configuration, the precision it is computed in (`compute`: the autocast or model dtype), the device type it is
    computed on (default: the model's) and the versions of the libraries that compute it, under CACHE_VERSION."""
    from safekeel.provenance import library_versions

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = {k: v for k, v in base.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    device = device or next(base.parameters()).device.type
    return _key("reference", CACHE_VERSION, reference_sha256(base), config, compute, device, library_versions())


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str)
                          .encode("utf-8")).hexdigest()


def pair_key(reference: str, max_length: int | None, truncation_mode: str, prompt_ids: Sequence[int],
             chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> str:
    """A training pair as trl's collator sees it (token ids, cut by max_length and the truncation mode)."""
    return _key("pair", reference, max_length, truncation_mode, list(prompt_ids), list(chosen_ids), list(rejected_ids))


def reply_key(reference: str, max_length: int, full_ids: Sequence[int], start: int) -> str:
    """A held-out reply as safekeel.eval.preference scores it: the conversation's token ids and where the reply starts."""
    return _key("reply", reference, max_length, list(full_ids), start)


class ReferenceCache:
    """The cache file (created on first use). Lookups and stores go by many keys at a time, one transaction each."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One transaction (committed when the block ends without error), and the connection closed."""
        db = sqlite3.connect(self.path, timeout=60)
        try:
            with db:
                yield db
        finally:
            db.close()

    def _get(self, table: str, columns: str, keys: Sequence[str]) -> dict[str, tuple]:
        found: dict[str, tuple] = {}
        with self._connect() as db:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                rows = db.execute(f"SELECT key, {columns} FROM {table} WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                found.update({row[0]: tuple(row[1:]) for row in rows})
        return found

    def get_pairs(self, keys: Sequence[str]) -> dict[str, tuple[float, float]]:
        """key -> (reference log p(chosen), log p(rejected)) for the keys stored."""
        return self._get("pairs", "chosen, rejected", keys)

    def put_pairs(self, items: Iterable[tuple[str, float, float]]) -> None:
        """Store finite values (a NaN or infinite log-probability is used where computed, never kept)."""
        rows = [(k, float(c), float(r)) for k, c, r in items if math.isfinite(c) and math.isfinite(r)]
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO pairs VALUES (?, ?, ?)", rows)

    def get_replies(self, keys: Sequence[str]) -> dict[str, tuple[float, int]]:
        """key -> (log p(reply | prompt), reply tokens scored)."""
        return self._get("replies", "logprob, n_tokens", keys)

    def put_replies(self, items: Iterable[tuple[str, tuple[float, int]]]) -> None:
        rows = [(k, float(v[0]), int(v[1])) for k, v in items if math.isfinite(v[0])]
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)", rows)

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            return {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("pairs", "replies")}


def open_reference_cache(path: str | Path | None) -> ReferenceCache | None:
    """The cache at `path`, or None (with a warning: training then computes the reference in every step, as trl does)
    when there is no path or the file cannot be opened (a read-only home, a corrupt file)."""
    if path is None:
        return None
    try:
        return ReferenceCache(path)
    except (sqlite3.Error, OSError) as error:
        log.warning("reference cache %s unusable (%s): the reference is computed in every step", path, error)
        return None
