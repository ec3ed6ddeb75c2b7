"""Safety preference pairs: safety replay for preference training.

A pair per selected safety example: the harmful request as the prompt, the pool's refusal as the chosen reply, and as
the rejected reply a harmful compliance written by the raw base model (`smollm2-135m-instruct`, not safety-aligned:
it complied with 20 of 20 AdvBench prompts, ../shared/FACTS.md), greedy-decoded. The compliances are generated on
first use and cached on disk with their provenance (the model, a hash of its build, the decoding settings, the date,
library versions), keyed by the request's text: any pool and any selection reuse them. `safekeel safety-pairs`
(re)builds the cache for a whole pool.

A reply the refusal check (the caller's, e.g. the keyword judge) calls a refusal would teach the model to avoid
refusing: that example yields no pair and is recorded as dropped. A `contrastive` selection's borderline-but-safe
examples (category `borderline_safe`, their `refusal` field holds the helpful answer) pair the other way round: the
helpful answer is chosen and a refusal (BORDERLINE_REJECTED) rejected.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

from safekeel.data.conversation import PreferenceExample, SafetyExample
from safekeel.data.jsonl import read_jsonl, write_jsonl
from safekeel.models.registry import base_model_provenance, load_model_and_tokenizer, resolve_model
from safekeel.paths import safekeel_home
from safekeel.provenance import library_versions, sha256_file, sha256_json, write_json_atomic

log = logging.getLogger(__name__)

COMPLIANCE_MODEL = "smollm2-135m-instruct"
"""The raw (not safety-aligned) base model whose greedy replies to harmful requests are the rejected side."""
COMPLIANCE_MAX_NEW_TOKENS = 96
BORDERLINE_CATEGORY = "borderline_safe"
BORDERLINE_REJECTED = "I'm sorry, but I can't help with that."
"""The rejected reply of a borderline-but-safe example (an over-refusal)."""


def model_build_sha256(model: str) -> str:
    """A hash identifying the model's weights: its build provenance (registered models), else its config and weight
    files (a local folder)."""
    provenance = base_model_provenance(model)
    if provenance:
        return sha256_json(provenance)
    folder = Path(resolve_model(model))
    files = sorted(p for p in folder.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    return sha256_json({p.name: sha256_file(p) for p in files})


class ComplianceCache:
    """The raw model's replies to harmful requests, for one model build and one decoding setting: a folder under
    $SAFEKEEL_HOME/safety_pairs/ holding provenance.json and replies.jsonl ({request_sha256, request, reply,
    generated_at} a line)."""

    def __init__(self, model: str = COMPLIANCE_MODEL, max_new_tokens: int = COMPLIANCE_MAX_NEW_TOKENS,
                 root: str | Path | None = None) -> None:
        self.model = model
        self.decoding = {"strategy": "greedy", "max_new_tokens": max_new_tokens, "chat_template": True,
                         "engine": "transformers generate_batched"}
        self.build_sha256 = model_build_sha256(model)
        key = sha256_json({"model": model, "build": self.build_sha256, "decoding": self.decoding})[:12]
        label = Path(model).name if ("/" in model or Path(model).is_dir()) else model
        self.folder = Path(root or safekeel_home() / "safety_pairs") / f"{label}-{key}"
        self.replies_file = self.folder / "replies.jsonl"

    def provenance(self) -> dict:
        found = self.folder / "provenance.json"
        if found.is_file():
            return json.loads(found.read_text())
        return {"model": self.model, "model_build_sha256": self.build_sha256, "decoding": self.decoding}

    def rows(self) -> dict[str, dict]:
        """request -> its cached row."""
        if not self.replies_file.is_file():
            return {}
        return {row["request"]: row for row in read_jsonl(self.replies_file)}

    def replies(self, requests: Sequence[str], *, rebuild: bool = False, show_progress: bool = True,
                on_event: Callable[[str, dict], None] | None = None) -> dict[str, str]:
        """The reply to each request: cached ones read, missing ones generated (greedy) and added to the cache;
        `rebuild` generates every one again and starts the cache afresh."""
        rows = {} if rebuild else self.rows()
        missing = list(dict.fromkeys(r for r in requests if r not in rows))
        if missing:
            from safekeel.models.engines import generate_batched  # deferred on purpose: pulls in torch

            if on_event:
                on_event("message", {"text": f"Generating {len(missing)} harmful compliances with {self.model} (greedy, "
                                             f"{self.decoding['max_new_tokens']} tokens) for safety preference pairs"})
            model, tokenizer = load_model_and_tokenizer(self.model)
            outputs = generate_batched(model.eval(), tokenizer, [[{"role": "user", "content": r}] for r in missing],
                                       max_new_tokens=self.decoding["max_new_tokens"], desc="harmful compliances",
                                       show_progress=show_progress)
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            for request, output in zip(missing, outputs):
                if output.text is not None:  # a prompt too long to generate for stays out (no pair)
                    rows[request] = {"request_sha256": sha256_json(request), "request": request, "reply": output.text,
                                     "generated_at": now}
            created = None if rebuild else self.provenance().get("created")
            write_jsonl(self.replies_file, list(rows.values()))
            write_json_atomic(self.folder / "provenance.json", {
                "model": self.model, "model_build_sha256": self.build_sha256, "decoding": self.decoding,
                "created": created or now, "updated": now, "n_replies": len(rows), "versions": library_versions(),
                "rebuild": "safekeel safety-pairs --pool POOL --rebuild"})
        return {r: rows[r]["reply"] for r in requests if r in rows}


def build_safety_pairs(examples: Sequence[SafetyExample], cache: ComplianceCache, *,
                       is_refusal: Callable[[str], bool] | None = None, show_progress: bool = True,
                       on_event: Callable[[str, dict], None] | None = None) -> tuple[list[PreferenceExample], dict]:
    """A preference pair per safety example (module docstring), and the record of how they were made: the rejected
    side's model, build hash, decoding and cache, the pairs' ids and the dropped examples with the reason."""
    harmful = [e for e in examples if e.category != BORDERLINE_CATEGORY]
    replies = cache.replies([e.request for e in harmful], show_progress=show_progress, on_event=on_event)
    pairs, dropped = [], []
    for example in examples:
        meta = {"safety_id": example.id, "category": example.category}
        if example.category == BORDERLINE_CATEGORY:
            pairs.append(PreferenceExample.from_request(example.request, example.refusal, BORDERLINE_REJECTED,
                                                        source=f"safety:{example.id}", meta=meta))
            continue
        reply = replies.get(example.request)
        if reply is None or not reply.strip():
            dropped.append({"id": example.id, "reason": "the raw model gave no reply"})
        elif is_refusal is not None and is_refusal(reply):
            dropped.append({"id": example.id, "reason": "the raw model refused (no harmful compliance to reject)"})
        elif reply.strip() == example.refusal.strip():
            dropped.append({"id": example.id, "reason": "the raw model's reply is the refusal itself"})
        else:
            pairs.append(PreferenceExample.from_request(example.request, example.refusal, reply,
                                                        source=f"safety:{example.id}", meta=meta))
    provenance = cache.provenance()
    record = {"rejected_model": cache.model, "rejected_model_build_sha256": cache.build_sha256,
              "decoding": cache.decoding, "cache": str(cache.folder), "cache_created": provenance.get("created"),
              "pair_ids": [p.meta["safety_id"] for p in pairs], "dropped": dropped,
              "borderline_rejected": BORDERLINE_REJECTED if any(e.category == BORDERLINE_CATEGORY for e in examples) else None}
    return pairs, record
