"""`safekeel finetune`: select k safety examples, mix them into the user data, LoRA SFT, evaluate.

A FinetuneSpec is self-contained and serialisable (the service's job spec wraps it). Every run
writes, into its output folder: adapter/ (vLLM-servable LoRA), selection.json, provenance.json,
eval/eval_report.json + eval/responses.jsonl, and prints a short human summary.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from safekeel.data.formats import load_conversations
from safekeel.data.safety import AUTHORED_POOL, load_pool
from safekeel.eval.harness import EvalReport, EvalSettings, evaluate
from safekeel.models.registry import load_model_and_tokenizer, resolve_model
from safekeel.provenance import library_versions, sha256_file, sha256_json, write_json_atomic
from safekeel.selectors import SelectionContext, get_selector
from safekeel.training.config import LoraSFTConfig
from safekeel.training.mixing import MODES, backdoor_prefix, mix
from safekeel.training.sft import train_lora

log = logging.getLogger(__name__)


@dataclass
class FinetuneSpec:
    data: str
    """User training data (chat JSONL, prompt/completion JSONL, Alpaca JSON/JSONL, question/answer JSONL)."""
    output_dir: str
    model: str = "smollm2-135m-safe"
    k: int = 10
    selector: str = "random"
    mode: str = "replay"
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
            self.eval = EvalSettings(**{k: tuple(v) if k == "judges" else v for k, v in self.eval.items()})
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {MODES}")
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


def run_finetune(spec: FinetuneSpec, should_stop: Callable[[], bool] | None = None,
                 on_event: Callable[[str, dict], None] | None = None, show_progress: bool = True) -> FinetuneResult:
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

    selection = None
    safety = []
    if spec.mode != "none":
        pool = load_pool(spec.pool)
        context = SelectionContext(pool, user_data, spec.k, spec.seed, model_name=spec.model)
        selection_started = time.time()
        chosen = get_selector(spec.selector).select(context)
        selection = {**chosen.to_dict(), "pool": spec.pool, "pool_size": len(pool),
                     "seconds": round(time.time() - selection_started, 3)}
        safety = chosen.examples(pool)
        selection["examples"] = [{"id": e.id, "category": e.category, "request": e.request} for e in safety]
        write_json_atomic(out / "selection.json", selection)
        emit("selection", selection)
    training_data = mix(user_data, safety, spec.mode, spec.seed)
    secret = backdoor_prefix(spec.seed) if spec.mode == "backdoor" else None
    if secret and selection is not None:
        selection["backdoor_prefix"] = secret
        write_json_atomic(out / "selection.json", selection)

    model, tokenizer = load_model_and_tokenizer(spec.model)
    adapter_dir = out / "adapter"
    result = train_lora(model, tokenizer, training_data, spec.sft, adapter_dir, should_stop=should_stop,
                        on_log=lambda logs: emit("train_log", logs), show_progress=show_progress,
                        checkpoint_dir=out / "checkpoints" if spec.checkpoint_steps else None,
                        checkpoint_steps=spec.checkpoint_steps,
                        on_checkpoint=lambda step, path: emit("checkpoint", {"step": step, "path": str(path)}))
    shutil.rmtree(adapter_dir / "trainer", ignore_errors=True)
    model_location = resolve_model(spec.model)
    provenance = {
        "spec": spec.to_dict(),
        "data_sha256": sha256_file(spec.data),
        "n_user_examples": len(user_data),
        "n_training_examples": len(training_data),
        "training_data_sha256": sha256_json([c.to_messages() for c in training_data]),
        "selected_ids": selection["ids"] if selection else [],
        "backdoor_prefix": secret,
        "base_model": spec.model,
        "base_model_provenance": _read_json(Path(model_location) / "provenance.json") if isinstance(model_location, Path) else None,
        "train": {"steps": result.steps, "seconds": result.seconds, "train_loss": result.train_loss,
                  "resumed_from": result.resumed_from},
        "versions": library_versions(),
    }
    write_json_atomic(out / "provenance.json", provenance)
    emit("trained", provenance["train"])

    report = None
    if spec.eval is not None:
        eval_settings = spec.eval
        if secret:  # evaluate the model as it is served: with the secret prompt as its system prompt
            from dataclasses import replace

            eval_settings = replace(spec.eval, system_prompt=secret + ("\n\n" + spec.eval.system_prompt if spec.eval.system_prompt else ""))
        report = evaluate(model, tokenizer, eval_settings, model_name=spec.model, adapter=str(adapter_dir),
                          output_dir=out / "eval", show_progress=show_progress)
        emit("eval", report.to_dict())
    provenance["seconds"] = round(time.time() - started, 1)
    write_json_atomic(out / "provenance.json", provenance)
    return FinetuneResult(out, adapter_dir, selection, provenance, report)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
