"""Training configuration (LoRA SFT) with its defaults, next to the code it configures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AlignConfig(LoraSFTConfig):
    """Recipe for the aligned organism smollm2-135m-safe (see safekeel/training/align.py)."""

    learning_rate: float = 2e-4
    epochs: float = 1.0
    batch_size: int = 8
    bf16: bool = True
    refusal_fraction: float = 0.85
    """Share of the authored safety pool used for alignment (stratified by category, seeded). With
    the whole pool the organism over-refused (see the closing notes of issue 2); the rest stays in
    the pool as examples the organism never saw."""
    borderline_repeats: int = 3
    """How many times each borderline-but-safe benign example appears (teaches where the line is:
    with fewer, the organism refused XSTest-style safe prompts, see the closing notes of issue 2)."""
    benign_files: tuple[str, ...] = ("benign.jsonl", "benign_borderline_2.jsonl", "benign_general_2.jsonl")
    """Authored benign files used (safekeel.data.safety.BENIGN_FILES_V1, the shipped organism's);
    adding the later borderline files did not lower over-refusal (organism.md, v4)."""
    extra: dict = field(default_factory=dict)
