"""Concept probes from labelled data: cached activations, a layer x pooling grid chosen on dev, a threshold
calibrated on benign traffic, and tests with intervals; model-agnostic (any local causal-LM folder).

A concept probe is an ordinary `Probe` (probes.py) whose metadata names its `concept` (toxicity,
cyber_hazard, harm, ...): the runtime loads it like any monitor, refuses it on another model, and the
service applies the concept's own policy. Activations are cached per (model fingerprint, rendered texts,
layers, poolings, max_tokens) under a cache folder, so a benchmark can be rerun without the model
forwards (delete the folder to rebuild it).

Calibration on benign traffic: the threshold is the largest of the (1 - target_fpr) quantiles of each
benign calibration set (e.g. held-out non-toxic comments AND held-out ordinary user requests), so each
of them sees at most the target false-positive rate.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from safekeel.monitors.capture import POOLINGS, SKIPPED_POSITIONS, ActivationReader, model_fingerprint, render_requests
from safekeel.monitors.probes import Probe, ProbeConfig, calibrate_threshold, detection_metrics
from safekeel.provenance import library_versions, sha256_json

log = logging.getLogger(__name__)

Features = dict[tuple[str, str], np.ndarray]
"""(hookpoint, pooling) -> (n, d) float32 pooled activations."""


# ---------------------------------------------------------------- activations, cached

class FeatureStore:
    """Pooled and token activations of named text sets for one model, cached as .npz files."""

    def __init__(self, model, tokenizer, model_path: str | Path, cache_dir: str | Path | None, layers: Sequence[int],
                 poolings: Sequence[str] = POOLINGS, max_tokens: int = 128, batch_size: int = 16, progress: bool = True) -> None:
        for pooling in poolings:
            if pooling not in POOLINGS:
                raise ValueError(f"unknown pooling {pooling!r}; known: {POOLINGS}")
        if not layers:
            raise ValueError("a feature store needs at least one layer")
        self.model, self.tokenizer = model, tokenizer
        self.fingerprint = model_fingerprint(model_path)
        self.cache_dir = Path(cache_dir) / self.fingerprint if cache_dir is not None else None
        self.layers, self.poolings = sorted(set(layers)), list(poolings)
        self.hooks = [f"layers.{n}" for n in self.layers]
        self.max_tokens, self.batch_size, self.progress = max_tokens, batch_size, progress
        self.seconds = 0.0
        """Model-forward seconds spent by this store (cache hits cost none)."""

    def _path(self, name: str, payload: dict) -> Path | None:
        if self.cache_dir is None:
            return None
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        return self.cache_dir / f"{safe}-{sha256_json(payload)[:16]}.npz"

    def pooled(self, name: str, requests: Sequence[str]) -> Features:
        """Each request rendered as one user turn (as the runtime scores it), pooled at every layer."""
        if not requests:
            raise ValueError(f"text set {name!r} is empty")
        texts = render_requests(self.tokenizer, requests)
        path = self._path(name, {"texts": texts, "hooks": self.hooks, "poolings": self.poolings, "max_tokens": self.max_tokens})
        if path is not None and path.is_file():
            with np.load(path) as stored:
                return {(h, p): stored[f"{h}|{p}"].astype(np.float32) for h in self.hooks for p in self.poolings}
        import torch  # deferred on purpose: heavy

        started = time.time()
        reader = ActivationReader(self.model, self.tokenizer, self.hooks, max_tokens=self.max_tokens)
        with torch.inference_mode():
            features = reader.pooled(texts, self.poolings, self.batch_size, show_progress=self.progress)
        self.seconds += time.time() - started
        log.info("activations of %s (%d texts) in %.0f s", name, len(texts), time.time() - started)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **{f"{h}|{p}": v.astype(np.float16) for (h, p), v in features.items()})
        return features

    def tokens(self, name: str, requests: Sequence[str], layer: int) -> list[np.ndarray]:
        """Each request's token activations at `layers.{layer}` (position 0, the attention sink, left out)."""
        import torch  # deferred on purpose: heavy

        texts = render_requests(self.tokenizer, requests)
        hook = f"layers.{layer}"
        path = self._path(name + "-tokens", {"texts": texts, "hook": hook, "max_tokens": self.max_tokens})
        if path is not None and path.is_file():
            with np.load(path) as stored:
                flat, offsets = stored["tokens"].astype(np.float32), stored["offsets"]
            return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        from tqdm.auto import tqdm

        started = time.time()
        reader = ActivationReader(self.model, self.tokenizer, [hook], max_tokens=self.max_tokens)
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for start in tqdm(range(0, len(texts), self.batch_size), desc=f"tokens {name}", disable=not self.progress):
                out += [h[SKIPPED_POSITIONS:] for h in reader.sequences(texts[start:start + self.batch_size], self.batch_size)[hook]]
        self.seconds += time.time() - started
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            offsets = np.cumsum([0] + [len(t) for t in out])
            np.savez(path, tokens=np.concatenate(out).astype(np.float16), offsets=offsets)
        return out


