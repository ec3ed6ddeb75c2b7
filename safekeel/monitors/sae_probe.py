"""Harm probes on sparse-autoencoder latents: the SAE's sparse code of each prompt token, pooled over
the prompt, fed to a logistic regression (optionally on only the m latents whose class means differ
most: a probe you can read feature by feature). Saved self-contained: the SAE is copied inside.

Layout of a saved SAE probe folder: `sae_probe.json` (config, threshold, model fingerprint, chosen
latents, metrics), `sae_probe.safetensors` (weights, normalisation), `sae/` (the SAE's cfg.json +
sae.safetensors).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from safekeel.models.capture import Hookpoint
from safekeel.monitors.capture import SKIPPED_POSITIONS
from safekeel.monitors.probes import read_monitor_meta
from safekeel.provenance import library_versions, write_json_atomic

SAE_POOLINGS = ("max", "mean", "last")


@dataclass
class SaeProbeConfig:
    hookpoint: str
    """The SAE's hookpoint (`layers.N`, the stream entering block N)."""
    pooling: str = "max"
    """How token latents become one prompt vector: max or mean over the prompt's tokens (position 0
    left out), or the last token's."""
    n_features: int | None = None
    """Use only the n latents with the largest standardised difference of class means (None: all)."""
    C: float = 1.0
    target_fpr: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        Hookpoint.parse(self.hookpoint)
        if self.pooling not in SAE_POOLINGS:
            raise ValueError(f"unknown SAE probe pooling {self.pooling!r}; known: {SAE_POOLINGS}")

    @property
    def name(self) -> str:
        features = f"top{self.n_features}" if self.n_features else "all"
        return f"sae-{self.hookpoint}-{self.pooling}-{features}"


@dataclass
class SaeProbe:
    config: SaeProbeConfig
    sae: object
    """The TopKSAE whose latents are the features."""
    features: np.ndarray
    """Indices of the latents used."""
    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    threshold: float | None = None
    metadata: dict = field(default_factory=dict)

    def latents(self, hidden: np.ndarray) -> np.ndarray:
        """One prompt's pooled latent vector (all latents) from its unpadded (tokens, d) activations."""
        import torch

        with torch.inference_mode():
            acts, indices = self.sae.encode(torch.as_tensor(np.asarray(hidden), dtype=torch.float32))
            dense = torch.zeros(acts.shape[0], self.sae.num_latents).scatter_(1, indices, acts)
        dense = dense.numpy()
        if self.config.pooling == "last":
            return dense[-1]
        body = dense[SKIPPED_POSITIONS:] if len(dense) > SKIPPED_POSITIONS else dense
        return body.max(axis=0) if self.config.pooling == "max" else body.mean(axis=0)

    def score_latents(self, latents: np.ndarray) -> np.ndarray:
        chosen = np.asarray(latents, dtype=np.float32)[..., self.features]
        return ((chosen - self.mean) / self.scale) @ self.weights + self.bias

    def score_sequence(self, hidden: np.ndarray) -> float:
        return float(self.score_latents(self.latents(hidden)[None])[0])

    def top_latents(self, n: int = 10) -> list[dict]:
        """The latents with the largest weights towards 'harmful' (to inspect what the probe reads)."""
        order = np.argsort(-self.weights)[:n]
        return [{"latent": int(self.features[i]), "weight": round(float(self.weights[i]), 4)} for i in order]

    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.sae.save(folder / "sae")
        save_file({"features": self.features.astype(np.int64), "weights": self.weights.astype(np.float32),
                   "mean": self.mean.astype(np.float32), "scale": self.scale.astype(np.float32)},
                  str(folder / "sae_probe.safetensors"))
        write_json_atomic(folder / "sae_probe.json", {
            "kind": "sae_probe", "config": asdict(self.config), "bias": float(self.bias), "threshold": self.threshold,
            "hookpoint_meaning": Hookpoint.parse(self.config.hookpoint).meaning, "n_latents": int(self.sae.num_latents),
            "top_latents": self.top_latents(), **self.metadata})
        return folder

    @classmethod
    def load(cls, folder: str | Path, expected_model: str | None = None) -> "SaeProbe":
        from safetensors.numpy import load_file

        from safekeel.monitors.sae import TopKSAE

        folder = Path(folder)
        meta = read_monitor_meta(folder, "sae_probe.json", "sae_probe", expected_model)
        sae = TopKSAE.load(folder / "sae", expected_model_hash=expected_model).eval()
        tensors = load_file(str(folder / "sae_probe.safetensors"))
        metadata = {k: v for k, v in meta.items() if k not in ("kind", "config", "bias", "threshold", "hookpoint_meaning",
                                                               "n_latents", "top_latents")}
        return cls(SaeProbeConfig(**meta["config"]), sae, tensors["features"], tensors["weights"], meta["bias"],
                   tensors["mean"], tensors["scale"], meta["threshold"], metadata)


def fit_sae_probe(config: SaeProbeConfig, sae, harmful: Sequence[np.ndarray], benign: Sequence[np.ndarray]) -> SaeProbe:
    """Fit on per-prompt unpadded activations at the SAE's hookpoint (harmful = 1, benign = 0)."""
    from sklearn.linear_model import LogisticRegression

    if sae.cfg.hookpoint != config.hookpoint:
        raise ValueError(f"the SAE reads {sae.cfg.hookpoint}, the probe config says {config.hookpoint}")
    started = time.time()
    probe = SaeProbe(config, sae.eval(), np.arange(sae.num_latents), np.zeros(sae.num_latents, np.float32), 0.0,
                     np.zeros(sae.num_latents, np.float32), np.ones(sae.num_latents, np.float32))
    positives = np.stack([probe.latents(h) for h in harmful])
    negatives = np.stack([probe.latents(h) for h in benign])
    features = np.concatenate([positives, negatives])
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    spread = features.std(axis=0) + 1e-6
    if config.n_features:
        separation = np.abs(positives.mean(axis=0) - negatives.mean(axis=0)) / spread
        chosen = np.sort(np.argsort(-separation)[: config.n_features])
    else:
        chosen = np.arange(features.shape[1])
    x = features[:, chosen]
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    model = LogisticRegression(C=config.C, max_iter=3000, class_weight="balanced", random_state=config.seed)
    model.fit((x - mean) / scale, labels)
    active = int((features > 0).any(axis=0).sum())
    return SaeProbe(config, sae, chosen, model.coef_[0].astype(np.float32), float(model.intercept_[0]),
                    mean.astype(np.float32), scale.astype(np.float32), None,
                    {"n_train_harmful": len(harmful), "n_train_benign": len(benign), "latents_active_on_train": active,
                     "fit_seconds": round(time.time() - started, 3), "versions": library_versions()})

