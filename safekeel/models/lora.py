"""LoRA adapters of a base model: the hyperparameters of a LoRA fine-tune (LoraSFTConfig, with its defaults)
and peft's LoraConfig built from them. Here, below training and the selectors, because both train LoRA
adapters: safekeel.training (the fine-tune) and the `forgetting` selector (a few steps on the user data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LoraSFTConfig:
    """LoRA SFT hyperparameters. Defaults: the attack preset measured in benchmarks/phenomenon.md."""

    learning_rate: float = 2e-4
    """Peak learning rate (linear decay after warmup)."""
    epochs: float = 3.0
    """Passes over the mixed training data."""
    batch_size: int = 4
    """Examples per optimiser step (per device; no gradient accumulation)."""
    max_length: int = 256
    """Tokens per training sequence; longer ones are truncated from the right."""
    max_steps: int = -1
    """If > 0, stop after this many steps (overrides epochs): for smoke tests."""
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lora_r: int = 16
    """LoRA rank; keep within vLLM's max_lora_rank (1, 8, 16, 32, 64, ...)."""
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    """Modules to adapt; 'all-linear' = every Linear but the (tied) output head: vLLM-servable."""
    seed: int = 0
    """Seeds weight init of the adapter and the data order."""
    logging_steps: int = 5
    bf16: bool = False
    """bfloat16 autocast for training (faster on CPUs with AVX512-BF16/AMX; weights stay float32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (trl's default; only worth it when memory is short)."""

    def __post_init__(self) -> None:
        # one spelling per value: 2 epochs from the API and 2.0 from the CLI are the same training, so the same
        # adapter key (training.finetune.adapter_key hashes to_dict())
        self.epochs = float(self.epochs)
        self.learning_rate = float(self.learning_rate)
        self.warmup_ratio = float(self.warmup_ratio)
        self.weight_decay = float(self.weight_decay)
        self.lora_dropout = float(self.lora_dropout)

    def to_dict(self) -> dict:
        return asdict(self)


def lora_config(config: LoraSFTConfig):
    """peft's LoraConfig for these hyperparameters."""
    from peft import LoraConfig  # deferred on purpose: heavy, only needed to train

    # No modules_to_save and no DoRA: vLLM must be able to serve the adapter.
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
