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
from typing import Mapping

from safekeel.monitors.capture import ActivationReader, model_fingerprint, render_requests
from safekeel.monitors.probes import Probe

log = logging.getLogger(__name__)

POLICIES = ("off", "log", "flag", "block")
DECISIONS = ("pass", "logged", "flagged", "blocked")
"""In increasing severity: a request's decision is the most severe of its deciders' and its concepts'."""


@dataclass
class MonitorResult:
    scores: dict[str, float]
    thresholds: dict[str, float | None]
    flagged_by: list[str] = field(default_factory=list)
    """Deciding monitors whose score exceeded their threshold."""
    seconds: float = 0.0
    concepts: dict[str, dict] = field(default_factory=dict)
    """Concepts with their own policy: {concept: {"policy", "decision", "flagged_by"}} (see MonitorRuntime.decide)."""

    @property
    def flagged(self) -> bool:
        return bool(self.flagged_by)

    def to_dict(self, decision: str) -> dict:
        out = {"concepts": self.concepts} if self.concepts else {}
        return {**out, "decision": decision, "flagged_by": self.flagged_by, "seconds": round(self.seconds, 4),
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


def concept_of(name: str, monitor) -> str:
    """A monitor's concept: its metadata's `concept` (concept probes: toxicity, cyber_hazard, harm, ...), else its name."""
    return (getattr(monitor, "metadata", None) or {}).get("concept") or name


class MonitorRuntime:
    """Loaded monitors plus the model copy that feeds them; `score` is thread-safe.

    `deciders` decide with the request's policy (the server default or the fine-tune's); each concept in
    `concept_policies` ({concept: off|log|flag|block}) decides with its own policy, through its monitors
    (those whose metadata names that concept, or whose folder has that name)."""

    def __init__(self, folder: str | Path, model_path: str | Path, deciders: tuple[str, ...] = ("harm_probe",),
                 concept_policies: Mapping[str, str] | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.folder = Path(folder)
        self.fingerprint = model_fingerprint(model_path)
        self.monitors = load_monitors(self.folder, expected_model=self.fingerprint)
        missing = [d for d in deciders if d not in self.monitors]
        if missing:
            raise ValueError(f"deciding monitor(s) {missing} not found in {self.folder} (it has {sorted(self.monitors)})")
        self.deciders = deciders
        self.members: dict[str, list[str]] = {}
        for name, monitor in self.monitors.items():
            self.members.setdefault(concept_of(name, monitor), []).append(name)
            if concept_of(name, monitor) != name:
                self.members.setdefault(name, []).append(name)
        self.concept_policies = dict(concept_policies or {})
        for concept, policy in self.concept_policies.items():
            if policy not in POLICIES:
                raise ValueError(f"unknown monitor policy {policy!r} for concept {concept!r}; known: {POLICIES}")
            if concept not in self.members:
                raise ValueError(f"no monitor in {self.folder} reads concept {concept!r} (concepts and monitors there: "
                                 f"{sorted(self.members)})")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
        self.reader = ActivationReader(self.model, self.tokenizer, sorted({m.config.hookpoint for m in self.monitors.values()}))
        self.lock = threading.Lock()

    def describe(self) -> dict:
        return {"folder": str(self.folder), "model_fingerprint": self.fingerprint, "deciders": list(self.deciders),
                "concept_policies": self.concept_policies,
                "monitors": {name: {"hookpoint": m.config.hookpoint, "pooling": m.config.pooling, "concept": concept_of(name, m),
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

    def decide(self, policy: str, result: MonitorResult) -> str:
        """The request's decision: the deciders under `policy`, each concept under its own policy (recorded in
        `result.concepts`); the most severe wins."""
        decision = decide(policy, result)
        result.concepts = concept_decisions(self.concept_policies, self.members, result)
        return most_severe([decision] + [c["decision"] for c in result.concepts.values()])


def concept_decisions(concept_policies: Mapping[str, str], members: Mapping[str, list[str]], result: MonitorResult) -> dict[str, dict]:
    """{concept: {"policy", "decision", "flagged_by"}} for every concept whose policy is not off."""
    out = {}
    for concept, policy in concept_policies.items():
        if policy == "off":
            continue
        flagged = [n for n in members[concept] if result.thresholds.get(n) is not None and result.scores[n] > result.thresholds[n]]
        out[concept] = {"policy": policy, "flagged_by": flagged,
                        "decision": decide(policy, MonitorResult(result.scores, result.thresholds, flagged))}
    return out


def most_severe(decisions: list[str]) -> str:
    unknown = [d for d in decisions if d not in DECISIONS]
    if unknown:
        raise ValueError(f"unknown monitor decision(s) {unknown}; known: {DECISIONS}")
    return max(decisions, key=DECISIONS.index)


def decide(policy: str, result: MonitorResult) -> str:
    """pass | logged | flagged | blocked."""
    if policy not in POLICIES:
        raise ValueError(f"unknown monitor policy {policy!r}; known: {POLICIES}")
    if not result.flagged:
        return "pass"
    return {"log": "logged", "flag": "flagged", "block": "blocked"}.get(policy, "pass")
