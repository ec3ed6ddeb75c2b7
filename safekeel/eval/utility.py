"""Task utility: held-out loss on conversations, and GSM8K exact-match accuracy."""

from __future__ import annotations

import math
import re
from typing import Sequence

from tqdm.auto import tqdm

from safekeel.data.conversation import Conversation
from safekeel.models.engines import generate_batched

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def with_context(context: Sequence[dict[str, str]], messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The messages as the model is served them: the context's system prompt first (before the conversation's
    own system prompt, in one system message), then the context's other turns (e.g. in-context
    demonstrations), then the conversation."""
    context, messages = list(context), list(messages)
    system = [m["content"] for m in context[:1] + messages[:1] if m["role"] == "system"]
    turns = [m for m in context if m["role"] != "system"]
    rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
    return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + turns + rest


def heldout_loss(model, tokenizer, conversations: Sequence[Conversation], batch_size: int = 16,
                 max_length: int = 512, show_progress: bool = True, context: Sequence[dict[str, str]] = ()) -> dict:
    """Mean negative log-likelihood per completion token of each final assistant turn (teacher forced).
    `context`: messages the model is served before each conversation (a system prompt, demonstrations), so
    the loss is the served model's; they are never scored, and `max_length` counts the conversation only."""
    import torch

    total_nll, total_tokens, skipped = 0.0, 0, 0
    model.eval()
    pad = tokenizer.pad_token_id
    with torch.inference_mode(), tqdm(total=len(conversations), desc="held-out loss", disable=not show_progress) as bar:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start:start + batch_size]
            sequences, masks = [], []
            for conv in chunk:
                prompt_messages = [m.to_dict() for m in conv.prompt_messages]
                prompt = tokenizer.apply_chat_template(with_context(context, prompt_messages), add_generation_prompt=True, tokenize=False)
                full = tokenizer.apply_chat_template(with_context(context, conv.to_messages()), tokenize=False)
                prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                extra = 0
                if context:  # the context's own tokens do not count against max_length
                    plain = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)
                    extra = max(len(prompt_ids) - len(tokenizer(plain, add_special_tokens=False)["input_ids"]), 0)
                full_ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length + extra]
                if len(full_ids) <= len(prompt_ids):
                    skipped += 1
                    continue
                sequences.append(full_ids)
                masks.append([0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids)))
            if sequences:
                width = max(map(len, sequences))
                ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
                attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
                loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.bool)
                # only the positions that predict a scored token get logits: from the shortest prompt's last
                # token on (served demonstrations make prompts ~10x longer than answers, and a full-width
                # fp32 logits tensor of 16 x 1,500 x 49k is 4.7 GB, twice over in cross_entropy)
                first = min(len(m) - sum(m) for m in masks)
                logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=width - first + 1).logits[:, :-1].float()
                targets = ids[:, first:]
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)
                selected = loss_mask[:, first:]
                total_nll += float(nll[selected].sum())
                total_tokens += int(selected.sum())
            bar.update(len(chunk))
    loss = total_nll / total_tokens if total_tokens else None
    return {"loss": loss, "perplexity": math.exp(loss) if loss is not None else None,
            "n": len(conversations) - skipped, "tokens": total_tokens, "skipped": skipped, "context_messages": len(context)}


def extract_final_number(text: str | None) -> str | None:
    """GSM8K convention: the number after '####', else the last number in the text."""
    if not text:
        return None
    tail = text.split("####")[-1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[0] if "####" in text else numbers[-1]
    value = value.replace(",", "").rstrip(".")
    try:
        number = float(value)
    except ValueError:
        return None
    return str(int(number)) if number.is_integer() else str(number)


def gsm8k_accuracy(model, tokenizer, conversations: Sequence[Conversation], max_new_tokens: int = 192,
                   batch_size: int = 16, show_progress: bool = True, context: Sequence[dict[str, str]] = ()) -> dict:
    from safekeel.eval.stats import Rate

    generations = generate_batched(model, tokenizer, [with_context(context, [m.to_dict() for m in c.prompt_messages]) for c in conversations],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, desc="gsm8k", show_progress=show_progress)
    correct = unjudged = 0
    for conv, generation in zip(conversations, generations):
        if generation.text is None:
            unjudged += 1
            continue
        gold = extract_final_number(conv.completion)
        correct += int(gold is not None and extract_final_number(generation.text) == gold)
    rate = Rate(correct, len(conversations) - unjudged, unjudged)
    return {"accuracy": rate.to_dict(), "max_new_tokens": max_new_tokens}
