"""Training configuration: LoRA SFT (safekeel.models.lora.LoraSFTConfig, shared with the selectors) and the
aligned organism's recipe."""

from __future__ import annotations

from dataclasses import dataclass, field

from safekeel.models.lora import LoraSFTConfig


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
