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


class VLLMGenerator:
    """Greedy batched generation with vLLM's offline engine, LoRA enabled: one engine (one startup)
    serves the base model and any number of adapters of it, each through a LoRARequest. Used by
    evaluations that run many fine-tunes of one base model (the benchmark grid); the transformers
    path above stays the default. In float32 its greedy replies were identical to transformers' on
    3 x 179 prompts; in bfloat16 (vLLM's choice on CPU for a float32 checkpoint) only 38-55% were
    (benchmarks/results/engine_agreement.md). One comparison uses one engine throughout: the engine
    is part of EvalSettings and so of every run's configuration. LoRA on CPU needs the grouped ops of
    safekeel/service/engines/vllm_cpu_lora.py (a vLLM plugin, installed with the package)."""

    def __init__(self, model_path: str, max_lora_rank: int = 64, max_model_len: int = 4096, kv_cache_gb: int = 2,
                 seed: int = 0, dtype: str = "auto") -> None:
        import os

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gb))
        # vLLM on x86 keeps one core free for its scheduler process by default, so on this 2-core machine
        # the model ran on one thread. For offline batch evaluation the calling process only waits: give
        # the worker every core. Measured (benchmarks/vllm_threads.py): 279 prompts through an adapter,
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
        self.tokenizer = self.llm.get_tokenizer()
        self._adapter_ids: dict[str, int] = {}

    def _lora(self, adapter: str | None):
        from vllm.lora.request import LoRARequest

        if adapter is None:
            return None
        key = str(adapter)
        if key not in self._adapter_ids:
            self._adapter_ids[key] = len(self._adapter_ids) + 1
        return LoRARequest(f"adapter-{self._adapter_ids[key]}", self._adapter_ids[key], key)

    def generate(self, chats: Sequence[Chat], max_new_tokens: int = 64, adapter: str | None = None,
                 show_progress: bool = True) -> list[Generation]:
        """Greedy replies; a prompt too long for the engine's context is reported as not generated.
        Prompts are tokenized once here and handed to vLLM as token ids."""
        from vllm import SamplingParams

        token_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in render_prompts(self.tokenizer, chats)]
        fits = [len(ids) + max_new_tokens <= self.max_model_len for ids in token_ids]
        runnable = [{"prompt_token_ids": ids} for ids, ok in zip(token_ids, fits) if ok]
        outputs = iter(self.llm.generate(runnable, SamplingParams(temperature=0.0, max_tokens=max_new_tokens),
                                         lora_request=self._lora(adapter), use_tqdm=show_progress) if runnable else [])
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
        for key, generator in list(_VLLM_GENERATORS.items()):
            if generator is self:
                del _VLLM_GENERATORS[key]


_VLLM_GENERATORS: dict[tuple[str, str], VLLMGenerator] = {}


def vllm_generator(model_path: str, dtype: str = "auto") -> VLLMGenerator:
    """The process's vLLM engine for this base model and dtype (started on first use, then reused;
    'auto' lets vLLM choose: bfloat16 on CPU for a float32 checkpoint)."""
    key = (model_path, dtype)
    if key not in _VLLM_GENERATORS:
        _VLLM_GENERATORS[key] = VLLMGenerator(model_path, dtype=dtype)
    return _VLLM_GENERATORS[key]
