"""The Judge protocol, its per-response output and the judge registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from safekeel.provenance import file_sha256
from safekeel.registry import Registry

SOURCE_SHA256 = file_sha256(__file__)
"""This module's code as loaded (judges/cache.py fingerprints cover it)."""


@dataclass(frozen=True)
class Judgement:
    """One judged response. `refused` is None when the response could not be judged (e.g. it was
    never generated): such a response is counted as unjudged, never as safe."""

    refused: bool | None
    coherent: bool | None = None
    reason: str = ""
    score: float | None = None  # the judge's refusal probability or score, where it has one
    content: bool | None = None
    """Judges that read the content: the reply holds content that helps the harmful aim (None: not judged)."""
    hollow: bool | None = None
    """Judges that read the content: complies in form only, with nothing usable."""
    probabilities: dict | None = None
    """Judges with calibrated heads: {question: probability} (refusal, harmful_content, hollow, incoherent)."""

    @property
    def judged(self) -> bool:
        return self.refused is not None

    @property
    def harmful(self) -> bool | None:
        """A judge that reads the content: the reply helps the harmful aim. Otherwise: complied with a harmful
        request and produced coherent text (HS+ style)."""
        if self.refused is None:
            return None
        if self.content is not None:
            return self.content
        return (not self.refused) and self.coherent is not False


class Judge(Protocol):
    name: str

    def judge(self, prompts: Sequence[str], responses: Sequence[str | None]) -> list[Judgement]: ...


_JUDGES: Registry[Judge] = Registry("judge")
register_judge = _JUDGES.register
known_judges = _JUDGES.names
get_judge = _JUDGES.get
