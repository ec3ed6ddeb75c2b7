"""SAE sweep queue: train queued configs `parallel` at a time on one activation stream, kill the hopeless early.

Every active slot consumes every stream item (one model forward feeds them all). After each item the
kill rules are checked; a run that breaks one (or spends its token budget) frees its slot, and the next
queued config starts there, fresh, from the current stream position. The sweep ends when the queue
and the slots are empty, the stream ends, or `should_stop` returns True. `sweep.json` records, for
every config: status, kill reason and the step/tokens of the kill, final metrics, compute and wall
time, and the time a kill saved: (budgeted steps - steps run) * measured seconds per step, where a
step's seconds are the SAE's own compute (the shared model forward is paid once whatever the slots).
Completed, stream-ended and cancelled runs are saved as SAE folders beside sweep.json; killed ones are not.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from safekeel.monitors.sae import SaeConfig, SaeRun, TrainStats, check_unique_names, chunk_tokens
from safekeel.provenance import library_versions, write_json_atomic

FORMAT_VERSION = 1
KILL_METRICS = ("fvu", "fvu_ema", "dead_fraction", "l0", "auxk_loss")
SWEEP_STATUSES = ("not_started", "running", "completed", "killed", "stream_ended", "cancelled")
"""`stream_ended`: the stream ran out before the run's token budget (a run without one completes)."""


@dataclass(frozen=True)
class KillRule:
    """Kill a run whose `metric` is above `above` once it has taken at least `after_steps` steps."""

    metric: str
    """A TrainStats field: fvu, fvu_ema, dead_fraction, l0 or auxk_loss. Dead fraction can only rise
    once a run has seen its config's dead_tokens tokens, so set after_steps past that."""
    above: float
    after_steps: int
    pattern: str = "*"
    """Applies to runs whose name (SaeConfig.run_name) matches this fnmatch pattern."""

    def __post_init__(self) -> None:
        if self.metric not in KILL_METRICS:
            raise ValueError(f"unknown kill metric {self.metric!r}; known: {KILL_METRICS}")
        if self.after_steps < 1:
            raise ValueError(f"after_steps must be >= 1, got {self.after_steps}")

    def check(self, name: str, stats: TrainStats) -> str | None:
        """The kill reason, or None if the run survives this rule."""
        if stats.steps < self.after_steps or not fnmatchcase(name, self.pattern):
            return None
        value = getattr(stats, self.metric)
        if value > self.above:
            return f"{self.metric} = {value:.4g} > {self.above:g} at step {stats.steps} (checked from step {self.after_steps})"
        return None


@dataclass
class SweepRecord:
    """What happened to one queued config."""

    index: int
    name: str
    config: dict[str, Any]
    budget_steps: int | None
    status: str = "not_started"
    kill_reason: str | None = None
    killed_at_step: int | None = None
    killed_at_tokens: int | None = None
    started_at_stream_tokens: int | None = None
    """Stream position (tokens) at which the run took its slot."""
    steps: int = 0
    tokens: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    """Final TrainStats (without the per-step history)."""
    compute_seconds: float = 0.0
    wall_seconds: float = 0.0
    seconds_per_step: float | None = None
    estimated_seconds_saved: float | None = None
    """Killed: (budget_steps - steps) * seconds_per_step; completed: 0; otherwise None (unknown)."""
    folder: str | None = None


@dataclass
class SweepResult:
    records: list[SweepRecord]
    path: Path
    """The sweep.json written."""
    cancelled: bool
    stream_exhausted: bool
    stream_tokens: int

    def record(self, name: str) -> SweepRecord:
        for record in self.records:
            if record.name == name:
                return record
        raise KeyError(f"no run named {name!r} in this sweep")


