"""LoRA supervised fine-tuning with trl's SFTTrainer + peft; completion-only loss on the last turn."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from safekeel.data.conversation import Conversation
from safekeel.provenance import bf16_emulation_warning
from safekeel.models.lora import LoraSFTConfig, lora_config

log = logging.getLogger(__name__)


class TrainingCancelled(RuntimeError):
    """Raised when the should_stop hook asked training to stop."""


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    seconds: float
    train_loss: float | None
    log_history: list[dict]
    resumed_from: str | None = None
    model: Any = field(default=None, repr=False)
    """The trained model (a peft model wrapping the base model it was given, for LoRA)."""
    reference_cached: bool = False
    """Preference training: the reference log-probabilities were read from (or computed into) a ReferenceCache."""


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete trainer checkpoint (checkpoint-N with its trainer_state.json), if any."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def training_hooks(should_stop: Callable[[], bool] | None, on_log: Callable[[dict], None] | None,
                   on_checkpoint: Callable[[int, Path], None] | None, saving: bool):
    """The trainer callback every safekeel training uses (SFT and preference): progress logs, checkpoint events, and a
    stop at the end of a step when `should_stop()` (saving a checkpoint there when `saving`, so a stopped run resumes
    from that step); the trainer's state gets `cancelled = True`."""
    from transformers import TrainerCallback  # deferred on purpose: heavy

    class Hooks(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log and logs:
                on_log({"step": state.global_step, "max_steps": state.max_steps, **logs})

        def on_save(self, args, state, control, **kwargs):
            if on_checkpoint:
                on_checkpoint(state.global_step, Path(args.output_dir) / f"checkpoint-{state.global_step}")

        def on_step_end(self, args, state, control, **kwargs):
            if should_stop and should_stop():
                control.should_training_stop = True
                control.should_save = saving  # checkpoint this step: a stopped run resumes from here, not an older save
                state.cancelled = True

    return Hooks()


def train_lora(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    config: LoraSFTConfig,
    output_dir: str | Path,
    should_stop: Callable[[], bool] | None = None,
    on_log: Callable[[dict], None] | None = None,
    show_progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_steps: int | None = None,
    on_checkpoint: Callable[[int, Path], None] | None = None,
    full: bool = False,
) -> TrainResult:
    """Train a LoRA adapter on `conversations` (loss on each final assistant turn) and save it; with
    `full`, train every weight instead (the config's LoRA fields unused) and save the whole model.

    With `checkpoint_dir` and `checkpoint_steps`, the trainer state (adapter, optimizer, scheduler,
    RNG) is saved every `checkpoint_steps` steps (the last two kept), and a run that finds a
    checkpoint there resumes from the latest one instead of starting over."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not conversations:
        raise ValueError("no training conversations")
    rows = [c.to_prompt_completion() for c in conversations]
    dataset = Dataset.from_list(rows)
    torch.manual_seed(config.seed)

    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else output_dir / "trainer"
    saving = bool(checkpoint_steps) and checkpoint_steps > 0
    resume_from = latest_checkpoint(checkpoint_dir) if saving else None
    args = SFTConfig(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_ratio,  # a float < 1 is a fraction of the total steps
        weight_decay=config.weight_decay,
        max_length=config.max_length,
        completion_only_loss=True,
        packing=False,
        logging_steps=config.logging_steps,
        save_strategy="steps" if saving else "no",
        save_steps=checkpoint_steps if saving else 500,
        save_total_limit=2 if saving else None,
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        # trl turns activation checkpointing on by default; a 135M model's activations fit in RAM many
        # times over, and recomputing them cost about a fifth of each step here (py-spy on 8 GSM8K steps)
        gradient_checkpointing=config.gradient_checkpointing,
        bf16=config.bf16,
        fp16=False,
        dataloader_num_workers=0,
        disable_tqdm=not show_progress,
        dataset_num_proc=None,
    )
    if warning := bf16_emulation_warning(config.bf16, torch.cuda.is_available()):
        log.warning(warning)
    started = time.time()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=None if full else lora_config(config),
        callbacks=[training_hooks(should_stop, on_log, on_checkpoint, saving)],
    )
    if resume_from is not None:
        log.info("resuming training from %s", resume_from)
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if getattr(trainer.state, "cancelled", False):
        raise TrainingCancelled(f"training cancelled at step {trainer.state.global_step}")
    trainer.model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    if not full:
        adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
        assert not adapter_config.get("modules_to_save"), "adapter must not carry modules_to_save (vLLM cannot serve it)"
        assert not adapter_config.get("use_dora"), "adapter must not use DoRA (vLLM cannot serve it)"
    return TrainResult(
        resumed_from=str(resume_from) if resume_from else None,
        adapter_dir=output_dir,
        steps=trainer.state.global_step,
        seconds=round(time.time() - started, 1),
        train_loss=getattr(output, "training_loss", None),
        log_history=list(trainer.state.log_history),
        model=trainer.model,
    )
