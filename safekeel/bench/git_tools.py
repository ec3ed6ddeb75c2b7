"""Git for the benchmark: commit run records (one by one or in batches) and freeze the code of a revision.

Standard library only, on purpose: benchmarks/bench.py and benchmarks/rerun.py load this file by its path
to make a frozen worktree (`frozen_worktree`) BEFORE they import safekeel from it, so importing the package
here would import it from the wrong checkout.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)


def git_commit(paths: Sequence[Path], message: str, root: Path | None = None) -> None:
    """git add + commit only these paths (other work in the checkout is left alone); retried, since
    other processes may hold the index lock. Logs a warning if it never succeeds. `root`: the checkout to
    commit in; by default the one that holds the first path (where the caller wrote its records)."""
    paths = [Path(p).resolve() for p in paths]
    if not paths:
        return
    root = Path(root) if root is not None else paths[0].parent
    for attempt in range(5):
        added = subprocess.run(["git", "-C", str(root), "add", *map(str, paths)], capture_output=True, text=True)
        done = subprocess.run(["git", "-C", str(root), "commit", "-q", "-m", message, "--", *map(str, paths)],
                              capture_output=True, text=True)
        if added.returncode == 0 and done.returncode == 0:
            return
        time.sleep(2 + attempt)
    log.warning("could not commit %s: %s", [str(p) for p in paths], (done.stderr or added.stderr).strip())


def uncommitted(paths: Sequence[Path]) -> list[Path]:
    """The existing files among `paths` that git does not hold as they are (untracked or modified), in the
    order given; [] outside a git checkout. What an interrupted batch left behind."""
    existing = [Path(p).resolve() for p in paths if Path(p).is_file()]
    if not existing:
        return []
    root = existing[0].parent
    top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0:
        return []
    status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=all", "--",
                             *map(str, existing)], capture_output=True, text=True)
    # porcelain paths are relative to the top of the checkout
    changed = {(Path(top.stdout.strip()) / line[3:].strip('"')).resolve() for line in status.stdout.splitlines() if line.strip()}
    return [p for p in existing if p in changed]


class BatchCommitter:
    """Collects the files of finished runs and commits them `every` runs at a time (1: a commit per run).
    `add` one run's files, `flush` what is pending at the end. `message(runs)` words the commit of a batch."""

    def __init__(self, every: int, message: Callable[[list[str]], str], enabled: bool = True) -> None:
        if every < 1:
            raise ValueError(f"commit every {every} runs: give a number of runs >= 1")
        self.every, self.message, self.enabled = every, message, enabled
        self.runs: list[str] = []
        self.paths: list[Path] = []

    def add(self, run: str, paths: Sequence[Path], outputs: Sequence[Path] = ()) -> None:
        """One finished run's files; commits (with `outputs`, the summary as it stands) once `every` are pending."""
        self.runs.append(run)
        self.paths += [p for p in paths if p not in self.paths]
        if len(self.runs) >= self.every:
            self.flush(outputs)

    def flush(self, outputs: Sequence[Path] = (), note: str = "") -> None:
        """Commit the pending runs' files and `outputs` in one commit (nothing when no run is pending)."""
        if not self.runs:
            return
        if self.enabled:
            git_commit(self.paths + [p for p in outputs if p not in self.paths], self.message(self.runs) + note)
        self.runs, self.paths = [], []


def runs_message(label: str) -> Callable[[list[str]], str]:
    """'<label>: run <id>' for one run, '<label>: <n> runs (<first> .. <last>)' for a batch."""
    return lambda runs: f"{label}: run {runs[0]}" if len(runs) == 1 else f"{label}: {len(runs)} runs ({runs[0]} .. {runs[-1]})"


def frozen_worktree(repo: Path, revision: str, path: Path | None = None) -> Path:
    """A detached git worktree of `repo` at `revision` (made once, reused after; an existing folder at the
    path that is not that revision is an error, never overwritten). Its path."""
    def git(*args: str, cwd: Path = repo) -> str:
        done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {done.stderr.strip()}")
        return done.stdout.strip()

    try:
        sha = git("rev-parse", "--verify", f"{revision}^{{commit}}")
    except RuntimeError as error:
        raise ValueError(f"--code-from {revision!r} is not a commit of {repo}") from error
    path = path or repo.parent / f"{repo.name}-code-{sha[:10]}"
    if path.exists():
        if not (path / ".git").exists() or git("rev-parse", "HEAD", cwd=path) != sha:
            raise FileExistsError(f"{path} exists and is not a worktree at {sha[:10]}: move it away or pick another revision")
        if git("status", "--porcelain", "--untracked-files=no", cwd=path):
            raise RuntimeError(f"{path} has local edits: it would not be the code of {sha[:10]}")
        return path
    git("worktree", "add", "--detach", str(path), sha)
    return path