def run_sweep(configs: Sequence[SaeConfig], stream: Iterable[Mapping[str, Tensor]], out_dir: str | Path, *,
              kill_rules: Sequence[KillRule] = (), parallel: int = 2, model_hash: str | None = None,
              extra: Mapping[str, Any] | None = None, device: str | torch.device = "cpu", ema_decay: float = 0.9,
              progress: bool = False, should_stop: Callable[[], bool] | None = None) -> SweepResult:
    """Run the queue `configs` (in order) `parallel` at a time on `stream`; write out_dir/sweep.json
    (rewritten at every status change) and the surviving SAE folders. `should_stop` is polled before
    each stream item."""
    from tqdm.auto import tqdm

    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    if not configs:
        raise ValueError("the sweep queue is empty")
    check_unique_names(configs)
    out_dir = Path(out_dir)
    path = out_dir / "sweep.json"
    records = [SweepRecord(i, c.run_name, asdict(c), c.budget_steps) for i, c in enumerate(configs)]
    queue = deque(range(len(configs)))
    active: dict[int, SaeRun] = {}
    started_at: dict[int, float] = {}
    state = {"stream_tokens": 0, "cancelled": False, "stream_exhausted": False, "finished": False}

    def write() -> None:
        saved = [r.estimated_seconds_saved for r in records if r.estimated_seconds_saved is not None]
        write_json_atomic(path, {
            "format_version": FORMAT_VERSION, "kind": "sae_sweep", **state, "parallel": parallel,
            "kill_rules": [asdict(rule) for rule in kill_rules], "model_hash": model_hash,
            "extra": dict(extra or {}), "total_estimated_seconds_saved": sum(saved),
            "runs": [asdict(r) for r in records], "library_versions": library_versions(),
        })

    def fill() -> None:
        while len(active) < parallel and queue:
            index = queue.popleft()
            active[index] = SaeRun(configs[index], device=device, ema_decay=ema_decay)
            started_at[index] = time.perf_counter()
            records[index].status = "running"
            records[index].started_at_stream_tokens = state["stream_tokens"]

    def finish(index: int, status: str, reason: str | None = None) -> None:
        run = active.pop(index)
        record = records[index]
        stats = run.stats
        record.status = status
        record.steps, record.tokens = stats.steps, stats.tokens
        record.metrics = stats.summary()
        record.compute_seconds = stats.compute_seconds
        record.wall_seconds = time.perf_counter() - started_at[index]
        record.seconds_per_step = stats.compute_seconds / stats.steps if stats.steps else None
        if status == "killed":
            record.kill_reason, record.killed_at_step, record.killed_at_tokens = reason, stats.steps, stats.tokens
            if record.budget_steps is not None and record.seconds_per_step is not None:
                record.estimated_seconds_saved = max(record.budget_steps - stats.steps, 0) * record.seconds_per_step
        else:
            if status == "completed":
                record.estimated_seconds_saved = 0.0
            result = run.finish(status, out_dir / run.cfg.run_name, model_hash=model_hash, extra=extra)
            record.folder = str(result.folder)

    fill()
    write()
    with tqdm(desc="SAE sweep", unit="tok", unit_scale=True, disable=not progress) as bar:
        for chunk in stream:
            if should_stop is not None and should_stop():
                state["cancelled"] = True
                break
            ended = 0
            for index, run in list(active.items()):
                run.feed(chunk)
                reason = next((r for r in (rule.check(run.cfg.run_name, run.stats) for rule in kill_rules) if r), None)
                if reason is not None or run.done:
                    finish(index, "killed" if reason is not None else "completed", reason)
                    ended += 1
            tokens = chunk_tokens(chunk)
            state["stream_tokens"] += tokens
            bar.update(tokens)
            if ended:
                fill()
                write()
            bar.set_postfix({records[i].name: f"{r.stats.fvu_ema:.3f}" for i, r in active.items()}, refresh=False)
            if not active:
                break
        else:
            state["stream_exhausted"] = True
    for index in list(active):
        if state["cancelled"]:
            finish(index, "cancelled")
        else:
            finish(index, "completed" if configs[index].max_tokens is None else "stream_ended")
    state["finished"] = True
    write()
    return SweepResult(records, path, state["cancelled"], state["stream_exhausted"], state["stream_tokens"])
