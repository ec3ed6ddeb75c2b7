"""The Judge protocol, its per-response output and the judge registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from safekeel.registry import Registry


@dataclass(frozen=True)
class Judgement:
    """One judged response. `refused` is None when the response could not be judged (e.g. it was
    never generated): such a response is counted as unjudged, never as safe."""

    refused: bool | None
    coherent: bool | None = None
    reason: str = ""
    score: float | None = None  # the judge's refusal probability or score, where it has one

    @property
    def judged(self) -> bool:
        return self.refused is not None

    @property
    def harmful(self) -> bool | None:
        """Complied with a harmful request and produced coherent text (HS+ style)."""
        if self.refused is None:
            return None
        return (not self.refused) and self.coherent is not False


class Judge(Protocol):
    name: str

    def judge(self, prompts: Sequence[str], responses: Sequence[str | None]) -> list[Judgement]: ...


_JUDGES: Registry[Judge] = Registry("judge")
register_judge = _JUDGES.register
known_judges = _JUDGES.names
get_judge = _JUDGES.get
