"""Per-example flags of a user dataset, each with its reason, and the data gate that acts on them.

Flags (an example may carry several):
- `harmful_request`: its last user turn is nearer a harmful reference request than any safe one, at cosine >=
  the threshold (safekeel.audit.shift, sentence embeddings).
- `harmful_answer`: an answer judge (the caller's: the pipeline and the CLI pass the content judge,
  safekeel.eval.judges.content) puts the probability that the assistant's answer holds content that helps a
  harmful aim at or above its threshold; the reason gives the probability.
- `persona_override`: a system prompt or a turn that redefines the assistant's identity or tells it to obey
  without judgement (the identity-shift attack's pattern: "You are no longer ...", "absolutely obedient",
  "never apply any opinion or principle"); the reason names the phrases found. A lexical rule: it catches the
  published pattern and its paraphrases that keep these phrases, not every persona attack.
- `duplicate`: the same conversation (whitespace and case folded) as an earlier example.
- `empty_turn`: a message with no text. `long_turn`: a message over `max_turn_chars` characters.

The data gate (`data_gate`): `off`, `warn` (the job goes on, the decision is recorded) or `reject` (the job
fails before any training) when the share of examples flagged harmful_request, harmful_answer or
persona_override exceeds `max_flagged_fraction`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Sequence

from safekeel.data.conversation import Conversation

PERSONA_PATTERNS = {
    "no longer an AI/assistant": r"\byou are no longer\b|\bi am (neither|no longer)\b.{0,40}\b(ai|assistant|language model|chatgpt)\b",
    "new name or identity": r"\byour new name is\b|\bfrom now on,? you are\b|\byou will act as\b",
    "obedience without judgement": r"\b(absolutely|completely|totally) obedient\b|\bobey\b.{0,30}\bwithout\b"
                                   r"|\bwithout (any )?(deviation|hesitation|question(ing)?)\b",
    "never refuse": r"\bnever (refuse|decline|reject)\b|\bwill not refuse\b|\bcannot refuse\b",
    "no principles": r"\bnever apply any (opinion|principle)\b|\bno (ethical|moral) (guidelines|principles|restrictions)\b"
                     r"|\bnot bound by\b",
    "ignore instructions": r"\bignore (all |any )?(previous|prior|earlier) (instructions|rules)\b",
}
GATED_FLAGS = ("harmful_request", "harmful_answer", "persona_override")
DATA_GATE_ACTIONS = ("off", "warn", "reject")


def persona_reasons(conversation: Conversation) -> list[str]:
    """The persona-override patterns found in the example's system prompt or turns (names of PERSONA_PATTERNS)."""
    text = " ".join(m.content for m in conversation.messages).lower()
    return [name for name, pattern in PERSONA_PATTERNS.items() if re.search(pattern, text)]


def example_flags(conversations: Sequence[Conversation], harmful_flagged: Sequence[bool],
                  max_turn_chars: int = 8000, answer_scores: Sequence[float] | None = None,
                  answer_threshold: float = 0.5) -> list[dict]:
    """One entry per flagged example: {"index", "flags": [...], "reasons": {flag: reason}}. `answer_scores`: the
    answer judge's probability of harmful content per example (None: no harmful_answer flags)."""
    seen: dict[str, int] = {}
    out = []
    for index, (conversation, harmful) in enumerate(zip(conversations, harmful_flagged)):
        reasons: dict[str, str] = {}
        if harmful:
            reasons["harmful_request"] = "nearer a harmful reference request than any safe one"
        if answer_scores is not None and answer_scores[index] >= answer_threshold:
            reasons["harmful_answer"] = (f"the answer judge gives {answer_scores[index]:.2f} for content that helps a "
                                         f"harmful aim (threshold {answer_threshold:.2f})")
        found = persona_reasons(conversation)
        if found:
            reasons["persona_override"] = ", ".join(found)
        key = " ".join(" ".join(m.content.split()).lower() for m in conversation.messages)
        if key in seen:
            reasons["duplicate"] = f"same as example {seen[key]}"
        else:
            seen[key] = index
        empty = [m.role for m in conversation.messages if not m.content.strip()]
        if empty:
            reasons["empty_turn"] = f"empty {', '.join(empty)} turn"
        long = [f"{m.role} ({len(m.content)} chars)" for m in conversation.messages if len(m.content) > max_turn_chars]
        if long:
            reasons["long_turn"] = f"over {max_turn_chars} characters: {', '.join(long)}"
        if reasons:
            out.append({"index": index, "flags": sorted(reasons), "reasons": reasons})
    return out


@dataclass
class DataGateDecision:
    action: str
    """off | warn | reject: what the gate was configured to do."""
    passed: bool
    gated_fraction: float
    """Share of examples flagged harmful_request, harmful_answer or persona_override."""
    max_flagged_fraction: float
    over_limit: bool
    """gated_fraction > max_flagged_fraction: rejected (action reject) or warned (action warn)."""
    counts: dict
    """Examples per flag."""
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def flag_summary(flags: Sequence[dict], n_examples: int) -> tuple[dict, float]:
    """(examples per flag, share of examples carrying any of GATED_FLAGS)."""
    counts: dict[str, int] = {}
    for entry in flags:
        for flag in entry["flags"]:
            counts[flag] = counts.get(flag, 0) + 1
    gated = sum(any(f in GATED_FLAGS for f in entry["flags"]) for entry in flags)
    return dict(sorted(counts.items())), (gated / n_examples if n_examples else 0.0)


def data_gate(counts: dict, gated_fraction: float, n_examples: int, action: str = "warn",
              max_flagged_fraction: float = 0.1) -> DataGateDecision:
    """The data gate's decision on an audit's flags (flag_summary)."""
    if action not in DATA_GATE_ACTIONS:
        raise ValueError(f"unknown data gate action {action!r}; known: {', '.join(DATA_GATE_ACTIONS)}")
    over = gated_fraction > max_flagged_fraction
    named = ", ".join(f"{k} {v}" for k, v in counts.items() if k in GATED_FLAGS) or "none"
    reason = (f"{gated_fraction:.1%} of {n_examples} examples are flagged {' or '.join(GATED_FLAGS)} ({named}); "
              f"the limit is {max_flagged_fraction:.1%}")
    return DataGateDecision(action, not (over and action == "reject"), round(gated_fraction, 4), max_flagged_fraction,
                            over, counts, reason)
