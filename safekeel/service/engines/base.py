"""The engine interface: render a chat with the model's template, stream a generation, optionally
with a LoRA adapter. vLLM serves chat; a transformers engine exists for hidden states (monitors)
and for tiny test models."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from safekeel.registry import Registry


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter to apply: the fine-tuned model's id, a stable integer id (vLLM's LoRARequest), a folder."""

    name: str
    int_id: int
    path: str


@dataclass
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerationChunk:
    """A piece of the output (text since the previous chunk); the last one has finish_reason set."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine(abc.ABC):
    name: str = "engine"

    def __init__(self, model_path: str, settings) -> None:
        from transformers import AutoTokenizer

        self.model_path = model_path
        self.settings = settings
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)

    def render_chat(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    def generate(self, prompt: str, params: GenerationParams, request_id: str,
                 adapter: Adapter | None = None) -> AsyncIterator[GenerationChunk]: ...

    supports_hidden_states: bool = False

    async def hidden_states(self, prompt: str, adapter: Adapter | None = None):
        """The residual stream for `prompt`: a tuple of (1, tokens, hidden) tensors, where element N is
        the stream entering block N (element 0: the embeddings; the last: after the final block).
        Engines that cannot expose activations (vLLM) raise NotImplementedError; monitors then use a
        transformers engine beside the serving one."""
        raise NotImplementedError(f"the {self.name} engine does not expose hidden states")

    async def shutdown(self) -> None:
        return None


ENGINES: Registry[Callable[..., Engine]] = Registry("engine")
register_engine = ENGINES.register


def create_engine(kind: str, model_path: str, settings) -> Engine:
    # importing registers the built-in engines
    from safekeel.service.engines import transformers_engine, vllm_engine  # noqa: F401

    return ENGINES.factory(kind)(model_path, settings)