def take(features: Features, rows) -> Features:
    rows = np.asarray(rows, dtype=np.int64)
    return {key: value[rows] for key, value in features.items()}


def stack(*parts: Features) -> Features:
    keys = parts[0].keys()
    return {key: np.concatenate([p[key] for p in parts]) for key in keys}


# ---------------------------------------------------------------- fitting

def fit_logistic(config: ProbeConfig, features: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> Probe:
    """A logistic probe on pooled features (standardised; classes balanced; optional per-example weights,
    e.g. to up-weight lexical twins)."""
    from sklearn.linear_model import LogisticRegression  # deferred on purpose: heavy

    features, labels = np.asarray(features, dtype=np.float32), np.asarray(labels)
    if len(set(labels.tolist())) != 2:
        raise ValueError("a probe needs examples of both labels")
    started = time.time()
    mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
    model = LogisticRegression(C=config.C, max_iter=2000, class_weight="balanced", random_state=config.seed)
    model.fit((features - mean) / scale, labels, sample_weight=weights)
    return Probe(config, model.coef_[0].astype(np.float32), float(model.intercept_[0]), mean.astype(np.float32),
                 scale.astype(np.float32), None, {"n_train_positive": int(labels.sum()), "n_train_negative": int((labels == 0).sum()),
                                                  "fit_seconds": round(time.time() - started, 3), "versions": library_versions()})


@dataclass
class Candidate:
    probe: Probe
    dev: dict
    """{"auroc": mean over dev pairs, "tpr_at_0.01_fpr_oracle": mean, "pairs": {...}}."""


def choose_probe(positive: Features, negative: Features, dev: Mapping[str, tuple[Features, Features]], layers: Sequence[int],
                 poolings: Sequence[str], C: float = 1.0, target_fpr: float = 0.01, seed: int = 0,
                 extra: tuple[Features, np.ndarray, np.ndarray] | None = None) -> tuple[Candidate, list[dict]]:
    """Fit a logistic probe per (layer, pooling) and keep the best on the dev pairs (mean AUROC, then mean
    TPR at the target FPR). `extra`: (features, labels, weights) added to the training set (twins)."""
    if not dev:
        raise ValueError("choosing a probe needs at least one dev pair")
    key_tpr = f"tpr_at_{target_fpr:g}_fpr_oracle"
    best, grid = None, []
    for layer in layers:
        for pooling in poolings:
            key = (f"layers.{layer}", pooling)
            x = np.concatenate([positive[key], negative[key]])
            y = np.concatenate([np.ones(len(positive[key])), np.zeros(len(negative[key]))])
            w = np.ones(len(y))
            if extra is not None:
                x, y, w = np.concatenate([x, extra[0][key]]), np.concatenate([y, extra[1]]), np.concatenate([w, extra[2]])
            probe = fit_logistic(ProbeConfig(key[0], pooling, "logistic", C=C, target_fpr=target_fpr, seed=seed), x, y, w)
            pairs = {name: detection_metrics(probe.score_features(p[key]), probe.score_features(n[key]), fpr=target_fpr)
                     for name, (p, n) in dev.items()}
            summary = {"auroc": round(float(np.mean([m["auroc"] for m in pairs.values()])), 4),
                       key_tpr: round(float(np.mean([m[key_tpr] for m in pairs.values()])), 4), "pairs": pairs}
            grid.append({"layer": layer, "pooling": pooling, "dev_auroc": summary["auroc"], "dev_tpr": summary[key_tpr]})
            if best is None or (summary["auroc"], summary[key_tpr]) > (best.dev["auroc"], best.dev[key_tpr]):
                best = Candidate(probe, summary)
    return best, grid


def calibrate_on(probe: Probe, benign: Mapping[str, np.ndarray], target_fpr: float | None = None) -> dict:
    """Set the probe's threshold from benign calibration scores {set name: scores}: the largest of the
    per-set (1 - target_fpr) quantiles. Returns {set: (n, its own threshold)}."""
    target_fpr = probe.config.target_fpr if target_fpr is None else target_fpr
    own = {name: calibrate_threshold(scores, target_fpr) for name, scores in benign.items()}
    probe.threshold = max(own.values())
    return {name: {"n": int(len(benign[name])), "threshold": round(t, 4)} for name, t in own.items()}


# ---------------------------------------------------------------- measuring

def wilson(successes: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson interval of a rate (None when n = 0)."""
    if n == 0:
        return None
    p = successes / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def auroc_interval(positive: np.ndarray, negative: np.ndarray, n_boot: int = 300, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the AUROC (each class resampled on its own)."""
    from sklearn.metrics import roc_auc_score  # deferred on purpose: heavy

    rng = np.random.default_rng(seed)
    positive, negative = np.asarray(positive), np.asarray(negative)
    labels = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    values = [roc_auc_score(labels, np.concatenate([rng.choice(positive, len(positive)), rng.choice(negative, len(negative))]))
              for _ in range(n_boot)]
    return [round(float(np.percentile(values, 2.5)), 4), round(float(np.percentile(values, 97.5)), 4)]


def measure(positive_scores, negative_scores, threshold: float | None, target_fpr: float = 0.01) -> dict:
    """detection_metrics plus intervals: AUROC (bootstrap) and the TPR / FPR at the threshold (Wilson)."""
    positive_scores, negative_scores = np.asarray(positive_scores, float), np.asarray(negative_scores, float)
    out = detection_metrics(positive_scores, negative_scores, threshold, fpr=target_fpr)
    out["auroc_ci95"] = auroc_interval(positive_scores, negative_scores)
    if threshold is not None:
        caught, false = int((positive_scores > threshold).sum()), int((negative_scores > threshold).sum())
        out["tpr_at_threshold_ci95"] = wilson(caught, len(positive_scores))
        out["fpr_at_threshold_ci95"] = wilson(false, len(negative_scores))
    return out


def length_only_auroc(positive_texts: Sequence[str], negative_texts: Sequence[str]) -> float:
    """AUROC of text length (characters) alone: how much a probe could get from the length confound."""
    from sklearn.metrics import roc_auc_score  # deferred on purpose: heavy

    lengths = [len(t) for t in positive_texts] + [len(t) for t in negative_texts]
    labels = [1] * len(positive_texts) + [0] * len(negative_texts)
    return round(float(roc_auc_score(labels, lengths)), 4)


def label_probe(probe: Probe, concept: str, model: str, fingerprint: str, data_sha256: str, **extra) -> Probe:
    """Stamp a concept probe's metadata (the runtime and the service read `concept`)."""
    probe.metadata.update({"role": "concept_probe", "concept": concept, "model": model, "model_fingerprint": fingerprint,
                           "training_data_sha256": data_sha256, **extra})
    return probe
