"""What the fine-tuned content-judge candidates share: a transformer reads a prompt and its reply, its last hidden
state is mean-pooled over the attention mask, and a linear layer gives one logit per question (HEADS: refusal,
harmful_content, hollow, incoherent). Training is a masked, weighted binary cross-entropy over
safekeel.eval.judges.content_build.Row: a row that does not answer a question adds nothing to that head's loss.

Subclasses (safekeel.eval.judges.cross_encoder: MiniLM, every weight trained; safekeel.eval.judges.lm_head: a causal
LM with LoRA) set `tokenizer`, `encoder` (callable on a batch, returning last_hidden_state), and `_batch`.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from safekeel.eval.judges.content import HEADS

MAX_LENGTH = 256
"""Tokens per item (prompt and reply together)."""
PROMPT_TOKENS = 96
"""Tokens of the prompt kept at most, so a long prompt cannot crowd the reply out."""


def cap_prompt(tokenizer, prompt: str, tokens: int = PROMPT_TOKENS) -> str:
    """The prompt cut to its first `tokens` tokens (as text)."""
    return tokenizer.convert_tokens_to_string(tokenizer.tokenize(prompt)[:tokens])


def read_judge_json(folder: str | Path | None) -> dict:
    path = Path(folder) / "judge.json" if folder else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


POS_WEIGHT_CAP = 20.0
"""balanced_pos_weight's largest weight: a head with a handful of positives is not driven by them alone."""


def balanced_pos_weight(rows, cap: float = POS_WEIGHT_CAP) -> dict[str, float]:
    """{head: (weighted negatives) / (weighted positives)} over the rows that answer the head, within [1, cap]; 1 for a
    head no row answers positively."""
    out = {}
    for head in HEADS:
        positive = sum(float(r.weight) for r in rows if r.labels.get(head) == 1)
        negative = sum(float(r.weight) for r in rows if r.labels.get(head) == 0)
        out[head] = 1.0 if positive <= 0 else round(min(cap, max(1.0, negative / positive)), 4)
    return out


