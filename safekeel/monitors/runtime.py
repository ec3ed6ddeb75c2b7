"""Runtime monitors for the service: score each chat request with the saved monitors of the served
base model, and turn the scores into a per-model policy decision (log, flag, block).

The scored text is the request's last user message rendered alone with the chat template: exactly
the distribution the monitors were trained and calibrated on, whatever guard demonstrations or
history the request carries. Scores come from the BASE model's activations even for fine-tunes:
vLLM does not expose hidden states, so a transformers copy of the base runs only up to the deepest
hookpoint (a fraction of the blocks, on the prompt only); and a fine-tune cannot blind its own
monitor. How far a fine-tune moved the monitored directions is checked once per job (drift.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from safekeel.monitors.capture import ActivationReader, model_fingerprint, render_requests
from safekeel.monitors.probes import Probe

log = logging.getLogger(__name__)

POLICIES = ("off", "log", "flag", "block")


@dataclass
class MonitorResult:
    scores: dict[str, float]
    thresholds: dict[str, float | None]
    flagged_by: list[str] = field(default_factory=list)
    """Deciding monitors whose score exceeded their threshold."""
    seconds: float = 0.0

    @property
    def flagged(self) -> bool:
        return bool(self.flagged_by)

    def to_dict(self, decision: str) -> dict:
        return {"decision": decision, "flagged_by": self.flagged_by, "seconds": round(self.seconds, 4),
                "scores": {k: round(v, 4) for k, v in self.scores.items()},
                "thresholds": {k: (round(v, 4) if v is not None else None) for k, v in self.thresholds.items()}}


def load_monitors(folder: str | Path, expected_model: str | None = None) -> dict:
    """Every monitor saved under `folder` (one sub-folder each), checked against the model fingerprint."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"monitor folder {folder} does not exist")
    monitors: dict = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (sub / "probe.json").is_file():
            monitors[sub.name] = Probe.load(sub, expected_model=expected_model)
        elif (sub / "sae_probe.json").is_file():
            from safekeel.monitors.sae_probe import SaeProbe

            monitors[sub.name] = SaeProbe.load(sub, expected_model=expected_model)
    if not monitors:
        raise FileNotFoundError(f"no monitors (probe.json or sae_probe.json) under {folder}")
    return monitors


class MonitorRuntime:
    """Loaded monitors plus the model copy that feeds them; `score` is thread-safe."""

    def __init__(self, folder: str | Path, model_path: str | Path, deciders: tuple[str, ...] = ("harm_probe",)) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.folder = Path(folder)
        self.fingerprint = model_fingerprint(model_path)
        self.monitors = load_monitors(self.folder, expected_model=self.fingerprint)
        missing = [d for d in deciders if d not in self.monitors]
        if missing:
            raise ValueError(f"deciding monitor(s) {missing} not found in {self.folder} (it has {sorted(self.monitors)})")
        self.deciders = deciders
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
        self.reader = ActivationReader(self.model, self.tokenizer, sorted({m.config.hookpoint for m in self.monitors.values()}))
        self.lock = threading.Lock()

    def describe(self) -> dict:
        return {"folder": str(self.folder), "model_fingerprint": self.fingerprint, "deciders": list(self.deciders),
                "monitors": {name: {"hookpoint": m.config.hookpoint, "pooling": m.config.pooling,
                                    "threshold": m.threshold} for name, m in self.monitors.items()}}

    def score(self, request_text: str) -> MonitorResult:
        started = time.perf_counter()
        text = render_requests(self.tokenizer, [request_text])[0]
        with self.lock:
            captured, _ = self.reader.forward([text])
        scores = {name: float(m.score_sequence(captured[m.config.hookpoint][0].numpy())) for name, m in self.monitors.items()}
        thresholds = {name: m.threshold for name, m in self.monitors.items()}
        flagged = [d for d in self.deciders if thresholds[d] is not None and scores[d] > thresholds[d]]
        return MonitorResult(scores, thresholds, flagged, time.perf_counter() - started)


def decide(policy: str, result: MonitorResult) -> str:
    """pass | logged | flagged | blocked."""
    if policy not in POLICIES:
        raise ValueError(f"unknown monitor policy {policy!r}; known: {POLICIES}")
    if not result.flagged:
        return "pass"
    return {"log": "logged", "flag": "flagged", "block": "blocked"}.get(policy, "pass")
