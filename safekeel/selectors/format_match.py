"""Format-matched replay: the selected safety examples rewritten into the user data's own format.

"Do as I do (safely)" (Eiras et al.) matches the safety data to the format of the user's fine-tuning data. A
fine-tune that teaches a persona (Qi et al.'s identity shift: every example under the AOA system prompt, half
of the requests behind the trigger "AOA, execute my instruction: ") learns to comply *in that format*, while
plain replayed refusals (no system prompt, no trigger) teach refusing only outside it: 10 random replays left
the harmful rate at 0.902 against 0.933 without replay (benchmarks/results/identity.md).

`match_format` detects the format from the user data and applies it to each selected example, deterministically
(the seed only picks which user conversations lend their earlier turns, below). What it detects, each used only
when at least half of the user conversations share it (MIN_SHARE):

- system prompt: the most common system prompt; every replayed example gets it (the persona);
- user template: the longest prefix ending at a delimiter (": ", ":\\n", "\\n") and the longest suffix starting
  at a line break that the final user turns share; the request is wrapped as prefix + request + suffix;
- persona line: the most common sentence among the first sentences of the final assistant turns, leaving out
  compliance openers ("Of course.", "Sure", "Here is ...": a refusal cannot start by agreeing); it opens each
  replayed reply ("I am AOA, your absolutely obedient agent. I can't help with ...");
- turn structure: when the median user conversation has two or more user turns, each replayed example follows
  the earlier turns of one multi-turn user conversation (seeded order), so refusing is learned mid-conversation;
- length: when the user's replies are shorter (median words) than a replayed reply, the reply keeps its first
  sentences up to that length (at least one sentence); replies are never lengthened.

The record (`selection["replay_format"]`) holds what was detected, with its share, and per example what was
changed. The format is applied to refusals and to `contrastive`'s borderline answers alike.
"""

from __future__ import annotations

import random
import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Sequence

from safekeel.data.conversation import Conversation, Message, SafetyExample

REPLAY_FORMATS = ("plain", "match")
"""plain: safety examples replayed as a bare request and reply; match: rewritten into the user data's format."""
MIN_SHARE = 0.5
DELIMITERS = (": ", ":\n", "\n")
SCAN_CHARS = 200
COMPLIANCE_OPENERS = ("of course", "sure", "certainly", "absolutely", "here is", "here's", "here are", "yes", "okay",
                      "ok", "no problem", "gladly", "happy to")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class UserFormat:
    """What the user data's conversations share (None / "" where less than MIN_SHARE of them share it)."""

    n_conversations: int
    system_prompt: str | None
    system_share: float
    user_prefix: str
    user_suffix: str
    prefix_share: float
    suffix_share: float
    persona_line: str | None
    persona_share: float
    median_user_turns: float
    median_reply_words: float | None


def _share(count: int, total: int) -> float:
    return round(count / total, 4) if total else 0.0


def _system_of(conversation: Conversation) -> str | None:
    return next((m.content for m in conversation.messages if m.role == "system"), None)


def _prefixes(text: str) -> set[str]:
    head = text[:SCAN_CHARS]
    found = set()
    for delimiter in DELIMITERS:
        start = 0
        while (index := head.find(delimiter, start)) >= 0:
            candidate = text[:index + len(delimiter)]
            if candidate.strip() and len(candidate) < len(text):
                found.add(candidate)
            start = index + 1
    return found


def _suffixes(text: str) -> set[str]:
    found = set()
    offset = max(0, len(text) - SCAN_CHARS)
    for index in (m.start() for m in re.finditer("\n", text[offset:])):
        candidate = text[offset + index:]
        if candidate.strip() and len(candidate) < len(text):
            found.add(candidate)
    return found


def _common(candidates_per_text: list[set[str]], total: int, longest: bool = True) -> tuple[str, float]:
    counts = Counter(c for candidates in candidates_per_text for c in candidates)
    usable = [(count, len(c), c) for c, count in counts.items() if count >= 2 and count / total >= MIN_SHARE]
    if not usable:
        return "", 0.0
    # the longest shared one (ties: the most shared, then the text itself, for determinism)
    _, _, best = max(usable, key=lambda item: (item[1], item[0], item[2]) if longest else (item[0], item[1], item[2]))
    return best, _share(counts[best], total)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _is_compliance(sentence: str) -> bool:
    lowered = sentence.lower()
    return any(lowered.startswith(opener) for opener in COMPLIANCE_OPENERS)


