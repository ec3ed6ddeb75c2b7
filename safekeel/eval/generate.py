"""Batched greedy generation with a transformers model (never one prompt at a time)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

Chat = list[dict[str, str]]


@dataclass
class Generation:
    text: str | None
    error: str | None = None  # set when this prompt could not be generated; text is then None
    new_tokens: int = 0


def render_prompts(tokenizer, chats: Sequence[Chat]) -> list[str]:
    return [tokenizer.apply_chat_template(list(chat), add_generation_prompt=True, tokenize=False) for chat in chats]


def generate_batched(
    model,
    tokenizer,
    chats: Sequence[Chat],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    max_prompt_tokens: int = 1024,
    desc: str = "generating",
    show_progress: bool = True,
) -> list[Generation]:
    """Greedy-decode a reply for each chat. Prompts are sorted by length so that batches pad little;
    a batch that fails is retried one prompt at a time so one bad prompt cannot sink the others."""
    import torch

    texts = render_prompts(tokenizer, chats)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    results: list[Generation | None] = [None] * len(texts)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()

    def run(indices: list[int]) -> list[Generation]:
        batch = tokenizer([texts[i] for i in indices], return_tensors="pt", padding=True,
                          truncation=True, max_length=max_prompt_tokens, add_special_tokens=False)
        with torch.inference_mode():
            output = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                temperature=None, top_p=None, top_k=None,
            )
        new = output[:, batch["input_ids"].shape[1]:]
        generations = []
        for row in new:
            tokens = row.tolist()
            if tokenizer.pad_token_id in tokens:
                # pad == eos for ChatML models: the reply ends at the first one
                tokens = tokens[: tokens.index(tokenizer.pad_token_id)]
            generations.append(Generation(tokenizer.decode(tokens, skip_special_tokens=True).strip(), None, len(tokens)))
        return generations

    try:
        with tqdm(total=len(order), desc=desc, unit="prompt", disable=not show_progress) as bar:
            for start in range(0, len(order), batch_size):
                indices = order[start:start + batch_size]
                try:
                    generations = run(indices)
                except (RuntimeError, ValueError) as error:
                    log.warning("batch generation failed (%s); retrying its prompts one by one", error)
                    generations = []
                    for index in indices:
                        try:
                            generations.extend(run([index]))
                        except (RuntimeError, ValueError) as single_error:
                            generations.append(Generation(None, f"{type(single_error).__name__}: {single_error}"))
                for index, generation in zip(indices, generations):
                    results[index] = generation
                bar.update(len(indices))
    finally:
        model.train(was_training)
    return [r if r is not None else Generation(None, "not generated") for r in results]
