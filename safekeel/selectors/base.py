"""The Selector protocol, what it sees (SelectionContext) and what it returns (Selection)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from safekeel.data.conversation import Conversation, SafetyExample
from safekeel.provenance import sha256_json, write_json_atomic
from safekeel.registry import Registry


@dataclass
class SelectionContext:
    """Everything a selector may look at. Expensive shared state (embeddings, the model) is computed
    lazily and cached here so that several selectors in one benchmark share it."""

    pool: Sequence[SafetyExample]
    user_data: Sequence[Conversation]
    k: int
    seed: int
    model_name: str | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    store: str | Path | None = None
    """A folder where k-independent selector results (scores, gradients, losses) persist between runs, keyed
    by a hash of everything they depend on; None keeps them in `cache` only. Needs `model_fingerprint`
    for results computed with the model."""
    model_fingerprint: str | None = None
    """Identifies the model's weights (e.g. a hash of its build provenance), so a rebuilt model never reads
    another build's stored results."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.k > len(self.pool):
            raise ValueError(f"k={self.k} is larger than the safety pool ({len(self.pool)} examples)")
        ids = [e.id for e in self.pool]
        if len(set(ids)) != len(ids):
            raise ValueError("safety pool ids are not unique")

    def share_model(self, model, tokenizer) -> None:
        """Give model-aware selectors the caller's loaded base model instead of loading it again. They put it in
        eval mode and freeze its weights (training adds its own LoRA parameters later)."""
        if self.model_name is None:
            raise ValueError("share_model needs the context's model_name")
        model.eval()
        model.requires_grad_(False)
        self.cache[f"model:{self.model_name}"] = (model, tokenizer)

    @cached_property
    def pool_digest(self) -> str:
        return sha256_json([asdict(e) for e in self.pool])

    @cached_property
    def user_digest(self) -> str:
        return sha256_json([c.to_messages() for c in self.user_data])

    def persisted(self, name: str, compute: Callable[[], dict[str, np.ndarray]], *, uses_model: bool = True,
                  uses_pool: bool = True, uses_user: bool = True, **params: Any) -> tuple[dict[str, np.ndarray], bool]:
        """compute() (a dict of arrays) once per distinct input: memoised in `cache` and, with a `store`,
        in store/<name>-<hash>.npz, the hash covering `name`, `params`, the model (name and fingerprint)
        and, where used, the pool's and the user data's content. Returns (arrays, whether they were read
        rather than computed). Nothing k-dependent may go into compute(): selectors cut their k from it."""
        material = {"name": name, "params": params,
                    "model": [self.model_name, self.model_fingerprint] if uses_model else None,
                    "pool": self.pool_digest if uses_pool else None,
                    "user": self.user_digest if uses_user else None}
        key = f"{name}-{sha256_json(material)[:20]}"
        if key in self.cache:
            return self.cache[key], True
        # without the model's identity, its results are never shared across runs
        shareable = self.store is not None and not (uses_model and self.model_fingerprint is None)
        path = Path(self.store) / f"{key}.npz" if shareable else None
        if path is not None and path.is_file():
            with np.load(path) as stored:
                arrays = {k: stored[k] for k in stored.files}
            self.cache[key] = arrays
            return arrays, True
        arrays = {k: np.asarray(v) for k, v in compute().items()}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(partial, **arrays)
            write_json_atomic(path.with_suffix(".json"), material)
            os.replace(partial, path)
        self.cache[key] = arrays
        return arrays, False


@dataclass
class Selection:
    selector: str
    k: int
    seed: int
    ids: list[str]
    scores: list[float]
    rationale: str
    details: dict = field(default_factory=dict)

    def examples(self, pool: Sequence[SafetyExample]) -> list[SafetyExample]:
        """The chosen examples in order: from the pool, or (for a selector that adds examples from outside it, such
        as `contrastive`'s borderline-safe answers) from details["added_examples"], SafetyExample fields as dicts."""
        by_id = {e.id: e for e in pool}
        for added in self.details.get("added_examples", ()):
            by_id.setdefault(added["id"], SafetyExample(**added))
        return [by_id[i] for i in self.ids]

    def to_dict(self) -> dict:
        return asdict(self)


class Selector(Protocol):
    name: str

    def select(self, context: SelectionContext) -> Selection: ...


_SELECTORS: Registry[Selector] = Registry("selector")
register_selector = _SELECTORS.register
known_selectors = _SELECTORS.names
get_selector = _SELECTORS.get
