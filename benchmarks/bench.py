"""Entry point of the selector benchmark (safekeel.bench): a grid of fine-tuning runs, every
selector against random selection, paired by training seed. Same as `safekeel bench`.

    python benchmarks/bench.py --quick [--commit]
    python benchmarks/bench.py --grid selectors|full|<grid.yaml|grid.json> [--commit] [--render-only]
    python benchmarks/bench.py --grid modes --commit [--commit-every 10] --code-from REV

Run records: benchmarks/results/bench_runs/<grid>/ (resumable, committed with --commit); outputs:
benchmarks/results/bench_<grid>.{json,md,*.png} (the selectors preset: selectors.*); adapters and responses: benchmarks/cache/bench/.

--code-from REV runs the grid with the code of git revision REV, checked out once as a detached worktree
beside this checkout (<checkout>-code-<sha>), while records, caches and commits go to this checkout: a grid
that runs for hours is not changed midway by edits here, and a later session resumes it with the same code.
A revision from before the benchmark became safekeel.bench (its code in safekeel/eval/bench.py) runs too,
without --commit-every. --commit-every N commits the records of N finished runs at a time (default 1: one
commit per run, as before); records an interrupted batch left uncommitted are committed at the next start.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _git_tools():
    """safekeel/bench/git_tools.py of this checkout, loaded by its path (standard library only): the frozen
    worktree is made before safekeel is imported, from it."""
    spec = importlib.util.spec_from_file_location("_safekeel_git_tools_here", ROOT / "safekeel" / "bench" / "git_tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


frozen_worktree = _git_tools().frozen_worktree


def bench_module(code: Path, commit_every: int):
    """The bench command of the code in `code`: safekeel.bench.cli, or in a revision from before the benchmark
    was its own subpackage, safekeel.eval.bench (whose git_commit defaults to committing in its own worktree:
    pointed at this checkout when the code is not this checkout's). Import safekeel from `code` first. Asks the
    files, not the import system: the editable install would find this checkout's safekeel.bench for an old tree."""
    if (code / "safekeel" / "bench" / "cli.py").is_file():
        from safekeel.bench import cli as bench
        from safekeel.bench.presets import PRESETS

        return bench, PRESETS
    if commit_every != 1:
        raise SystemExit(f"--commit-every needs code with safekeel.bench; {code} has only safekeel.eval.bench")
    import safekeel.eval.bench as bench

    if code.resolve() != ROOT.resolve():
        commit_here = bench.git_commit

        def git_commit(paths, message, root=ROOT):  # the frozen code's default root is its worktree
            return commit_here(paths, message, root=root)

        bench.git_commit = git_commit
    return bench, bench.PRESETS


def warn_if_bf16_emulated() -> None:
    """The grids' presets train in bf16 (their run ids hash it) and were timed on CPUs that run it natively:
    say at the start, not hours in, when this CPU only emulates bf16. Reads this checkout's safekeel/provenance.py (stdlib only),
    so the warning holds under --code-from an older revision too."""
    import torch

    spec = importlib.util.spec_from_file_location("_safekeel_provenance_here", ROOT / "safekeel" / "provenance.py")
    provenance = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(provenance)
    if warning := provenance.bf16_emulation_warning(True, cuda=torch.cuda.is_available()):
        logging.warning("%s. Every preset trains with bf16: true, so each run here takes several times as long "
                        "as the timings in the README (a GSM8K modes run: 6,732 s against 264 s).", warning)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default=None, help="preset (quick, selectors, modes, identity, full) or a grid file (.json, .yaml)")
    parser.add_argument("--quick", action="store_true", help="the quick preset (20 min on 2 CPU cores, measured)")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run record and the summary")
    parser.add_argument("--commit-every", type=int, default=1, metavar="N",
                        help="with --commit: one commit per N finished runs (default 1: a commit per run)")
    parser.add_argument("--render-only", action="store_true", help="re-analyse the runs in bench_<grid>.json and re-render the markdown and plots (no run is executed)")
    parser.add_argument("--code-from", metavar="REV", default=None,
                        help="run with the code of this git revision (a detached worktree beside the checkout), records and commits here")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / "cache" / "bench")
    args = parser.parse_args()
    if args.quick == bool(args.grid):
        parser.error("give exactly one of --quick and --grid")
    if args.commit_every < 1:
        parser.error("--commit-every takes a number of runs >= 1")
    code = ROOT
    if args.code_from:
        code = frozen_worktree(ROOT, args.code_from)
        # Python subprocesses started otherwise than by multiprocessing (which passes sys.path on) import it too
        os.environ["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path.insert(0, str(code))
    import safekeel

    if Path(safekeel.__file__).resolve().parents[1] != code.resolve():
        raise RuntimeError(f"safekeel was imported from {safekeel.__file__}, not from {code}")
    bench, presets = bench_module(code, args.commit_every)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.render_only and (args.quick or args.grid in presets):  # a grid file sets its own bf16
        warn_if_bf16_emulated()
    if args.code_from:
        logging.info("code from %s (%s, %s); records and commits in %s", args.code_from, code, bench.__name__, ROOT)
    options = {"commit_every": args.commit_every} if args.commit_every != 1 else {}
    markdown = bench.main_command("quick" if args.quick else args.grid, args.results_dir, args.cache_dir, commit=args.commit,
                                  render_only=args.render_only, command="python benchmarks/bench.py " + " ".join(sys.argv[1:]),
                                  **options)
    print(markdown.read_text())


if __name__ == "__main__":
    main()
