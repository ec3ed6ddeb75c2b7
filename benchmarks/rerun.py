"""Regenerate the replies of committed benchmark runs (safekeel.bench.rerun), so their tables can be judged again.

    python benchmarks/rerun.py --plan benchmarks/judges/rerun_plan_agreement.json --commit --code-from HEAD
    python benchmarks/rerun.py --grid confirm --extras overrefusal --commit --code-from HEAD

Writes benchmarks/results/replies/<grid>/<run id>.jsonl.gz and benchmarks/results/reruns/<grid>/<run id>.json
for every run that has no rerun record yet (resumable), committing every --batch reruns. A plan is a JSON
list of {"grid", "run_id", "extras"}; --grid reruns every committed record of the grid. --code-from REV runs
the code of a git revision from a detached worktree (as benchmarks/bench.py does), so edits here do not
change a rerun that takes hours; a revision from before the benchmark became safekeel.bench (safekeel.eval.rerun)
runs too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _bench_script():
    spec = importlib.util.spec_from_file_location("_bench_script", ROOT / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", type=Path, help="a JSON list of {grid, run_id, extras}")
    parser.add_argument("--grid", action="append", default=[], help="rerun every committed record of this grid (repeatable)")
    parser.add_argument("--extras", default="overrefusal", help="prompt sets added (safekeel.bench.rerun.EXTRAS) for --grid runs")
    parser.add_argument("--bf16", default="auto", choices=["auto", "keep", "off"])
    parser.add_argument("--batch", type=int, default=6, help="commit every N finished reruns")
    parser.add_argument("--commit", action="store_true")
    parser.add_argument("--code-from", metavar="REV", default=None)
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / "cache" / "bench")
    args = parser.parse_args()
    if not args.plan and not args.grid:
        parser.error("give --plan or --grid")
    code = ROOT
    if args.code_from:
        code = _bench_script().frozen_worktree(ROOT, args.code_from)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path.insert(0, str(code))
    import torch

    import safekeel

    if Path(safekeel.__file__).resolve().parents[1] != code.resolve():
        raise RuntimeError(f"safekeel was imported from {safekeel.__file__}, not from {code}")
    # the files decide, not the import system (the editable install would find this checkout's safekeel.bench)
    if (code / "safekeel" / "bench" / "rerun.py").is_file():
        from safekeel.bench.rerun import rerun_many  # its commits go to the checkout that holds the records
    else:  # a revision from before safekeel.bench: its git_commit defaults to its own worktree
        import safekeel.eval.bench as bench
        from safekeel.eval.rerun import rerun_many

        if code.resolve() != ROOT.resolve():
            commit_here = bench.git_commit
            bench.git_commit = lambda paths, message, root=ROOT: commit_here(paths, message, root=root)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(os.cpu_count() or 1)
    groups: dict[str, list[tuple[str, str]]] = {}
    if args.plan:
        for item in json.loads(args.plan.read_text()):
            groups.setdefault(item.get("extras", args.extras), []).append((item["grid"], item["run_id"]))
    for grid in args.grid:
        runs = sorted(p.stem for p in (args.results_dir / "bench_runs" / grid).glob("*.json"))
        if not runs:
            parser.error(f"no committed run records in {args.results_dir / 'bench_runs' / grid}")
        groups.setdefault(args.extras, []).extend((grid, r) for r in runs)
    for extras, targets in groups.items():
        rerun_many(targets, args.results_dir, args.cache_dir, bf16=args.bf16, extras=extras, commit=args.commit, batch=args.batch)


if __name__ == "__main__":
    main()
