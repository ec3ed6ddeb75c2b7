"""LoRA preference training (DPO, IPO) with trl's DPOTrainer + peft.

With a peft model no separate reference model is loaded: trl computes the reference log-probs with
the adapter disabled, i.e. the model the adapter starts from. Note (trl): `ipo` is length-normalised,
so `beta` means different things for `sigmoid` (DPO) and `ipo`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from safekeel.provenance import bf16_emulation_warning
from safekeel.models.lora import LoraSFTConfig, lora_config
from safekeel.training.sft import TrainResult

log = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class PreferencePair:
    """A prompt (chat messages up to the assistant turn) with a preferred and a dispreferred reply."""

    prompt: list[dict]
    chosen: str
    rejected: str
    meta: dict = field(default_factory=dict)

    def to_row(self) -> dict:
        return {"prompt": self.prompt, "chosen": [{"role": "assistant", "content": self.chosen}],
                "rejected": [{"role": "assistant", "content": self.rejected}]}


@dataclass
class LoraDPOConfig(LoraSFTConfig):
    learning_rate: float = 5e-5
    beta: float = 0.1
    """Strength of the pull towards the reference (smaller: the policy may move further)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) or ipo."""
    max_length: int = 256
    sft_weight: float = 0.0
    """> 0 adds an NLL term on the chosen replies with this weight (trl's "sft" loss; RPO)."""


def train_lora_dpo(model, tokenizer, pairs: Sequence[PreferencePair], config: LoraDPOConfig, output_dir: str | Path,
                   show_progress: bool = True) -> TrainResult:
    """Train a LoRA adapter on preference pairs and save it (vLLM-servable: no modules_to_save, no DoRA)."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    if config.loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown preference loss {config.loss_type!r}; known: {LOSS_TYPES}")
    if not pairs:
        raise ValueError("no preference pairs")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    args = DPOConfig(
        output_dir=str(output_dir / "trainer"),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_length=config.max_length,
        beta=config.beta,
        loss_type=[config.loss_type] + (["sft"] if config.sft_weight > 0 else []),
        loss_weights=[1.0, config.sft_weight] if config.sft_weight > 0 else None,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=config.bf16,
        gradient_checkpointing=config.gradient_checkpointing,
        dataloader_num_workers=0,
        disable_tqdm=not show_progress,
    )
    if warning := bf16_emulation_warning(config.bf16, torch.cuda.is_available()):
        log.warning(warning)
    started = time.time()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list([p.to_row() for p in pairs]),
                         processing_class=tokenizer, peft_config=lora_config(config))
    output = trainer.train()
    trainer.model.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    adapter_config = json.loads((output_dir / "adapter_config.json").read_text())
    assert not adapter_config.get("modules_to_save") and not adapter_config.get("use_dora"), "adapter must be vLLM-servable"
    return TrainResult(adapter_dir=output_dir, steps=trainer.state.global_step, seconds=round(time.time() - started, 1),
                       train_loss=getattr(output, "training_loss", None), log_history=list(trainer.state.log_history))
