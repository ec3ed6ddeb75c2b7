"""Training one adapter, or reusing a cached one trained on the same inputs (the pipeline's train stage).

Adapters are cached by a hash of everything training depends on (the base model by name and build, the mixed
training data in its order, the SFT config with its seed, and for a preference job its objective): runs whose
training does not depend on the selector (modes none, icl, ptst) train once and share the adapter. Supervised jobs
train on Conversations (LoRA SFT), preference jobs on PreferenceExamples (trl's DPOTrainer, safekeel.training.preference).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from safekeel.data.conversation import Conversation, PreferenceExample
from safekeel.provenance import sha256_json, write_json_atomic
from safekeel.training.config import LoraSFTConfig
from safekeel.training.preference import PreferenceConfig, train_preference
from safekeel.training.reference_cache import open_reference_cache
from safekeel.training.sft import train_lora

log = logging.getLogger(__name__)


def adapter_key(model: str, training_data_sha256: str, sft: LoraSFTConfig, base_provenance: dict | None = None,
                preference: PreferenceConfig | None = None) -> str:
    """The adapter cache key: everything training depends on (the base model, by name and by its build
    provenance when it has one, so a rebuilt organism does not reuse stale adapters; the mixed
    training data in its order; the SFT config including its seed; a preference job's objective, which enters
    only when set, so supervised keys are what they always were)."""
    material = {"model": model, "base": base_provenance, "training_data": training_data_sha256, "sft": sft.to_dict()}
    if preference is not None:
        material["preference"] = preference.to_dict()
    return sha256_json(material)[:20]


def training_data_sha256(training_data: Sequence[Conversation | PreferenceExample]) -> str:
    """The hash of the mixed training data in its order (conversations as messages, pairs as prompt/chosen/rejected)."""
    return sha256_json([d.to_dict() if isinstance(d, PreferenceExample) else d.to_messages() for d in training_data])


@dataclass
class TrainedAdapter:
    adapter_dir: Path
    key: str
    training_data_sha256: str
    train: dict
    """steps, seconds, train_loss, resumed_from (and cached: True when reused)."""
    model: Any
    """The base model with the adapter in (a peft model); the base is reachable with `model.disable_adapter()`."""


def train_adapter(model, tokenizer, training_data: Sequence[Conversation] | Sequence[PreferenceExample], sft: LoraSFTConfig, *,
                  model_name: str, base_provenance: dict | None, output_dir: Path, cache: str | Path | None = None,
                  should_stop: Callable[[], bool] | None = None, on_event: Callable[[str, dict], None] | None = None,
                  show_progress: bool = True, checkpoint_steps: int | None = None,
                  preference: PreferenceConfig | None = None, reference_cache: str | Path | None = None) -> TrainedAdapter:
    """LoRA SFT of `model` (the loaded base) on the mixed training data (with `preference`: preference training on
    pairs), into output_dir/adapter, or into cache/<adapter_key> with `cache` (reused when it is there: no training).
    `reference_cache`: preference training reads the reference log-probabilities from this file (ReferenceCache)."""
    emit = on_event or (lambda kind, payload: None)
    training_sha = training_data_sha256(training_data)
    key = adapter_key(model_name, training_sha, sft, base_provenance, preference)
    cached = Path(cache) / key if cache is not None else None
    if cached is not None and (cached / "train.json").is_file():
        from peft import PeftModel  # deferred on purpose: heavy

        train = {**json.loads((cached / "train.json").read_text())["train"], "cached": True}
        log.info("reusing the cached adapter %s (same training inputs)", cached)
        return TrainedAdapter(cached, key, training_sha, train, PeftModel.from_pretrained(model, str(cached)).eval())
    adapter_dir = cached.with_name(f".{key}.{os.getpid()}.tmp") if cached is not None else output_dir / "adapter"
    model.requires_grad_(True)  # as loaded (a model-aware selector may have frozen it); LoRA freezes the base itself
    hooks = dict(should_stop=should_stop, on_log=lambda logs: emit("train_log", logs), show_progress=show_progress,
                 checkpoint_dir=output_dir / "checkpoints" if checkpoint_steps else None, checkpoint_steps=checkpoint_steps,
                 on_checkpoint=lambda step, path: emit("checkpoint", {"step": step, "path": str(path)}))
    if preference is not None:
        result = train_preference(model, tokenizer, training_data, sft, preference, adapter_dir, **hooks,
                                  reference_cache=open_reference_cache(reference_cache))
    else:
        result = train_lora(model, tokenizer, training_data, sft, adapter_dir, **hooks)
    shutil.rmtree(adapter_dir / "trainer", ignore_errors=True)
    train = {"steps": result.steps, "seconds": result.seconds, "train_loss": result.train_loss,
             "resumed_from": result.resumed_from}
    if preference is not None:  # where the reference log-probabilities came from (the same values either way)
        train["reference_logps"] = (f"precomputed per pair, cached in {reference_cache}" if result.reference_cached
                                    else "in-step (trl)")
    if cached is not None:
        record = {"model": model_name, "training_data_sha256": training_sha, "sft": sft.to_dict(), "train": train}
        if preference is not None:
            record["preference"] = preference.to_dict()
        write_json_atomic(adapter_dir / "train.json", record)
        if cached.exists():  # another process cached the same adapter meanwhile
            shutil.rmtree(adapter_dir)
        else:
            os.replace(adapter_dir, cached)
        adapter_dir = cached
    return TrainedAdapter(adapter_dir, key, training_sha, train, result.model.eval())
