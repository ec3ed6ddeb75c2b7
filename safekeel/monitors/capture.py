"""Activation capture for the monitors: pooled features (probes) and token streams (SAEs) read at named
hookpoints through safekeel.models.capture (the one capture of hidden states; `layers.N` is the residual
stream ENTERING decoder block N, transformers' `hidden_states[N]`).

Poolings turn a sequence of token vectors into one vector: `last` (the final prompt token: with the
chat template applied, the assistant-turn opener where the model decides how to answer), `mean` and
`max` over the prompt's tokens. Position 0 (the chat template's first token, an attention sink whose
norm is many times the others') is left out of `mean`, `max` and of token streams. Token-level
signals with noisy labels (only some tokens carry the concept) are pooled after scoring with
`rolling_max`: the maximum over windows of w consecutive tokens of the mean token score, so one
stray token cannot fire the monitor but a few consecutive ones can.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from safekeel.models.capture import Hookpoint, decoder_layers, residual_stream

POOLINGS = ("last", "mean", "max")
SKIPPED_POSITIONS = 1
"""Leading positions excluded from mean/max pooling and token streams (the attention sink)."""


def model_fingerprint(model_path: str | Path) -> str:
    """A short hash of a model folder's config and weight files (names and full contents; cached per
    file size and mtime, since hashing 500 MB takes about a second)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return hashlib.sha256(str(model_path).encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        if path.name != "provenance.json":
            stat = path.stat()
            digest.update(path.name.encode())
            digest.update(_file_sha256(str(path), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    from safekeel.provenance import sha256_file

    return sha256_file(path)


def render_requests(tokenizer, requests: Sequence[str], system_prompt: str | None = None) -> list[str]:
    """Requests as the served model sees them: one user turn, chat template, generation prompt."""
    prefix = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [tokenizer.apply_chat_template(prefix + [{"role": "user", "content": r}], add_generation_prompt=True,
                                          tokenize=False) for r in requests]


class ActivationReader:
    """Reads hookpoints from a transformers causal LM (optionally a peft-wrapped one)."""

    def __init__(self, model, tokenizer, hookpoints: Sequence[str], max_tokens: int = 512) -> None:
        if not hookpoints:
            raise ValueError("at least one hookpoint is needed")
        self.model = model
        self.tokenizer = tokenizer
        self.hookpoints = [Hookpoint.parse(h) for h in hookpoints]
        blocks = len(decoder_layers(model))
        for hook in self.hookpoints:
            if not 0 <= hook.layer < blocks:
                raise ValueError(f"hookpoint {hook.name} is out of range: the model has {blocks} blocks (0..{blocks - 1})")
        self.max_tokens = max_tokens

    def forward(self, texts: Sequence[str]):
        """One padded batch (right padding). Returns ({hookpoint: (batch, tokens, d)}, attention_mask)."""
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        batch = self.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True,
                               max_length=self.max_tokens, add_special_tokens=False)
        streams = residual_stream(self.model, batch["input_ids"], batch["attention_mask"], [h.layer for h in self.hookpoints])
        return {h.name: streams[h.layer] for h in self.hookpoints}, batch["attention_mask"].bool()

    def pooled(self, texts: Sequence[str], poolings: Sequence[str] = POOLINGS, batch_size: int = 16,
               show_progress: bool = False) -> dict[tuple[str, str], np.ndarray]:
        """{(hookpoint, pooling): (n_texts, d) float32} for rendered prompts."""
        from tqdm.auto import tqdm

        for pooling in poolings:
            if pooling not in POOLINGS:
                raise ValueError(f"unknown pooling {pooling!r}; known: {POOLINGS}")
        out: dict[tuple[str, str], list[np.ndarray]] = {(h.name, p): [] for h in self.hookpoints for p in poolings}
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in tqdm(range(0, len(order), batch_size), desc="activations", disable=not show_progress):
            chunk = order[start:start + batch_size]
            captured, mask = self.forward([texts[i] for i in chunk])
            for hook in self.hookpoints:
                hidden = captured[hook.name]
                for pooling in poolings:
                    out[(hook.name, pooling)].append(pool(hidden, mask, pooling))
        inverse = np.argsort(order)
        return {key: np.concatenate(parts)[inverse] for key, parts in out.items()}

    def token_batches(self, texts: Sequence[str], batch_size: int = 16) -> Iterator[dict]:
        """Token activations without padding (and without the first position), one dict per batch:
        {hookpoint: (n_tokens, d) float32 tensor}. The stream SAEs train on."""
        for start in range(0, len(texts), batch_size):
            captured, mask = self.forward(texts[start:start + batch_size])
            keep = mask.clone()
            keep[:, :SKIPPED_POSITIONS] = False
            yield {name: hidden[keep] for name, hidden in captured.items()}

    def sequences(self, texts: Sequence[str], batch_size: int = 16) -> dict[str, list[np.ndarray]]:
        """Each prompt's full, unpadded (tokens, d) activations (position 0 included), batched forwards."""
        out: dict[str, list[np.ndarray]] = {h.name: [] for h in self.hookpoints}
        for start in range(0, len(texts), batch_size):
            captured, mask = self.forward(texts[start:start + batch_size])
            for row, length in enumerate(mask.sum(dim=1).tolist()):
                for name, hidden in captured.items():
                    out[name].append(hidden[row, :length].numpy())
        return out


def pool(hidden, mask, pooling: str) -> np.ndarray:
    """Pool (batch, tokens, d) activations with a right-padded attention mask."""
    import torch

    lengths = mask.sum(dim=1)
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0]), lengths - 1].numpy()
    keep = mask.clone()
    if int(lengths.min()) > SKIPPED_POSITIONS:
        keep[:, :SKIPPED_POSITIONS] = False
    if pooling == "mean":
        weights = keep.unsqueeze(-1).float()
        return ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1)).numpy()
    if pooling == "max":
        return hidden.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(1).numpy()
    raise ValueError(f"unknown pooling {pooling!r}; known: {POOLINGS}")


def pool_one(hidden: np.ndarray, pooling: str) -> np.ndarray:
    """Pool one prompt's unpadded (tokens, d) activations, as `pool` does a batch."""
    if pooling == "last":
        return hidden[-1]
    body = hidden[SKIPPED_POSITIONS:] if len(hidden) > SKIPPED_POSITIONS else hidden
    if pooling == "mean":
        return body.mean(axis=0)
    if pooling == "max":
        return body.max(axis=0)
    raise ValueError(f"unknown pooling {pooling!r}; known: {POOLINGS}")


def rolling_max(token_scores: np.ndarray, window: int) -> float:
    """max over windows of `window` consecutive tokens of their mean score (all tokens if fewer)."""
    scores = np.asarray(token_scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError("rolling_max needs a non-empty 1-d array of token scores")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if len(scores) <= window:
        return float(scores.mean())
    sums = np.convolve(scores, np.ones(window), mode="valid")
    return float(sums.max() / window)

