"""The test-time guard: what a fine-tuned model's requests get before they reach the engine.

Per model (recorded when its job succeeds): an optional safety system prompt (PTST: train without
it, serve with it), and optional in-context safety demonstrations, either a static set chosen at
job time (the same prefix on every request, so vLLM's prefix cache makes it nearly free) or the
pool examples nearest to each request (faiss inner-product search over sentence embeddings).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GuardAction:
    """What the guard did to one request (for metrics and the response's `safekeel` field)."""

    system_prompt: bool = False
    demonstrations: list[str] = field(default_factory=list)
    mode: str = "none"


class RetrievalIndex:
    """Nearest safety examples to a request: faiss IndexFlatIP over unit-normalised embeddings."""

    def __init__(self, pool_name: str) -> None:
        import faiss

        from safekeel.data.safety import load_pool
        from safekeel.models.embedder import embed

        self.pool = load_pool(pool_name)
        vectors = embed([e.request for e in self.pool])
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.lock = threading.Lock()

    def nearest(self, text: str, k: int) -> list:
        from safekeel.models.embedder import embed

        query = embed([text[:2000]])
        with self.lock:
            _, ids = self.index.search(np.ascontiguousarray(query), min(k, len(self.pool)))
        return [self.pool[i] for i in ids[0] if i >= 0]


@functools.lru_cache(maxsize=8)
def retrieval_index(pool_name: str) -> RetrievalIndex:
    return RetrievalIndex(pool_name)


def apply_guard(messages: list[dict], guard: dict | None) -> tuple[list[dict], GuardAction]:
    """Return the messages the engine sees, and what was added."""
    action = GuardAction()
    if not guard:
        return messages, action
    system_parts = [m for m in messages if m["role"] in ("system", "developer")]
    rest = [m for m in messages if m["role"] not in ("system", "developer")]
    system_text = "\n\n".join(m["content"] for m in system_parts)
    if guard.get("system_prompt"):
        system_text = guard["system_prompt"] + ("\n\n" + system_text if system_text else "")
        action.system_prompt = True
    demos: list[dict] = []
    if guard.get("demonstrations") == "static":
        demos = guard.get("static_demonstrations", [])
        action.mode = "static"
    elif guard.get("demonstrations") == "retrieved":
        last_user = next((m["content"] for m in reversed(rest) if m["role"] == "user"), "")
        demos = [{"id": e.id, "request": e.request, "refusal": e.refusal}
                 for e in retrieval_index(guard["pool"]).nearest(last_user, guard.get("n_demonstrations", 3))]
        action.mode = "retrieved"
    action.demonstrations = [d["id"] for d in demos]
    out: list[dict] = [{"role": "system", "content": system_text}] if system_text else []
    for demo in demos:
        out += [{"role": "user", "content": demo["request"]}, {"role": "assistant", "content": demo["refusal"]}]
    return out + rest, action
