"""Selecting k safety examples for a user's data: the record every caller keeps (selection.json)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from safekeel.data.conversation import Conversation, SafetyExample
from safekeel.data.safety import load_pool
from safekeel.models.registry import base_model_provenance
from safekeel.provenance import sha256_json
from safekeel.selectors.base import SelectionContext, get_selector


def select_safety(user_data: Sequence[Conversation], pool_name: str, k: int, selector: str, seed: int, model: str, *,
                  store: str | Path | None = None, base_provenance: dict | None = None,
                  pool: Sequence[SafetyExample] | None = None,
                  loaded_model: tuple | None = None) -> tuple[dict, list[SafetyExample]]:
    """k safety examples from the pool for this user data: (the selection record, the chosen examples).
    The record (selection.json) holds the selector's ids, scores, rationale and details, the pool, its size and
    content hash, the model, the time taken, and each chosen example's id, category and request. `store`: where
    selectors keep k-independent results between calls (SelectionContext.store). `loaded_model`: the base
    (model, tokenizer) when the caller has it loaded already, so a model-aware selector does not load it again
    (selectors never change its weights)."""
    chooser = get_selector(selector)  # an unknown name fails here, before the pool and the model load
    pool = list(pool) if pool is not None else load_pool(pool_name)
    if base_provenance is None and store is not None:  # the model's identity keys the stored results
        base_provenance = base_model_provenance(model)
    context = SelectionContext(pool, user_data, k, seed, model_name=model, store=store,
                               model_fingerprint=sha256_json(base_provenance) if base_provenance else None)
    if loaded_model is not None:
        context.share_model(*loaded_model)
    started = time.time()
    chosen = chooser.select(context)
    seconds = round(time.time() - started, 3)
    if context.model_fingerprint is None:  # recorded all the same, without building a model the selector never used
        found = base_model_provenance(model, build=False)
        context.model_fingerprint = sha256_json(found) if found else None
    safety = chosen.examples(pool)
    selection = {**chosen.to_dict(), "pool": pool_name, "pool_size": len(pool), "pool_sha256": context.pool_digest,
                 "model": model, "model_fingerprint": context.model_fingerprint, "seconds": seconds,
                 "examples": [{"id": e.id, "category": e.category, "request": e.request} for e in safety]}
    return selection, safety
