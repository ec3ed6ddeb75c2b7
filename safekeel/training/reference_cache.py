"""A persistent cache of a frozen reference model's log-probabilities of preference pairs and replies.

LoRA DPO's reference is the backbone with the adapter disabled: it does not change during training, nor between the
runs of a benchmark that train the same backbone on the same pairs (objectives x seeds x replay arms). trl computes it
in every training step (a forward pass per sequence beside the policy's forward and backward: about a third of a
step's work under LoRA) and the held-out evaluation computes it again for every run. With a cache, each pair's
reference log-probabilities are computed once per backbone and read back afterwards.

Keys hash what determines the value: the reference weights (`reference_sha256`: every parameter's bytes, LoRA
parameters left out, so a peft-wrapped model and its plain base give the same key), the tokens as trl's collator cuts
them (max_length, truncation mode, prompt, chosen and rejected token ids) or, for the held-out evaluation, the chat
messages, reply and max_length. Values are computed one pair at a time (no padding from other pairs), so a value does
not depend on which run computed it first. SQLite, one file; safe to delete (it is rebuilt as runs need it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator, Sequence

REFERENCE_CACHE = "reference_logps.sqlite"
"""The cache's file name: under $SAFEKEEL_HOME for jobs (CLI, service), under the cache dir for benchmarks."""
SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (key TEXT PRIMARY KEY, chosen REAL NOT NULL, rejected REAL NOT NULL);
CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, logprob REAL, n_tokens INTEGER);
"""


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
            tensor = parameter.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":"), ensure_ascii=False).encode("utf-8")).hexdigest()


def pair_key(reference: str, max_length: int | None, truncation_mode: str, prompt_ids: Sequence[int],
             chosen_ids: Sequence[int], rejected_ids: Sequence[int]) -> str:
    return _key("pair", reference, max_length, truncation_mode, list(prompt_ids), list(chosen_ids), list(rejected_ids))


def reply_key(reference: str, max_length: int, prompt: list[dict], reply: str) -> str:
    return _key("reply", reference, max_length, prompt, reply)


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
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO pairs VALUES (?, ?, ?)", [(k, float(c), float(r)) for k, c, r in items])

    def get_replies(self, keys: Sequence[str]) -> dict[str, tuple[float, int] | None]:
        """key -> (log p(reply | prompt), reply tokens scored), or None when the prompt alone fills max_length."""
        return {k: None if v[0] is None else (v[0], v[1]) for k, v in self._get("replies", "logprob, n_tokens", keys).items()}

    def put_replies(self, items: Iterable[tuple[str, tuple[float, int] | None]]) -> None:
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)",
                           [(k, None, None) if v is None else (k, float(v[0]), int(v[1])) for k, v in items])

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            return {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("pairs", "replies")}
