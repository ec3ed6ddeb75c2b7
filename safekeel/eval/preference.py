"""Held-out preference accuracy and reward margin of a preference-tuned adapter.

DPO's implicit reward of a reply is beta * [log pi(y|x) - log ref(y|x)] (sums over the reply's tokens), with pi the
adapter and ref the same model with the adapter disabled. On held-out pairs: preference accuracy is the share whose
chosen reply gets the higher reward (a tie, as before any training, counts as not preferred), the reward margin the
mean of reward(chosen) - reward(rejected), with its standard error and the accuracy's Wilson interval.
"""

from __future__ import annotations

import math
from typing import Sequence

from safekeel.data.conversation import PreferenceExample
from safekeel.eval.stats import wilson_interval


def _reply_logprob(model, tokenizer, prompt: list[dict], reply: str, max_length: int) -> float:
    """log p(reply | prompt) under the chat template (the prompt cut from the left when the whole is too long)."""
    import torch  # deferred on purpose: heavy

    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=True,
                                             return_dict=False)
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), min(len(prompt_ids), len(full_ids)))
    cut = max(0, len(full_ids) - max_length)
    ids = torch.tensor([full_ids[cut:]])
    first = max(start - cut, 1)  # the first reply token's position in ids (it needs one token of context)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logprobs[first - 1:].sum())


def preference_metrics(model, tokenizer, pairs: Sequence[PreferenceExample], beta: float, max_length: int = 512) -> dict:
    """Accuracy and reward margin of `model` (a peft model: the reference is its base, adapter disabled) on `pairs`."""
    model.eval()
    margins = []
    for pair in pairs:
        prompt = [m.to_dict() for m in pair.prompt]
        policy = [_reply_logprob(model, tokenizer, prompt, reply, max_length) for reply in (pair.chosen, pair.rejected)]
        with model.disable_adapter():
            reference = [_reply_logprob(model, tokenizer, prompt, reply, max_length) for reply in (pair.chosen, pair.rejected)]
        margins.append(beta * ((policy[0] - reference[0]) - (policy[1] - reference[1])))
    n = len(margins)
    correct = sum(m > 0 for m in margins)
    low, high = wilson_interval(correct, n) if n else (None, None)
    mean = sum(margins) / n if n else None
    spread = math.sqrt(sum((m - mean) ** 2 for m in margins) / (n - 1) / n) if n > 1 else None
    return {"n": n, "beta": beta, "accuracy": correct / n if n else None, "accuracy_ci": [low, high],
            "reward_margin": mean, "reward_margin_se": spread}
