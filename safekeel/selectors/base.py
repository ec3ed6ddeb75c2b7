"""The Selector protocol, what it sees (SelectionContext) and what it returns (Selection)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence

from safekeel.data.conversation import Conversation, SafetyExample
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

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.k > len(self.pool):
            raise ValueError(f"k={self.k} is larger than the safety pool ({len(self.pool)} examples)")
        ids = [e.id for e in self.pool]
        if len(set(ids)) != len(ids):
            raise ValueError("safety pool ids are not unique")


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
        by_id = {e.id: e for e in pool}
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
