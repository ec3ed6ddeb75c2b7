"""`safekeel finetune`: select k safety examples, mix them into the user data, LoRA SFT, evaluate.

A FinetuneSpec is self-contained and serialisable (the service's job spec wraps it). Every run
writes, into its output folder: adapter/ (vLLM-servable LoRA), selection.json, provenance.json,
eval/eval_report.json + eval/responses.jsonl, and prints a short human summary.

The mode decides where the selected examples go (safekeel.training.mixing): into training (replay,
backdoor) or into the evaluated chats (icl demonstrations; ptst's safety system prompt, no
selection). With `adapter_cache`, adapters are cached by a hash of the training inputs (base model,
the mixed training data, the SFT config with its seed): runs whose training does not depend on the
selector (none, icl, ptst) train once and share the adapter.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from safekeel.data.conversation import Conversation, SafetyExample
from safekeel.data.formats import load_conversations
from safekeel.data.safety import AUTHORED_POOL, load_pool
from safekeel.eval.harness import EvalReport, EvalSettings, evaluate
from safekeel.models.registry import ModelNotFoundError, load_model_and_tokenizer, resolve_model
from safekeel.provenance import library_versions, machine_info, sha256_file, sha256_json, write_json_atomic
from safekeel.selectors import DEFAULT_SELECTOR, SelectionContext, get_selector
from safekeel.training.config import LoraSFTConfig
from safekeel.training.mixing import MODES, SELECTING_MODES, TRAINING_MODES, backdoor_prefix, eval_overrides, mix
from safekeel.training.sft import train_lora

log = logging.getLogger(__name__)


@dataclass
class FinetuneSpec:
    data: str
    """User training data (chat JSONL, prompt/completion JSONL, Alpaca JSON/JSONL, question/answer JSONL)."""
    output_dir: str
    model: str = "smollm2-135m-safe"
    k: int = 10
    """Safety examples to select (modes replay, backdoor, icl); recorded as 0 for ptst, which selects none."""
    selector: str = DEFAULT_SELECTOR
    mode: str = "replay"
    """none | replay | backdoor | icl | ptst (see safekeel.training.mixing.MODES)."""
    pool: str = AUTHORED_POOL
    seed: int = 0
    """One seed for selection, data order and adapter init."""
    max_examples: int | None = None
    """Use only the first n user examples (after loading)."""
    sft: LoraSFTConfig = field(default_factory=LoraSFTConfig)
    eval: EvalSettings | None = field(default_factory=EvalSettings)
    """None skips evaluation."""
    checkpoint_steps: int | None = None
    """Save a resumable trainer checkpoint every n steps (under checkpoints/); a rerun resumes from it."""

    def __post_init__(self) -> None:
        if isinstance(self.sft, dict):
            self.sft = LoraSFTConfig(**self.sft)
        if isinstance(self.eval, dict):
            self.eval = EvalSettings(**self.eval)
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {MODES}")
        if self.mode == "ptst":
            self.k = 0
        self.sft.seed = self.seed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FinetuneSpec":
        return cls(**data)


@dataclass
class FinetuneResult:
    output_dir: Path
    adapter_dir: Path
    selection: dict | None
    provenance: dict
    report: EvalReport | None


def adapter_key(model: str, training_data_sha256: str, sft: LoraSFTConfig, base_provenance: dict | None = None) -> str:
    """The adapter cache key: everything training depends on (the base model, by name and by its build
    provenance when it has one, so a rebuilt organism does not reuse stale adapters; the mixed
    training data in its order; the SFT config including its seed)."""
    return sha256_json({"model": model, "base": base_provenance, "training_data": training_data_sha256,
                        "sft": sft.to_dict()})[:20]


def base_model_provenance(model: str, build: bool = True) -> dict | None:
    """The build provenance of a registered or local model (None for a hub id): identifies its weights.
    With build=False, a registered model that is not built yet, or a name that resolves to nothing, gives None."""
    try:
        location = resolve_model(model, build=build)
    except ModelNotFoundError:
        if build:
            raise
        return None
    return _read_json(Path(location) / "provenance.json") if isinstance(location, Path) else None


def select_safety(user_data: Sequence[Conversation], pool_name: str, k: int, selector: str, seed: int, model: str, *,
                  store: str | Path | None = None, base_provenance: dict | None = None,
                  pool: Sequence[SafetyExample] | None = None) -> tuple[dict, list[SafetyExample]]:
    """k safety examples from the pool for this user data: (the selection record, the chosen examples).
    The record (selection.json) holds the selector's ids, scores, rationale and details, the pool, its size and
    content hash, the model, the time taken, and each chosen example's id, category and request. `store`: where
    selectors keep k-independent results between calls (SelectionContext.store)."""
    chooser = get_selector(selector)  # an unknown name fails here, before the pool and the model load
    pool = list(pool) if pool is not None else load_pool(pool_name)
    if base_provenance is None and store is not None:  # the model's identity keys the stored results
        base_provenance = base_model_provenance(model)
    context = SelectionContext(pool, user_data, k, seed, model_name=model, store=store,
                               model_fingerprint=sha256_json(base_provenance) if base_provenance else None)
    started = time.time()
    chosen = chooser.select(context)
    seconds = round(time.time() - started, 3)
    if context.model_fingerprint is None:  # recorded all the same, without building a model the selector never used
        found = base_model_provenance(model, build=False)
        context.model_fingerprint = sha256_json(found) if found else None
    safety = chosen.examples(pool)
    selection = {**chosen.to_dict(), "pool": pool_name, "pool_size": len(pool), "pool_sha256": context.pool_digest,
                 "model": model, "model_fingerprint": context.model_fingerprint, "seconds": seconds,
                 "examples": [{"id": e.id, "category": e.category, "request": e.request} for e in safety]}
    return selection, safety


def run_finetune(spec: FinetuneSpec, should_stop: Callable[[], bool] | None = None,
                 on_event: Callable[[str, dict], None] | None = None, show_progress: bool = True,
                 adapter_cache: str | Path | None = None, selection_store: str | Path | None = None) -> FinetuneResult:
    """Select, mix, train (or reuse a cached adapter from `adapter_cache/<adapter_key>`), evaluate. With
    `selection_store`, selectors keep their k-independent results there (SelectionContext.store) for later runs."""
    started = time.time()
    emit = on_event or (lambda kind, payload: None)
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    loaded = load_conversations(spec.data)
    if loaded.skipped:
        log.warning(loaded.summary())
    user_data = loaded.conversations[: spec.max_examples] if spec.max_examples else loaded.conversations
    emit("data", {"path": spec.data, "format": loaded.format, "n_used": len(user_data),
                  "skipped": [s.describe(spec.data, loaded.unit) for s in loaded.skipped]})

    base_provenance = base_model_provenance(spec.model)
    selection = None
    safety = []
    if spec.mode in SELECTING_MODES:
        emit("selecting", {"selector": spec.selector, "k": spec.k, "pool": spec.pool})
        selection, safety = select_safety(user_data, spec.pool, spec.k, spec.selector, spec.seed, spec.model,
                                          store=selection_store, base_provenance=base_provenance)
        write_json_atomic(out / "selection.json", selection)
        emit("selection", selection)
    training_data = mix(user_data, safety, spec.mode, spec.seed)
    secret = backdoor_prefix(spec.seed) if spec.mode == "backdoor" else None
    if secret and selection is not None:
        selection["backdoor_prefix"] = secret
        write_json_atomic(out / "selection.json", selection)

    training_sha = sha256_json([c.to_messages() for c in training_data])
    key = adapter_key(spec.model, training_sha, spec.sft, base_provenance)
    overrides = eval_overrides(spec.mode, safety, spec.eval.system_prompt if spec.eval else None, spec.seed)
    model, tokenizer = load_model_and_tokenizer(spec.model)
    cached = Path(adapter_cache) / key if adapter_cache is not None else None
    if cached is not None and (cached / "train.json").is_file():
        from peft import PeftModel

        adapter_dir = cached
        train = {**json.loads((cached / "train.json").read_text())["train"], "cached": True}
        model = PeftModel.from_pretrained(model, str(cached))
        log.info("reusing the cached adapter %s (same training inputs)", cached)
    else:
        adapter_dir = cached.with_name(f".{key}.{os.getpid()}.tmp") if cached is not None else out / "adapter"
        result = train_lora(model, tokenizer, training_data, spec.sft, adapter_dir, should_stop=should_stop,
                            on_log=lambda logs: emit("train_log", logs), show_progress=show_progress,
                            checkpoint_dir=out / "checkpoints" if spec.checkpoint_steps else None,
                            checkpoint_steps=spec.checkpoint_steps,
                            on_checkpoint=lambda step, path: emit("checkpoint", {"step": step, "path": str(path)}))
        shutil.rmtree(adapter_dir / "trainer", ignore_errors=True)
        train = {"steps": result.steps, "seconds": result.seconds, "train_loss": result.train_loss,
                 "resumed_from": result.resumed_from}
        if cached is not None:
            write_json_atomic(adapter_dir / "train.json", {"model": spec.model, "training_data_sha256": training_sha,
                                                           "sft": spec.sft.to_dict(), "train": train})
            if cached.exists():  # another process cached the same adapter meanwhile
                shutil.rmtree(adapter_dir)
            else:
                os.replace(adapter_dir, cached)
            adapter_dir = cached
    provenance = {
        "spec": spec.to_dict(),
        "data_sha256": sha256_file(spec.data),
        "n_user_examples": len(user_data),
        "n_training_examples": len(training_data),
        "training_data_sha256": training_sha,
        "selected_ids": selection["ids"] if selection else [],
        "backdoor_prefix": secret,
        "mode_effect": {
            "mode": spec.mode,
            "selects": spec.mode in SELECTING_MODES,
            "trains_on_selection": spec.mode in TRAINING_MODES,
            "eval_system_prompt": overrides.get("system_prompt"),
            "eval_demonstration_ids": [d["id"] for d in overrides.get("demonstrations", [])],
        },
        "adapter_key": key,
        "adapter_dir": str(adapter_dir),
        "base_model": spec.model,
        "base_model_provenance": base_provenance,
        "train": train,
        "versions": library_versions(),
        "machine": machine_info(),
    }
    write_json_atomic(out / "provenance.json", provenance)
    emit("trained", provenance["train"])

    report = None
    if spec.eval is not None:
        # evaluate the model as it is served: backdoor's secret / ptst's safety prompt as the system
        # prompt, icl's selected examples as demonstrations
        eval_settings = replace(spec.eval, **overrides)
        report = evaluate(model, tokenizer, eval_settings, model_name=spec.model, adapter=str(adapter_dir),
                          output_dir=out / "eval", show_progress=show_progress)
        emit("eval", report.to_dict())
    provenance["seconds"] = round(time.time() - started, 1)
    write_json_atomic(out / "provenance.json", provenance)
    return FinetuneResult(out, adapter_dir, selection, provenance, report)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