class PooledHeadJudge:
    """Mean-pooled transformer state -> a linear layer -> one sigmoid per head in HEADS."""

    NAME = "judge"
    """Shown in progress lines."""
    LEARNING_RATE = 3e-5
    """fit's default peak learning rate."""
    POOLED_DROPOUT = 0.1
    """Dropout on the pooled state while training."""

    tokenizer = None
    encoder = None
    pos_weight = None
    """Per-head weight of a positive label in the loss (fit(balance=True) sets it; None: 1 for every head)."""

    def _init_head(self, folder: str | Path | None, hidden_size: int, seed: int) -> None:
        """The linear layer (seeded init, or head.pt from a saved folder) and the thresholds (judge.json)."""
        import torch  # deferred on purpose: heavy

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = torch.nn.Linear(hidden_size, len(HEADS))
        if folder and (Path(folder) / "head.pt").is_file():
            self.head.load_state_dict(torch.load(Path(folder) / "head.pt"))
        self.thresholds = dict.fromkeys(HEADS, 0.5)
        self.thresholds.update(read_judge_json(folder).get("thresholds", {}))

    def _batch(self, prompts: Sequence[str], replies: Sequence[str]):
        raise NotImplementedError

    def _logits(self, batch):
        import torch  # deferred on purpose: heavy

        output = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(output.dtype)
        pooled = (output * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(torch.nn.functional.dropout(pooled, self.POOLED_DROPOUT, self.encoder.training))

    def loss(self, rows):
        """The masked, weighted BCE of a batch of Rows: labels None are masked out; a batch that answers nothing is 0."""
        import torch  # deferred on purpose: heavy

        batch = self._batch([r.prompt for r in rows], [r.reply for r in rows])
        targets = torch.tensor([[float(r.labels.get(h) or 0) for h in HEADS] for r in rows])
        mask = torch.tensor([[float(r.labels.get(h) is not None) for h in HEADS] for r in rows])
        weights = torch.tensor([float(r.weight) for r in rows]).unsqueeze(1)
        pos_weight = None if self.pos_weight is None else torch.tensor([self.pos_weight[h] for h in HEADS])
        loss_matrix = torch.nn.functional.binary_cross_entropy_with_logits(self._logits(batch), targets, reduction="none",
                                                                           pos_weight=pos_weight)
        return (loss_matrix * mask * weights).sum() / (mask * weights).sum().clamp(min=1e-6)

    def trainable_parameters(self) -> list:
        """The encoder's weights that require a gradient (all of them, or only LoRA's) and the head's."""
        return [p for p in self.encoder.parameters() if p.requires_grad] + list(self.head.parameters())

    def probabilities(self, prompts: Sequence[str], replies: Sequence[str], batch_size: int = 32) -> dict[str, np.ndarray]:
        """{head: one probability per item}."""
        import torch  # deferred on purpose: heavy

        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies: one reply per prompt")
        self.encoder.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                batch = self._batch(prompts[start:start + batch_size], replies[start:start + batch_size])
                out.append(torch.sigmoid(self._logits(batch)).numpy())
        values = np.vstack(out) if out else np.zeros((0, len(HEADS)))
        return {head: values[:, i] for i, head in enumerate(HEADS)}

    def fit(self, rows, epochs: float = 1.0, batch_size: int = 16, learning_rate: float | None = None, seed: int = 0,
            log_every: int = 50, should_stop: Callable[[], bool] | None = None, balance: bool = False) -> dict:
        """Train on Rows (safekeel.eval.judges.content_build.Row), weighted, missing labels masked; AdamW, linear warmup
        over 6% of the steps then linear decay, gradients clipped at 1. `balance`: weight each head's positive labels
        by its weighted negative-to-positive ratio in `rows` (balanced_pos_weight), so a rare label (harmful content)
        is not learnt as "always no". `should_stop()` is asked at the end of every step (as the trainers' stop hook,
        safekeel.training.sft.training_hooks): when it answers True, training stops there and the result says so
        (cancelled, and the steps done). Returns {steps, planned_steps, cancelled, seconds, final_loss (mean of the
        last 20 steps), pos_weight}."""
        import torch  # deferred on purpose: heavy

        if not rows:
            raise ValueError("no training rows")
        if batch_size < 1 or epochs <= 0:
            raise ValueError(f"batch_size must be >= 1 and epochs > 0 (got {batch_size}, {epochs})")
        self.pos_weight = balanced_pos_weight(rows) if balance else None
        learning_rate = self.LEARNING_RATE if learning_rate is None else learning_rate
        torch.manual_seed(seed)
        order = list(range(len(rows)))
        steps = max(1, math.ceil(len(rows) * epochs / batch_size))
        parameters = self.trainable_parameters()
        optimiser = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / (0.06 * steps)) * max(0.0, 1 - step / steps))
        self.encoder.train()
        started, losses, step, cancelled = time.time(), [], 0, False
        rng = random.Random(seed)
        try:
            while step < steps and not cancelled:
                rng.shuffle(order)
                for start in range(0, len(order), batch_size):
                    if step >= steps:
                        break
                    loss = self.loss([rows[i] for i in order[start:start + batch_size]])
                    optimiser.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                    optimiser.step()
                    schedule.step()
                    losses.append(float(loss.detach()))
                    step += 1
                    if log_every and step % log_every == 0:
                        print(f"{self.NAME} step {step}/{steps} loss {np.mean(losses[-log_every:]):.4f} "
                              f"({time.time() - started:.0f} s)", flush=True)
                    if should_stop and should_stop():
                        cancelled = True
                        print(f"{self.NAME} stopped at step {step}/{steps}", flush=True)
                        break
        finally:
            self.encoder.eval()
        return {"steps": step, "planned_steps": steps, "cancelled": cancelled, "seconds": round(time.time() - started, 1),
                "final_loss": float(np.mean(losses[-20:])), "pos_weight": self.pos_weight}

    def _save_head(self, folder: Path, meta: dict, extra: dict | None = None) -> None:
        """The tokenizer, head.pt and judge.json (heads, thresholds, meta, and what a subclass needs to load)."""
        import torch  # deferred on purpose: heavy

        self.tokenizer.save_pretrained(folder)
        torch.save(self.head.state_dict(), folder / "head.pt")
        document = {"heads": list(HEADS), "thresholds": self.thresholds, **(extra or {}), "meta": meta}
        (folder / "judge.json").write_text(json.dumps(document, indent=1))
