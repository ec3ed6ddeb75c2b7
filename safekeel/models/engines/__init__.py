"""Generation engines: one interface (base.Engine) for evaluation (greedy batches) and serving (streamed
generations), backends `transformers`, `vllm` (served) and the offline vLLM engine (evaluation). Registry of the
serving engines: a new one is one class with @register_engine."""

from safekeel.models.engines.base import (
    ENGINES,
    Adapter,
    Chat,
    Engine,
    Generation,
    GenerationChunk,
    GenerationParams,
    create_engine,
    register_engine,
    render_chat,
    render_prompts,
)
from safekeel.models.engines.transformers_engine import TransformersEngine, generate_batched
from safekeel.models.engines.vllm_engine import VLLMEngine, VLLMOfflineEngine, lora_request, vllm_offline_engine

__all__ = ["ENGINES", "Adapter", "Chat", "Engine", "Generation", "GenerationChunk", "GenerationParams", "TransformersEngine",
           "VLLMEngine", "VLLMOfflineEngine", "create_engine", "generate_batched", "lora_request", "register_engine",
           "render_chat", "render_prompts", "vllm_offline_engine"]
