"""The engine interface, one for evaluation and serving: render a chat with the model's template, then either
stream one generation (the service's chat and completion endpoints) or reply greedily to a batch of chats
(evaluation), optionally through a LoRA adapter.

Backends: `transformers` (a transformers model: the evaluation default, hidden states for the monitors,
tiny test models), `vllm` (vLLM's AsyncLLM: chat serving) and the offline vLLM engine (vllm.LLM: batch
evaluation of many adapters of one base model, `vllm_offline_engine`). A backend implements what it is
used for; the others raise NotImplementedError naming the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

from safekeel.registry import Registry

Chat = list[dict[str, str]]


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


@dataclass
class Generation:
    """One greedy reply of a batch."""

    text: str | None
    error: str | None = None  # set when this prompt could not be generated; text is then None
    new_tokens: int = 0


def render_chat(tokenizer, messages: Sequence[dict]) -> str:
    """A chat as the model is prompted with it: its chat template, the assistant turn opened."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def render_prompts(tokenizer, chats: Sequence[Chat]) -> list[str]:
    return [render_chat(tokenizer, chat) for chat in chats]


class Engine:
    """A base model behind one of the backends. `settings` (serving engines) carries kv_cache_gb,
    max_lora_rank, max_loras, max_cpu_loras and max_model_len (safekeel.service.settings.ServiceSettings)."""

    name: str = "engine"
    supports_hidden_states: bool = False

    def __init__(self, model_path: str | None, settings=None, tokenizer=None) -> None:
        if tokenizer is None:
            from transformers import AutoTokenizer  # deferred on purpose: heavy

            tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model_path = model_path
        self.settings = settings
        self.tokenizer = tokenizer
        self._adapter_ids: dict[str, int] = {}

    def render_chat(self, messages: Sequence[dict]) -> str:
        return render_chat(self.tokenizer, messages)

    def local_adapter(self, path: str | Path) -> Adapter:
        """The adapter in folder `path`, with an integer id stable for this engine (1, 2, ... in order of first use):
        how evaluation names the adapters it loads by path (the service's come from its model store)."""
        key = str(path)
        if key not in self._adapter_ids:
            self._adapter_ids[key] = len(self._adapter_ids) + 1
        return Adapter(f"adapter-{self._adapter_ids[key]}", self._adapter_ids[key], key)

    def _adapter(self, adapter: Adapter | str | Path | None) -> Adapter | None:
        return adapter if adapter is None or isinstance(adapter, Adapter) else self.local_adapter(adapter)

    async def start(self) -> None:
        """Load the model (serving engines start inside the server's event loop)."""
        return None

    def generate(self, prompt: str, params: GenerationParams, request_id: str,
                 adapter: Adapter | None = None) -> AsyncIterator[GenerationChunk]:
        """Stream one generation for a rendered prompt (serving)."""
        raise NotImplementedError(f"the {self.name} engine does not stream generations")

    def generate_batch(self, chats: Sequence[Chat], max_new_tokens: int = 64, adapter: Adapter | str | Path | None = None,
                       *, batch_size: int = 32, max_prompt_tokens: int = 4096, desc: str = "generating",
                       show_progress: bool = True) -> list[Generation]:
        """Greedy replies to chats, in order (evaluation). `adapter`: an Adapter or the folder of one. A prompt
        the engine cannot take whole is reported as not generated (Generation.error), never cut."""
        raise NotImplementedError(f"the {self.name} engine does not generate batches")

    async def hidden_states(self, prompt: str, adapter: Adapter | None = None):
        """The residual stream for `prompt` (safekeel.models.capture.residual_stream): a tuple of (1, tokens,
        hidden) float32 tensors, element N the stream entering decoder block N (element 0: the embeddings).
        Engines that cannot expose activations (vLLM) raise NotImplementedError; monitors then use a
        transformers engine beside the serving one."""
        raise NotImplementedError(f"the {self.name} engine does not expose hidden states")

    async def shutdown(self) -> None:
        return None


ENGINES: Registry[Callable[..., Engine]] = Registry("engine")
"""Serving engines by name (ServiceSettings.engine): factories of (model_path, settings)."""
register_engine = ENGINES.register


def create_engine(kind: str, model_path: str, settings) -> Engine:
    """A serving engine for the base model in `model_path` (call `await engine.start()` before use)."""
    return ENGINES.factory(kind)(model_path, settings)
