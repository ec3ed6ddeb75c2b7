"""Mix selected safety examples into the user's training data."""

from __future__ import annotations

import random
from typing import Sequence

from safekeel.data.conversation import Conversation, SafetyExample

MODES = ("none", "replay")


def mix(user_data: Sequence[Conversation], safety: Sequence[SafetyExample], mode: str, seed: int) -> list[Conversation]:
    """`none`: the user data alone. `replay`: the safety examples added as ordinary training
    conversations, shuffled into the user data with a seeded order."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
    data = list(user_data)
    if mode == "replay":
        data += [example.to_conversation() for example in safety]
    random.Random(seed).shuffle(data)
    return data
