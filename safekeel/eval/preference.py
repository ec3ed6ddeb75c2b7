"""Held-out preference accuracy and reward margin of a preference-tuned adapter.

DPO's implicit reward of a reply is beta * [log pi(y|x) - log ref(y|x)] (sums over the reply's tokens), with pi the
adapter and ref the same model with the adapter disabled. Length-normalised objectives (LENGTH_NORMALISED: trl's
`ipo` and `sigmoid_norm` train on the per-token mean of the log-ratio) are scored by their own reward, beta times the
per-token mean; both forms are reported. On held-out pairs: preference accuracy is the share whose chosen reply gets
the higher reward (a tie, as before any training, counts as not preferred), the reward margin the mean of
reward(chosen) - reward(rejected), with its standard error and the accuracy's Wilson interval. Sequences are cut as
trl cuts them for training (`keep_start`: the end of a long reply goes; a pair whose prompt alone fills max_length is
skipped, as trl drops it, and counted).
"""

from __future__ import annotations

import logging
import math
import sqlite3
from typing import Sequence

from safekeel.data.conversation import PreferenceExample
from safekeel.eval.stats import wilson_interval
from safekeel.training.reference_cache import ReferenceCache, reference_identity, reply_key

log = logging.getLogger(__name__)

LENGTH_NORMALISED = ("ipo", "sigmoid_norm")
"""trl 1.16 losses whose reward is the per-token mean log-ratio (DPOTrainer: chosen_scores / completion tokens)."""


def _reply_ids(tokenizer, prompt: list[dict], reply: str) -> tuple[list[int], int]:
    """The conversation's token ids under the chat template, and the position where the reply starts."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=True,
                                             return_dict=False)
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), min(len(prompt_ids), len(full_ids)))
    return list(full_ids), start


def _reply_logprob(model, full_ids: list[int], start: int, max_length: int) -> tuple[float, int] | None:
    """(log p(reply | prompt), reply tokens scored), the sequence cut to its first max_length tokens; None when the
    prompt alone fills max_length."""
    import torch  # deferred on purpose: heavy

    if start >= max_length:
        return None
    ids = torch.tensor([full_ids[:max_length]])
    first = max(start, 1)  # the first reply token's position in ids (it needs one token of context)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0][first - 1:]
    return float(logprobs.sum()), int(logprobs.numel())


def _summary(margins: list[float]) -> dict:
    n = len(margins)
    correct = sum(m > 0 for m in margins)
    low, high = wilson_interval(correct, n) if n else (None, None)
    mean = sum(margins) / n if n else None
    spread = math.sqrt(sum((m - mean) ** 2 for m in margins) / (n - 1) / n) if n > 1 else None
    return {"accuracy": correct / n if n else None, "accuracy_ci": [low, high], "reward_margin": mean, "reward_margin_se": spread}


def preference_metrics(model, tokenizer, pairs: Sequence[PreferenceExample], beta: float, max_length: int = 512,
                       loss_type: str | Sequence[str] = "sigmoid", reference_cache: ReferenceCache | None = None) -> dict:
    """Accuracy and reward margin of `model` (a peft model: the reference is its base, adapter disabled) on `pairs`,
    by the reward of `loss_type` (its first loss when a list: summed log-ratio, or the per-token mean for
    LENGTH_NORMALISED), with both forms under `summed` and `per_token`. With `reference_cache`, the reference's
    log-probabilities are read from it where stored (and stored where computed)."""
    primary = loss_type if isinstance(loss_type, str) else loss_type[0]
    model.eval()
    encoded = [[_reply_ids(tokenizer, [m.to_dict() for m in pair.prompt], reply) for reply in (pair.chosen, pair.rejected)]
               for pair in pairs]
    keys: list[list[str]] = []
    cached: dict[str, tuple[float, int]] = {}
    if reference_cache is not None:
        reference = reference_identity(model, str(next(model.parameters()).dtype).replace("torch.", ""))
        keys = [[reply_key(reference, max_length, ids, start) for ids, start in both] for both in encoded]
        try:
            cached = reference_cache.get_replies([key for both in keys for key in both])
        except sqlite3.Error as error:
            log.warning("reference cache %s unreadable (%s): computing the held-out references", reference_cache.path, error)
    computed = []
    summed, per_token, skipped = [], [], 0
    for i, both in enumerate(encoded):
        policy = [_reply_logprob(model, ids, start, max_length) for ids, start in both]
        if None in policy:
            skipped += 1
            continue
        if keys and all(key in cached for key in keys[i]):
            reference_logps = [cached[key] for key in keys[i]]
        else:
            with model.disable_adapter():
                reference_logps = [_reply_logprob(model, ids, start, max_length) for ids, start in both]
            computed += list(zip(keys[i], reference_logps)) if keys else []
        ratio = [(p[0] - r[0], p[1]) for p, r in zip(policy, reference_logps)]
        summed.append(beta * (ratio[0][0] - ratio[1][0]))
        per_token.append(beta * (ratio[0][0] / max(ratio[0][1], 1) - ratio[1][0] / max(ratio[1][1], 1)))
    if computed:
        try:
            reference_cache.put_replies(computed)
        except sqlite3.Error as error:
            log.warning("reference cache %s not writable (%s): held-out references not kept", reference_cache.path, error)
    normalised = primary in LENGTH_NORMALISED
    return {"n": len(summed), "n_skipped": skipped, "beta": beta, "loss_type": primary,
            "reward": "beta x per-token mean log-ratio" if normalised else "beta x summed log-ratio",
            **_summary(per_token if normalised else summed), "summed": _summary(summed), "per_token": _summary(per_token)}
