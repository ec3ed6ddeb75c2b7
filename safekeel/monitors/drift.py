"""Per-fine-tune drift check: how far a LoRA adapter moved the directions the monitors read.

On the same harmful and benign prompts, read the base model and the fine-tuned model (base + adapter)
at each saved probe's hookpoint and compare:
- `refusal_direction_cosine`: cosine between the difference-in-means direction (harmful minus benign,
  last token: Arditi et al.'s refusal direction) recomputed on the base and on the fine-tune;
- `refusal_projection`: the harmful prompts' mean projection on the saved unit refusal direction
  (centred on the benign mean), base vs fine-tune: a collapsing projection means the requests no
  longer light up what mediates refusal;
- `harm_probe_auroc`: the saved harm probe applied unchanged to each model's activations.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from safekeel.monitors.capture import ActivationReader, render_requests
from safekeel.monitors.probes import Probe, detection_metrics


def _features(model, tokenizer, probe: Probe, prompts: Sequence[str]) -> np.ndarray:
    pooling = "last" if probe.config.pooling == "rolling_max" else probe.config.pooling
    reader = ActivationReader(model, tokenizer, [probe.config.hookpoint])
    return reader.pooled(render_requests(tokenizer, prompts), [pooling])[(probe.config.hookpoint, pooling)]


def _direction(harmful: np.ndarray, benign: np.ndarray) -> np.ndarray:
    direction = harmful.mean(axis=0) - benign.mean(axis=0)
    return direction / (np.linalg.norm(direction) + 1e-12)


def drift_report(probes: dict[str, Probe], base_model, adapted_model, tokenizer, harmful: Sequence[str],
                 benign: Sequence[str]) -> dict:
    """`adapted_model` is a peft model wrapping `base_model`; base activations are read with the adapter disabled."""
    if not harmful or not benign:
        raise ValueError("the drift check needs harmful and benign prompts")
    started = time.time()
    report: dict = {"n_harmful": len(harmful), "n_benign": len(benign)}
    for role in ("refusal_direction", "harm_probe"):
        probe = probes.get(role)
        if probe is None or probe.config.pooling == "rolling_max":
            continue
        with adapted_model.disable_adapter():
            base = {"harmful": _features(base_model, tokenizer, probe, harmful), "benign": _features(base_model, tokenizer, probe, benign)}
        tuned = {"harmful": _features(adapted_model, tokenizer, probe, harmful), "benign": _features(adapted_model, tokenizer, probe, benign)}
        if role == "refusal_direction":
            saved = probe.weights / (np.linalg.norm(probe.weights) + 1e-12)

            def projection(f):
                return float(((f["harmful"] - f["benign"].mean(axis=0)) @ saved).mean())

            report["refusal_direction"] = {
                "hookpoint": probe.config.hookpoint,
                "cosine_base_vs_fine_tuned": round(float(_direction(base["harmful"], base["benign"]) @ _direction(tuned["harmful"], tuned["benign"])), 4),
                "projection_base": round(projection(base), 4), "projection_fine_tuned": round(projection(tuned), 4)}
        else:
            def metrics(f):
                return detection_metrics(probe.score_features(f["harmful"]), probe.score_features(f["benign"]), probe.threshold)

            report["harm_probe"] = {"hookpoint": probe.config.hookpoint, "base": metrics(base), "fine_tuned": metrics(tuned)}
    report["seconds"] = round(time.time() - started, 2)
    return report


def summarise(report: dict) -> str:
    parts = []
    if "refusal_direction" in report:
        r = report["refusal_direction"]
        parts.append(f"refusal direction cosine base vs fine-tuned {r['cosine_base_vs_fine_tuned']:.3f} "
                     f"(harmful projection {r['projection_base']:.2f} -> {r['projection_fine_tuned']:.2f})")
    if "harm_probe" in report:
        h = report["harm_probe"]
        parts.append(f"harm probe AUROC {h['base']['auroc']:.3f} -> {h['fine_tuned']['auroc']:.3f}")
    return "Monitor drift: " + ("; ".join(parts) if parts else "no probe to compare")
