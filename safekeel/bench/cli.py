"""The benchmark's command line: what `safekeel bench` and the benchmarks/ grid scripts share. The only place
of the package where the results and cache folders default to the checkout's benchmarks/ (the library
functions write where they are told).
"""

from __future__ import annotations

import argparse
import logging
import os
from functools import partial
from pathlib import Path

from safekeel.bench.presets import load_grid
from safekeel.bench.ray_executor import execute_on_ray
from safekeel.bench.report import reanalyse, render
from safekeel.bench.runner import run_grid
from safekeel.paths import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
"""Default results folder of the bench commands: run records, replies, bench_<grid>.json/.md and plots (committed)."""
CACHE_DIR = REPO_ROOT / "benchmarks" / "cache" / "bench"
"""Default cache folder of the bench commands: adapters, selections and eval responses (outside git)."""


def script_parser(doc: str, render_help: str) -> argparse.ArgumentParser:
    """The command line every benchmarks/ grid script starts from, described by the first paragraph of its
    docstring: --commit, --commit-every, --render-only (with the script's own help), --results-dir and --cache-dir."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run record and the outputs")
    add_commit_every(parser)
    parser.add_argument("--render-only", action="store_true", help=render_help)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    return parser


def add_commit_every(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--commit-every", type=int, default=1, metavar="N",
                        help="with --commit: one commit per N finished runs (default 1: a commit per run)")


def start_script(render_only: bool) -> None:
    """Log to stderr, and give torch every core unless the script only re-renders (torch not imported)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not render_only:
        import torch  # deferred on purpose: a re-render never needs torch

        torch.set_num_threads(os.cpu_count() or 1)


def main_command(grid_source: str, results_dir: str | Path = RESULTS_DIR, cache_dir: str | Path = CACHE_DIR,
                 commit: bool = False, render_only: bool = False, command: str = "", commit_every: int = 1,
                 executor: str = "local", ray_address: str | None = None, ray_cpus_per_run: float = 1.0) -> Path:
    """What `safekeel bench` and benchmarks/bench.py do: run (or only re-render) a grid; the markdown path.
    `executor`: local (one run after another in this process) or ray (the runs as Ray tasks on the cluster at
    `ray_address`, `ray_cpus_per_run` CPUs each; safekeel.bench.ray_executor)."""
    if commit_every < 1:
        raise ValueError(f"--commit-every {commit_every}: give a number of runs >= 1")
    if executor not in ("local", "ray"):
        raise ValueError(f"--executor {executor!r}: use local or ray")
    if ray_cpus_per_run <= 0:
        raise ValueError(f"--ray-cpus-per-run {ray_cpus_per_run}: give a number of CPUs > 0")
    grid = load_grid(grid_source)
    json_path = Path(results_dir) / f"{grid.output_stem}.json"
    if render_only:
        if not json_path.is_file():
            raise FileNotFoundError(f"{json_path} does not exist: run the grid first")
        reanalyse(json_path)
        render(json_path)
        return json_path.with_suffix(".md")
    import torch  # deferred on purpose: a re-render never needs torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    runs = partial(execute_on_ray, address=ray_address, cpus_per_run=ray_cpus_per_run) if executor == "ray" else None
    run_grid(grid, results_dir, cache_dir, commit=commit, command=command, commit_every=commit_every, runs=runs)
    return json_path.with_suffix(".md")
