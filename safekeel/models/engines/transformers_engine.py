"""The transformers engine: a transformers model object, adapters through peft.

Evaluation wraps the model it was given (`TransformersEngine.for_model`, adapter already applied) and asks
it for greedy replies in batches (`generate_batched`, never one prompt at a time); the service loads one
(`start`) to read hidden states for the monitors and to serve tiny test models, one generation at a time
(chat serving uses vLLM)."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import AsyncIterator, Sequence

from tqdm.auto import tqdm

from safekeel.models.capture import decoder_layers, residual_stream
from safekeel.models.engines.base import (
    Adapter,
    Chat,
    Engine,
    Generation,
    GenerationChunk,
    GenerationParams,
    register_engine,
    render_prompts,
)

# torch, transformers and peft are imported inside the methods that use them, on purpose (heavy).

log = logging.getLogger(__name__)


def generate_batched(
    model,
    tokenizer,
    chats: Sequence[Chat],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    max_prompt_tokens: int = 4096,
    desc: str = "generating",
    show_progress: bool = True,
) -> list[Generation]:
    """Greedy-decode a reply for each chat. Prompts are sorted by length so that batches pad little;
    a batch that fails is retried one prompt at a time so one bad prompt cannot sink the others. A prompt
    longer than `max_prompt_tokens` is reported as not generated (as the vLLM engine does), never cut: cutting
    either end would evaluate another prompt than the one asked (the request itself, or the system prompt
    and demonstrations before it)."""
    import torch

    texts = render_prompts(tokenizer, chats)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    results: list[Generation | None] = [
        Generation(None, f"prompt of {n} tokens is longer than max_prompt_tokens ({max_prompt_tokens})") if n > max_prompt_tokens else None
        for n in lengths]
    order = sorted((i for i in range(len(texts)) if results[i] is None), key=lambda i: len(texts[i]))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()

    def run(indices: list[int]) -> list[Generation]:
        batch = tokenizer([texts[i] for i in indices], return_tensors="pt", padding=True, add_special_tokens=False)
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


@register_engine("transformers")
class TransformersEngine(Engine):
    name = "transformers"
    supports_hidden_states = True

    def __init__(self, model_path: str | None, settings=None, model=None, tokenizer=None) -> None:
        super().__init__(model_path, settings, tokenizer)
        self.model = model
        self.loaded: set[str] = set()
        """Adapters this engine loaded (a model given to it is used as given: adapter=None leaves it alone)."""
        self.lock = threading.Lock()

    @classmethod
    def for_model(cls, model, tokenizer) -> "TransformersEngine":
        """An engine around a loaded model (with its adapter applied, if any): what evaluation generates with."""
        return cls(getattr(model, "name_or_path", None), model=model, tokenizer=tokenizer)

    async def start(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _select_adapter(self, adapter: Adapter | None):
        """A context in which the model runs with `adapter` (None: without the adapters this engine loaded)."""
        if adapter is None:
            if self.loaded:
                return self.model.disable_adapter()
            return _null_context()
        from peft import PeftModel

        key = f"a{adapter.int_id}"
        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, adapter.path, adapter_name=key).eval()
            self.loaded.add(key)
        elif key not in self.loaded:
            self.model.load_adapter(adapter.path, adapter_name=key)
            self.loaded.add(key)
        self.model.set_adapter(key)
        return _null_context()

    def generate_batch(self, chats: Sequence[Chat], max_new_tokens: int = 64, adapter: Adapter | str | Path | None = None,
                       *, batch_size: int = 32, max_prompt_tokens: int = 4096, desc: str = "generating",
                       show_progress: bool = True) -> list[Generation]:
        with self.lock, self._select_adapter(self._adapter(adapter)):
            return generate_batched(self.model, self.tokenizer, chats, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    max_prompt_tokens=max_prompt_tokens, desc=desc, show_progress=show_progress)

    async def hidden_states(self, prompt: str, adapter: Adapter | None = None):
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)

        def run():
            with self.lock, self._select_adapter(adapter):  # the one capture the selectors and monitors use
                streams = residual_stream(self.model, inputs["input_ids"], inputs["attention_mask"],
                                          range(len(decoder_layers(self.model))))
            return tuple(streams[layer] for layer in sorted(streams))

        return await asyncio.get_running_loop().run_in_executor(None, run)

    async def generate(self, prompt: str, params: GenerationParams, request_id: str,
                       adapter: Adapter | None = None) -> AsyncIterator[GenerationChunk]:
        import torch
        from transformers import TextIteratorStreamer

        loop = asyncio.get_running_loop()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        counted = {"completion": 0}

        def run() -> None:
            with self.lock, torch.inference_mode():
                with self._select_adapter(adapter):
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    sample = params.temperature > 0
                    output = self.model.generate(
                        **inputs, max_new_tokens=params.max_tokens, do_sample=sample,
                        temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
                        top_k=None, streamer=streamer, pad_token_id=self.tokenizer.pad_token_id,
                        stop_strings=params.stop or None, tokenizer=self.tokenizer if params.stop else None)
                    counted["completion"] = int(output.shape[1] - inputs["input_ids"].shape[1])

        worker = loop.run_in_executor(None, run)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        text = ""
        iterator = iter(streamer)
        while True:
            piece = await loop.run_in_executor(None, next, iterator, None)
            if piece is None:
                break
            if piece:
                text += piece
                yield GenerationChunk(piece, None, prompt_tokens, 0)
        await worker
        completion = counted["completion"]
        finish = "length" if completion >= params.max_tokens else "stop"
        for stop in params.stop:
            if stop in text:
                finish = "stop"
        yield GenerationChunk("", finish, prompt_tokens, completion)


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