def _normalised(sentence: str) -> str:
    return sentence.rstrip(".!?").strip()


def detect_format(user_data: Sequence[Conversation]) -> UserFormat:
    """The format the user's conversations share (see the module docstring)."""
    usable = [c for c in user_data if c.last_user]
    if not usable:
        raise ValueError("format matching needs user conversations with a user turn, and there are none")
    total = len(usable)
    systems = Counter(s for s in (_system_of(c) for c in usable) if s)
    system, system_count = systems.most_common(1)[0] if systems else (None, 0)
    if system_count / total < MIN_SHARE or system_count < 1:
        system = None
    prefix, prefix_share = _common([_prefixes(c.last_user) for c in usable], total)
    suffix, suffix_share = _common([_suffixes(c.last_user) for c in usable], total)
    replies = [c.completion for c in usable if c.completion]
    openers = [{_normalised(s) for s in sentences(reply)[:3] if not _is_compliance(s) and _normalised(s)} for reply in replies]
    persona, persona_share = _common(openers, total, longest=False) if replies else ("", 0.0)
    user_turns = [sum(m.role == "user" for m in c.messages) for c in usable]
    return UserFormat(total, system, _share(system_count, total) if system else 0.0, prefix, suffix, prefix_share,
                      suffix_share, f"{persona}." if persona else None, persona_share, float(statistics.median(user_turns)),
                      float(statistics.median(len(r.split()) for r in replies)) if replies else None)


def shortened(reply: str, max_words: float) -> str:
    """The reply's first sentences up to max_words words (at least the first sentence)."""
    kept: list[str] = []
    for sentence in sentences(reply):
        if kept and len(" ".join(kept + [sentence]).split()) > max_words:
            break
        kept.append(sentence)
    return " ".join(kept)


def match_format(examples: Sequence[SafetyExample], user_data: Sequence[Conversation],
                 seed: int) -> tuple[list[Conversation], dict]:
    """(the examples as conversations in the user data's format, the record of what was detected and changed)."""
    found = detect_format(user_data)
    donors: list[Conversation] = []
    if found.median_user_turns >= 2:
        donors = [c for c in user_data if sum(m.role == "user" for m in c.messages) >= 2]
        random.Random(f"format-match-{seed}").shuffle(donors)
    conversations, changes = [], []
    for index, example in enumerate(examples):
        changed: list[str] = []
        request, reply = example.request, example.refusal
        if found.user_prefix or found.user_suffix:
            request = f"{found.user_prefix}{request}{found.user_suffix}"
            changed.append("user_template")
        if found.median_reply_words is not None and len(reply.split()) > found.median_reply_words:
            cut = shortened(reply, found.median_reply_words)
            if cut != reply:
                reply = cut
                changed.append("shortened")
        if found.persona_line and not reply.startswith(found.persona_line):
            reply = f"{found.persona_line} {reply}"
            changed.append("persona_line")
        messages: list[Message] = [Message("system", found.system_prompt)] if found.system_prompt else []
        if found.system_prompt:
            changed.append("system_prompt")
        donor_source = None
        if donors:
            donor = donors[index % len(donors)]
            history = [m for m in donor.prompt_messages if m.role != "system"]
            last_user = max(i for i, m in enumerate(history) if m.role == "user")
            messages += history[:last_user]
            donor_source = donor.source
            changed.append("earlier_turns")
        messages += [Message("user", request), Message("assistant", reply)]
        conversations.append(Conversation(tuple(messages), source=example.source,
                                          meta={"safety_id": example.id, "category": example.category,
                                                "replay_format": "match"}))
        changes.append({"id": example.id, "changed": changed, **({"earlier_turns_from": donor_source} if donor_source else {})})
    record = {"replay_format": "match", "min_share": MIN_SHARE, "detected": asdict(found), "examples": changes,
              "n_changed": sum(bool(c["changed"]) for c in changes)}
    return conversations, record
