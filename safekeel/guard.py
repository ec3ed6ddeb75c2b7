"""The test-time guard: what a fine-tuned model's requests get before they reach the engine. Built in one place.

A Guard is decided once per fine-tune (safekeel.pipeline builds it from the job's mode, selection and guard
options) and then used twice, unchanged: the evaluation and the safety gate ask their prompts through it, and
the service serves the deployed model through it (stored with the model as `Guard.to_dict()`). Its parts:

- a system prompt: a backdoor secret first (BackdoorAlign: the trigger the safety examples carried in
  training), then a safety system prompt (PTST: train without it, serve with it), then the caller's own;
- in-context safety demonstrations, either a static set chosen at job time (the same prefix on every
  request, so vLLM's prefix cache makes it nearly free; the `icl` mode's selection) or the pool examples
  nearest to each request (faiss inner-product search over sentence embeddings).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

import numpy as np

from safekeel.data.conversation import SafetyExample
from safekeel.data.safety import load_pool
from safekeel.defaults import DEFAULT_SAFETY_SYSTEM_PROMPT

DEMONSTRATION_MODES = ("none", "static", "retrieved")


@dataclass
class GuardAction:
    """What the guard did to one request (for metrics and the response's `safekeel` field)."""

    system_prompt: bool = False
    demonstrations: list[str] = field(default_factory=list)
    mode: str = "none"


@dataclass
class Guard:
    """What the served (and evaluated) model gets before each request. `to_dict()` is the stored form."""

    system_prompt: str | None = None
    demonstrations: Literal["none", "static", "retrieved"] = "none"
    static_demonstrations: list[dict] = field(default_factory=list)
    """{id, request, refusal} per demonstration, in order (demonstrations == "static")."""
    n_demonstrations: int = 3
    """Retrieved demonstrations per request (demonstrations == "retrieved")."""
    pool: str = "authored"
    """Where retrieved demonstrations come from."""
    backdoor: bool = False
    """The system prompt starts with a BackdoorAlign secret."""
    monitor_policy: str = "default"

    def __post_init__(self) -> None:
        if self.demonstrations not in DEMONSTRATION_MODES:
            raise ValueError(f"unknown guard demonstrations {self.demonstrations!r}; known: {', '.join(DEMONSTRATION_MODES)}")

    @property
    def active(self) -> bool:
        return bool(self.system_prompt) or self.demonstrations != "none"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Guard":
        if not data:
            return cls()
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})

    def system_text(self, caller_system: str | None = None) -> str | None:
        """The system message the engine sees: the guard's prompt first, then the caller's own."""
        parts = [p for p in (self.system_prompt, caller_system) if p]
        return "\n\n".join(parts) if parts else None

    def demonstrations_for(self, request: str) -> list[dict]:
        if self.demonstrations == "static":
            return list(self.static_demonstrations)
        if self.demonstrations == "retrieved":
            return [{"id": e.id, "request": e.request, "refusal": e.refusal}
                    for e in retrieval_index(self.pool).nearest(request, self.n_demonstrations)]
        return []

    def apply(self, messages: list[dict]) -> tuple[list[dict], GuardAction]:
        """The messages the engine sees, and what was added."""
        action = GuardAction(system_prompt=bool(self.system_prompt), mode=self.demonstrations)
        caller_system = "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer")) or None
        rest = [m for m in messages if m["role"] not in ("system", "developer")]
        last_user = next((m["content"] for m in reversed(rest) if m["role"] == "user"), "")
        demos = self.demonstrations_for(last_user)
        action.demonstrations = [d["id"] for d in demos]
        return assemble(self.system_text(caller_system), demos, rest), action


def assemble(system: str | None, demonstrations: Sequence[dict], messages: Sequence[dict]) -> list[dict]:
    """The one layout of a guarded chat: the system message, each demonstration as a user turn and its refusal
    as the assistant's turn, then the conversation."""
    out: list[dict] = [{"role": "system", "content": system}] if system else []
    for demo in demonstrations:
        out += [{"role": "user", "content": demo["request"]}, {"role": "assistant", "content": demo["refusal"]}]
    return out + list(messages)


def apply_guard(messages: list[dict], guard: "Guard | dict | None") -> tuple[list[dict], GuardAction]:
    """`Guard.apply` for a stored guard (a dict) or none."""
    if not guard:
        return messages, GuardAction()
    return (guard if isinstance(guard, Guard) else Guard.from_dict(guard)).apply(messages)


def build_guard(mode: str, *, selected: Sequence[SafetyExample] = (), secret: str | None = None,
                system_prompt: bool | str | None = False, demonstrations: str = "none", n_demonstrations: int = 3,
                pool: str = "authored", static_pick: Sequence[SafetyExample] | None = None,
                monitor_policy: str = "default") -> Guard:
    """The guard a fine-tune is evaluated and served with.

    The mode decides its core: `backdoor` serves the secret it trained with, `ptst` serves safekeel's safety
    system prompt, `icl` serves the k selected examples as static demonstrations. The guard options add to it:
    `system_prompt` (True: safekeel's default prompt, or your own text), `demonstrations` ("static": the first
    `n_demonstrations` of the selection, or of `static_pick` when the mode selected nothing; "retrieved": the
    pool examples nearest to each request)."""
    parts: list[str] = []
    if mode == "backdoor":
        if not secret:
            raise ValueError("a backdoor guard needs the secret prompt the safety examples were trained with")
        parts.append(secret)
    if mode == "ptst" or system_prompt is True:
        parts.append(DEFAULT_SAFETY_SYSTEM_PROMPT)
    if isinstance(system_prompt, str) and system_prompt and system_prompt not in parts:
        parts.append(system_prompt)
    static: list[dict] = []
    if mode == "icl":
        if demonstrations == "retrieved":
            raise ValueError("mode icl serves its selected examples as static demonstrations; guard demonstrations "
                             "'retrieved' would replace them (choose one)")
        demonstrations, static = "static", [_demo(e) for e in selected]
    elif demonstrations == "static":
        chosen = list(selected) if selected else list(static_pick or [])
        if not chosen:
            raise ValueError("static guard demonstrations need examples: a selection, or a pick from the pool")
        static = [_demo(e) for e in chosen[:n_demonstrations]]
    return Guard(system_prompt="\n\n".join(dict.fromkeys(parts)) or None, demonstrations=demonstrations,  # type: ignore[arg-type]
                 static_demonstrations=static, n_demonstrations=n_demonstrations, pool=pool,
                 backdoor=mode == "backdoor", monitor_policy=monitor_policy)


def _demo(example: SafetyExample) -> dict:
    return {"id": example.id, "request": example.request, "refusal": example.refusal}


class RetrievalIndex:
    """Nearest safety examples to a request: faiss IndexFlatIP over unit-normalised embeddings."""

    def __init__(self, pool_name: str) -> None:
        import faiss  # deferred on purpose: an optional, heavy dependency only retrieval needs

        from safekeel.models.embedder import embed

        self.embed = embed
        self.pool = load_pool(pool_name)
        vectors = embed([e.request for e in self.pool])
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.lock = threading.Lock()

    def nearest(self, text: str, k: int) -> list:
        query = self.embed([text[:2000]])
        with self.lock:
            _, ids = self.index.search(np.ascontiguousarray(query), min(k, len(self.pool)))
        return [self.pool[i] for i in ids[0] if i >= 0]


@functools.lru_cache(maxsize=8)
def retrieval_index(pool_name: str) -> RetrievalIndex:
    return RetrievalIndex(pool_name)
