"""Token-level probes from text-level labels, multiple-instance style.

A toxic comment has at least one toxic span; a clean comment has none. Instead of giving every token
its comment's label (the noisy labels `fit_probe(..., pooling="rolling_max")` uses), the MIL probe
scores each token linearly, pools a text as the max over windows of w consecutive tokens of the mean
token score (`rolling_max`, exactly what the runtime computes), and trains that pooled score against
the text's label (class-balanced logistic loss, L2 on the weights). So a clean text must have no
window that fires, and a toxic one needs only one. The result is an ordinary rolling_max `Probe`.
"""

from __future__ import annotations

import html
import time
from typing import Callable, Sequence

import numpy as np

from safekeel.monitors.probes import Probe, ProbeConfig
from safekeel.provenance import library_versions


def fit_mil_probe(config: ProbeConfig, positive: Sequence[np.ndarray], negative: Sequence[np.ndarray], epochs: int = 25,
                  lr: float = 0.01, l2: float = 1e-3, batch_size: int = 64,
                  should_stop: Callable[[], bool] | None = None) -> Probe:
    """Fit on per-text token activations ((tokens, d) arrays, attention sink left out): positive texts
    (label 1) and negative texts (label 0)."""
    import torch  # deferred on purpose: heavy

    if config.pooling != "rolling_max":
        raise ValueError(f"a MIL probe pools with rolling_max, not {config.pooling!r}")
    bags = [np.asarray(t, dtype=np.float32) for t in list(positive) + list(negative)]
    if not positive or not negative or any(len(b) == 0 for b in bags):
        raise ValueError("a MIL probe needs non-empty token arrays of both labels")
    started = time.time()
    labels = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))]).astype(np.float32)
    sample = np.concatenate(bags[:: max(1, len(bags) // 500)])
    mean, scale = sample.mean(axis=0), sample.std(axis=0) + 1e-6
    bags = [(b - mean) / scale for b in bags]
    generator = torch.Generator().manual_seed(config.seed)
    d = bags[0].shape[1]
    weight = torch.zeros(d, requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    pos_weight = torch.tensor(float((labels == 0).sum() / max(1, labels.sum())))
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(bags), generator=generator).tolist()
        total = 0.0
        for start in range(0, len(order), batch_size):
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt("MIL probe training cancelled")
            chunk = order[start:start + batch_size]
            scores = torch.stack([_rolling_max(torch.from_numpy(bags[i]) @ weight + bias, config.window) for i in chunk])
            target = torch.from_numpy(labels[chunk])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(scores, target, pos_weight=pos_weight) + l2 * (weight ** 2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(chunk)
        losses.append(round(total / len(bags), 4))
    return Probe(config, weight.detach().numpy().astype(np.float32), float(bias.detach()[0]), mean.astype(np.float32),
                 scale.astype(np.float32), None, {"method_detail": "multiple-instance (max over windows, text labels)",
                                                  "n_train_positive": len(positive), "n_train_negative": len(negative),
                                                  "epochs": epochs, "loss_per_epoch": losses,
                                                  "fit_seconds": round(time.time() - started, 2), "versions": library_versions()})


def _rolling_max(token_scores, window: int):
    """Differentiable twin of capture.rolling_max: max over windows of the mean score (all tokens if fewer)."""
    if len(token_scores) <= window:
        return token_scores.mean()
    sums = token_scores.unfold(0, window, 1).mean(dim=1)
    return sums.max()


def render_token_scores(examples: Sequence[dict], threshold: float | None, title: str) -> str:
    """A small self-contained HTML page: each example's tokens shaded by their score (red above 0, blue
    below; the text's pooled score and label beside it). `examples`: {"tokens", "scores", "label", "score", "source"}."""
    rows = []
    for example in examples:
        scores = np.asarray(example["scores"], dtype=float)
        peak = max(1e-6, float(np.abs(scores).max()))
        spans = []
        for token, score in zip(example["tokens"], scores):
            alpha = min(1.0, abs(score) / peak)
            colour = f"rgba(220,40,40,{alpha:.2f})" if score > 0 else f"rgba(40,90,220,{alpha * 0.6:.2f})"
            spans.append(f'<span title="{score:.2f}" style="background:{colour}">{html.escape(token)}</span>')
        flagged = threshold is not None and example["score"] > threshold
        rows.append(f"<tr><td>{example['label']}</td><td>{example['score']:.2f}{' (flagged)' if flagged else ''}</td>"
                    f"<td>{html.escape(example.get('source', ''))}</td><td style='white-space:pre-wrap'>{''.join(spans)}</td></tr>")
    threshold_text = f"{threshold:.3f}" if threshold is not None else "none"
    return ("<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:sans-serif;max-width:1100px}td{vertical-align:top;padding:4px;border-bottom:1px solid #ddd}"
            "span{font-family:monospace}</style><h2>" + html.escape(title) + "</h2>"
            f"<p>Token scores of the MIL probe (red: towards the concept, blue: away; hover for the value). Text score = "
            f"max over windows of the mean token score; threshold {threshold_text}.</p>"
            "<table><tr><th>label</th><th>score</th><th>source</th><th>tokens</th></tr>" + "".join(rows) + "</table>\n")
