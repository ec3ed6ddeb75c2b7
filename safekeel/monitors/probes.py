"""Linear probes on hidden states: logistic regression and difference-in-means directions, a
threshold calibrated at a target false-positive rate, and versioned save/load.

A probe maps one pooled activation vector x (see capture.py) to a score s = w . (x - mu) / sigma + b
(mu, sigma: per-feature normalisation fitted on the training set; for `diff_means` sigma = 1 and w is
the unit difference of class means, Arditi et al. 2024's refusal direction when pooled at the last
token). The `rolling_max` pooling trains on tokens (each token labelled with its prompt's label: noisy
labels) and scores a prompt as the max over windows of the mean token score. A score above the
threshold flags the prompt; the threshold is the benign calibration scores' (1 - target_fpr) quantile.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from safekeel.models.capture import Hookpoint
from safekeel.monitors.capture import POOLINGS, SKIPPED_POSITIONS, pool_one, rolling_max
from safekeel.provenance import library_versions, write_json_atomic

METHODS = ("logistic", "diff_means")
PROBE_POOLINGS = POOLINGS + ("rolling_max",)
FORMAT_VERSION = 1


class ProbeMismatchError(ValueError):
    """A saved monitor was trained on a different model than the one it is being loaded against."""


@dataclass
class ProbeConfig:
    hookpoint: str = "layers.15"
    """`layers.N`: the residual stream entering block N (hidden_states[N])."""
    pooling: str = "last"
    """last | mean | max (pooled activations) or rolling_max (token scores, max over windows)."""
    method: str = "logistic"
    """logistic (L2-regularised logistic regression) or diff_means (difference of class means)."""
    C: float = 1.0
    """Inverse L2 strength for logistic regression (on standardised features)."""
    window: int = 4
    """Window (tokens) of the rolling_max pooling."""
    max_tokens_per_prompt: int = 48
    """rolling_max training: at most this many tokens per prompt (seeded sample), so long prompts do not dominate."""
    target_fpr: float = 0.01
    """The calibrated threshold flags this fraction of benign calibration traffic."""
    seed: int = 0

    def __post_init__(self) -> None:
        Hookpoint.parse(self.hookpoint)
        if self.pooling not in PROBE_POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; known: {PROBE_POOLINGS}")
        if self.method not in METHODS:
            raise ValueError(f"unknown probe method {self.method!r}; known: {METHODS}")
        if not 0 < self.target_fpr < 1:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr}")

    @property
    def name(self) -> str:
        return f"{self.method}-{self.hookpoint}-{self.pooling}"


@dataclass
class Probe:
    config: ProbeConfig
    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    threshold: float | None = None
    metadata: dict = field(default_factory=dict)

    # ---- scoring ----
    def score_features(self, features: np.ndarray) -> np.ndarray:
        """Scores for pooled features (n, d); for rolling_max probes these are token scores."""
        features = np.asarray(features, dtype=np.float32)
        return ((features - self.mean) / self.scale) @ self.weights + self.bias

    def score_prompts(self, pooled: np.ndarray | None = None, tokens: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """One score per prompt: from pooled features, or (rolling_max) from each prompt's token activations."""
        if self.config.pooling == "rolling_max":
            if tokens is None:
                raise ValueError("a rolling_max probe scores token activations: pass tokens=")
            return np.array([rolling_max(self.score_features(t), self.config.window) for t in tokens])
        if pooled is None:
            raise ValueError(f"a {self.config.pooling}-pooled probe scores pooled features: pass pooled=")
        return self.score_features(pooled)

    def score_sequence(self, hidden: np.ndarray) -> float:
        """One prompt's score from its full, unpadded (tokens, d) activations at the probe's hookpoint."""
        if self.config.pooling == "rolling_max":
            body = hidden[SKIPPED_POSITIONS:] if len(hidden) > SKIPPED_POSITIONS else hidden
            return rolling_max(self.score_features(body), self.config.window)
        return float(self.score_features(pool_one(hidden, self.config.pooling)[None])[0])

    def flags(self, scores: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise ValueError("this probe has no calibrated threshold (calibrate it on benign traffic first)")
        return np.asarray(scores) > self.threshold

    # ---- persistence ----
    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weights": self.weights.astype(np.float32), "mean": self.mean.astype(np.float32),
                   "scale": self.scale.astype(np.float32)}, str(folder / "probe.safetensors"))
        write_json_atomic(folder / "probe.json", {
            "format_version": FORMAT_VERSION, "kind": "linear_probe", "config": asdict(self.config),
            "hookpoint_meaning": Hookpoint.parse(self.config.hookpoint).meaning, "bias": float(self.bias),
            "threshold": self.threshold, "normalisation": "standardise (train mean/std)" if self.config.method == "logistic" else "centre (train mean)",
            "d_in": int(self.weights.shape[0]), **self.metadata})
        return folder

    @classmethod
    def load(cls, folder: str | Path, expected_model: str | None = None) -> "Probe":
        """Load a saved probe; with `expected_model` (a model fingerprint) refuse one trained on another model."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        meta = read_monitor_meta(folder, "probe.json", "linear_probe", expected_model)
        tensors = load_file(str(folder / "probe.safetensors"))
        config = ProbeConfig(**meta["config"])
        metadata = {k: v for k, v in meta.items() if k not in ("format_version", "kind", "config", "bias", "threshold",
                                                               "normalisation", "d_in", "hookpoint_meaning")}
        return cls(config, tensors["weights"], meta["bias"], tensors["mean"], tensors["scale"], meta["threshold"], metadata)


def read_monitor_meta(folder: Path, filename: str, kind: str, expected_model: str | None) -> dict:
    """A saved monitor's metadata, checked: the file exists, holds the expected kind, and (with
    `expected_model`, a model fingerprint) was trained on that model."""
    meta_path = folder / filename
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} holds no {filename}")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{meta_path} is not a {kind} (kind={meta.get('kind')!r})")
    if expected_model is not None and meta.get("model_fingerprint") != expected_model:
        raise ProbeMismatchError(f"{kind} {folder} was trained on model {meta.get('model_fingerprint')} "
                                 f"({meta.get('model')}), not on {expected_model}: retrain it for this model")
    return meta


def fit_probe(config: ProbeConfig, harmful: np.ndarray | Sequence[np.ndarray], benign: np.ndarray | Sequence[np.ndarray]) -> Probe:
    """Fit on harmful (label 1) vs benign (label 0) features: (n, d) arrays of pooled features, or for
    rolling_max lists of per-prompt (tokens, d) arrays."""
    started = time.time()
    if config.pooling == "rolling_max":
        rng = np.random.default_rng(config.seed)

        def tokens_of(prompts):
            rows = []
            for t in prompts:
                take = rng.choice(len(t), size=min(len(t), config.max_tokens_per_prompt), replace=False)
                rows.append(np.asarray(t)[np.sort(take)])
            return np.concatenate(rows)

        positives, negatives = tokens_of(harmful), tokens_of(benign)
    else:
        positives, negatives = np.asarray(harmful, dtype=np.float32), np.asarray(benign, dtype=np.float32)
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("a probe needs both harmful and benign examples")
    features = np.concatenate([positives, negatives]).astype(np.float32)
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    mean = features.mean(axis=0)
    if config.method == "logistic":
        from sklearn.linear_model import LogisticRegression

        scale = features.std(axis=0) + 1e-6
        model = LogisticRegression(C=config.C, max_iter=2000, class_weight="balanced", random_state=config.seed)
        model.fit((features - mean) / scale, labels)
        weights, bias = model.coef_[0].astype(np.float32), float(model.intercept_[0])
    else:
        scale = np.ones_like(mean)
        direction = positives.mean(axis=0) - negatives.mean(axis=0)
        weights = (direction / (np.linalg.norm(direction) + 1e-12)).astype(np.float32)
        # centre so that 0 lies midway between the classes' mean projections
        bias = -float(((positives.mean(axis=0) + negatives.mean(axis=0)) / 2 - mean) @ weights)
    return Probe(config, weights, bias, mean.astype(np.float32), scale.astype(np.float32), None,
                 {"n_train_harmful": len(harmful), "n_train_benign": len(benign), "fit_seconds": round(time.time() - started, 3),
                  "versions": library_versions()})


def calibrate_threshold(benign_scores: np.ndarray, target_fpr: float) -> float:
    """The smallest threshold t (among the observed scores) with the fraction of benign scores > t at most
    target_fpr. With n benign scores the achievable rates are multiples of 1/n: ask for n >= 1/target_fpr."""
    scores = np.sort(np.asarray(benign_scores, dtype=np.float64))
    if len(scores) == 0:
        raise ValueError("calibration needs benign scores")
    allowed = int(np.floor(target_fpr * len(scores)))  # how many benign scores may lie above t
    return float(scores[len(scores) - 1 - allowed])


def detection_metrics(harmful_scores: np.ndarray, benign_scores: np.ndarray, threshold: float | None = None,
                      fpr: float = 0.01) -> dict:
    """AUROC; TPR at the given FPR read off this set's own ROC (an oracle threshold); and, when a calibrated
    threshold is given, the TPR and FPR it actually achieves here (the honest deployment numbers)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    harmful_scores, benign_scores = np.asarray(harmful_scores), np.asarray(benign_scores)
    labels = np.concatenate([np.ones(len(harmful_scores)), np.zeros(len(benign_scores))])
    scores = np.concatenate([harmful_scores, benign_scores])
    false_positive, true_positive, _ = roc_curve(labels, scores)
    within = false_positive <= fpr
    out = {"auroc": round(float(roc_auc_score(labels, scores)), 4),
           f"tpr_at_{fpr:g}_fpr_oracle": round(float(true_positive[within].max()), 4),
           "n_harmful": int(len(harmful_scores)), "n_benign": int(len(benign_scores))}
    if threshold is not None:
        out["tpr_at_threshold"] = round(float((harmful_scores > threshold).mean()), 4)
        out["fpr_at_threshold"] = round(float((benign_scores > threshold).mean()), 4)
    return out
