"""A plain transformers engine: one generation at a time, adapters through peft. It exists for
reading hidden states (monitors) and for serving tiny test models; chat serving uses vLLM."""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from safekeel.service.engines.base import Adapter, Engine, GenerationChunk, GenerationParams, register_engine


@register_engine("transformers")
class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, model_path: str, settings) -> None:
        super().__init__(model_path, settings)
        self.model = None
        self.loaded: set[str] = set()
        self.lock = threading.Lock()

    async def start(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _select_adapter(self, adapter: Adapter | None):
        from peft import PeftModel

        if adapter is None:
            if isinstance(self.model, PeftModel):
                return self.model.disable_adapter()
            return _null_context()
        key = f"a{adapter.int_id}"
        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, adapter.path, adapter_name=key).eval()
            self.loaded.add(key)
        elif key not in self.loaded:
            self.model.load_adapter(adapter.path, adapter_name=key)
            self.loaded.add(key)
        self.model.set_adapter(key)
        return _null_context()

    supports_hidden_states = True

    async def hidden_states(self, prompt: str, adapter: Adapter | None = None):
        import torch

        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)

        def run():
            with self.lock, torch.inference_mode(), self._select_adapter(adapter):
                return self.model(**inputs, output_hidden_states=True).hidden_states

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
