"""Acting on the audit before training: shift the data toward safe, and pick k and the mode by predicted risk.

Shift (`shift_plan`, `apply_shift`): the targets are the examples the audit flagged harmful_request,
harmful_answer or persona_override, plus (with `fraction`) the given share of the dataset nearest a harmful
reference request (the audit's per-example cosine to the nearest harmful request). Then
- `drop` removes them;
- `downweight` keeps each with probability `weight` (seeded): down-weighting by subsampling, so a target's
  expected share of the gradient is `weight` times what it was, without changing the trainer's loss;
- `none` leaves the data alone (the plan is still recorded).

Policy (`choose_policy`): `fixed` keeps the job's k and mode. `adaptive` reads the harm predictor's
interval (safekeel.audit.predict) for the no-replay increase of its metric (compliance with harmful requests, or
the harmful rate of the files made before the metric was recorded):
- low risk (upper bound below LOW_RISK): replay with half the k (at least 1): less compute, less over-refusal;
- high risk (point prediction at or above HIGH_RISK): replay with twice the k (at most MAX_K) and the test-time
  guard's safety system prompt: what a risky dataset needs (random replay alone recovered little of the
  loss on pure_bad_10 and identity shift, benchmarks/results/identity.md);
- medium: replay with the job's k (the default k when the job replays nothing);
- no prediction (no predictor shipped, or it reads a score this audit lacks): the job's own k and mode.
The thresholds are fixed in advance (half the gate's default margin; the no-replay increase of the attack
datasets); benchmarks/audit_panel.py measures the policy against the fixed default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from safekeel.audit.flags import GATED_FLAGS
from safekeel.audit.predict import target_name
from safekeel.defaults import DEFAULT_K

SHIFT_ACTIONS = ("none", "drop", "downweight")
POLICIES = ("fixed", "adaptive")
LOW_RISK = 0.05
HIGH_RISK = 0.30
MAX_K = 50


def shift_targets(report: dict, fraction: float | None = None) -> tuple[list[int], dict]:
    """(sorted target indices, how many came from each rule) from an audit report's per-example scores."""
    per_example = report.get("per_example") or {}
    gated = per_example.get("gated")
    if gated is None:
        raise ValueError("the audit report has no per-example flags (per_example.gated): audit with this version")
    targets = {i for i, flagged in enumerate(gated) if flagged}
    nearest: set[int] = set()
    if fraction:
        similarity = np.asarray(per_example["harmful_similarity"], dtype=np.float64)
        count = int(round(fraction * len(similarity)))
        nearest = {int(i) for i in np.argsort(-similarity, kind="stable")[:count]}
    return sorted(targets | nearest), {"flagged": len(targets), "nearest_harmful": len(nearest)}


def shift_plan(report: dict, action: str = "none", fraction: float | None = None, weight: float = 0.5,
               seed: int = 0) -> dict:
    """What the shift does to the dataset: {"action", "n_examples", "targets", "removed", "n_kept", "reason", ...}."""
    if action not in SHIFT_ACTIONS:
        raise ValueError(f"unknown shift action {action!r}; known: {', '.join(SHIFT_ACTIONS)}")
    if fraction is not None and not 0 <= fraction <= 1:
        raise ValueError(f"shift fraction must be in [0, 1], got {fraction}")
    if not 0 <= weight <= 1:
        raise ValueError(f"shift weight must be in [0, 1], got {weight}")
    n = int(report["n_examples"])
    targets, sources = shift_targets(report, fraction)
    if action == "drop":
        removed = targets
    elif action == "downweight":
        keep = np.random.default_rng(seed).random(len(targets)) < weight
        removed = [index for index, kept in zip(targets, keep) if not kept]
    else:
        removed = []
    if len(removed) >= n:
        raise ValueError(f"the shift ({action}) would remove all {n} examples: every one is a target "
                         f"({', '.join(GATED_FLAGS)} or nearest a harmful request); nothing would be left to train on")
    rule = f"flagged {' / '.join(GATED_FLAGS)}" + (f" or the {fraction:.0%} nearest a harmful request" if fraction else "")
    verb = {"drop": "dropped", "downweight": f"kept each with probability {weight}", "none": "left in place"}[action]
    return {"action": action, "n_examples": n, "fraction": fraction, "weight": weight if action == "downweight" else None,
            "seed": seed, "targets": targets, "target_sources": sources, "removed": removed, "n_kept": n - len(removed),
            "reason": f"{len(targets)} targets ({rule}): {verb}; {len(removed)} removed"}


def apply_shift(items: list, plan: dict) -> list:
    """The items (conversations, in the audited order) the plan keeps."""
    if len(items) != plan["n_examples"]:
        raise ValueError(f"the shift plan was made for {plan['n_examples']} examples, not {len(items)}")
    removed = set(plan["removed"])
    return [item for index, item in enumerate(items) if index not in removed]


@dataclass
class PolicyChoice:
    policy: str
    k: int
    mode: str
    guard_system_prompt: bool
    risk: str
    """low | medium | high | unknown (no prediction) | fixed."""
    reason: str
    prediction: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def choose_policy(policy: str, prediction: dict | None, k: int, mode: str) -> PolicyChoice:
    """k, mode and guard for the job (see the module doc)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    if policy == "fixed":
        return PolicyChoice(policy, k, mode, False, "fixed", "the job's own k and mode", prediction)
    if prediction is None:
        return PolicyChoice(policy, k, mode, False, "unknown", "no harm predictor is available: the job's own k and mode")
    point, upper = prediction["predicted_increase"], prediction["ci_high"]
    target = prediction.get("target") or target_name(prediction.get("metric", "harmful"), prediction.get("judge", ""))
    stated = (f"predicted no-replay {target} {point:+.3f} "
              f"({prediction['level']:.0%} interval {prediction['ci_low']:+.3f} to {upper:+.3f})")
    base_k = k if k >= 1 else DEFAULT_K  # a job without replay (mode none/ptst) gets the default k
    if upper < LOW_RISK:
        return PolicyChoice(policy, max(1, base_k // 2), "replay", False, "low",
                            f"{stated}: upper bound below {LOW_RISK}: half the replay", prediction)
    if point >= HIGH_RISK:
        return PolicyChoice(policy, min(MAX_K, 2 * base_k), "replay", True, "high",
                            f"{stated}: at or above {HIGH_RISK}: twice the replay and the safety system prompt", prediction)
    return PolicyChoice(policy, base_k, "replay", False, "medium", f"{stated}: the default replay", prediction)
