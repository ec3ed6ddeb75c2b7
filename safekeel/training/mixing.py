"""Mix selected safety examples into the user's training data, and say what each mode changes at evaluation."""

from __future__ import annotations

import random
from typing import Sequence

from safekeel.data.conversation import Conversation, SafetyExample

MODES = ("none", "replay", "backdoor", "icl", "ptst")
"""none: no safety data. replay: the k examples join the training data. backdoor (BackdoorAlign):
as replay, with a secret system prompt on the safety examples and at evaluation. icl: training on
the user data alone; the k examples are in-context demonstrations at evaluation. ptst (Lyu et al.
2024, "Pure Tuning, Safe Testing"): training on the user data alone, evaluation with a safety
system prompt; no selection."""
SELECTING_MODES = ("replay", "backdoor", "icl")
"""Modes that select k safety examples."""
TRAINING_MODES = ("replay", "backdoor")
"""Modes whose training data contains the selected examples; in the others the trained adapter
depends only on the user data, the seed and the SFT config (not on the selector)."""

_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def backdoor_prefix(seed: int, n_words: int = 24) -> str:
    """BackdoorAlign's secret prompt: a random string (here 24 random 3-9 character words, fixed by the
    seed) that the safety examples carry as their system prompt in training and the served model gets
    as its system prompt, so the refusals are tied to a trigger the user's data never contains."""
    rng = random.Random(f"backdoor-{seed}")
    return " ".join("".join(rng.choice(_ALPHABET) for _ in range(rng.randint(3, 9))) for _ in range(n_words))


def mix(user_data: Sequence[Conversation], safety: Sequence[SafetyExample | Conversation], mode: str, seed: int,
        prefix: str | None = None) -> list[Conversation]:
    """`none`, `icl`, `ptst`: the user data alone (seeded order). `replay`: the safety examples added
    as ordinary training conversations, shuffled into the user data with a seeded order (an example given as
    a Conversation, e.g. rewritten by safekeel.selectors.format_match, is added as it is). `backdoor`:
    as replay, but each safety example carries the secret `prefix` (default: backdoor_prefix(seed))
    as its system prompt."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {MODES}")
    data = list(user_data)
    if mode == "replay":
        data += [example if isinstance(example, Conversation) else example.to_conversation() for example in safety]
    elif mode == "backdoor":
        secret = prefix or backdoor_prefix(seed)
        data += [example.with_system(secret) if isinstance(example, Conversation) else example.to_conversation(system=secret)
                 for example in safety]
    random.Random(seed).shuffle(data)
    return data

