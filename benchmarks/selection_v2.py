"""Selection v2 (issue 31; safekeel.bench.selection_v2) as fixed in benchmarks/selection_v2_plan.md: nominate a method
from the finished phase-1 grid (selection_v2_k10) by the plan's rule, test it against random on fresh seeds, trace
the k curve, and report.

    python benchmarks/selection_v2.py nominate            # print the rule's inputs and outcome (writes nothing)
    python benchmarks/selection_v2.py confirm [--commit]  # phase 2: selection_v2_confirm (72 fine-tunes, ~5-6 h)
    python benchmarks/selection_v2.py kcurve [--commit]   # phase 3: selection_v2_kcurve (48 fine-tunes)
    python benchmarks/selection_v2.py report [--no-census]

Phase 1 itself is `safekeel bench --grid selection_v2_k10`. Records: benchmarks/results/bench_runs/<grid>/ (resumable,
committed with --commit); outputs: benchmarks/results/selection_v2.{json,md} (written after every run and by
`report`, with the census estimates of the runs whose census is labelled). nominate, confirm and kcurve refuse
(exit 2) while phase 1 is unfinished.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from judges_census import run_estimate  # noqa: E402
from judges_report import final_labels  # noqa: E402
from safekeel.bench.cli import CACHE_DIR, RESULTS_DIR, add_commit_every, start_script  # noqa: E402
from safekeel.bench.selection_v2 import (CONFIRM_GRID, KCURVE_GRID, PHASE1_GRID, IncompleteGrid, choose_method,  # noqa: E402
                                         load_records, run_phase, write_outputs)
from safekeel.eval.rejudge import find_runs  # noqa: E402
from safekeel.eval.replies import read_replies  # noqa: E402


def census_estimates(results_dir: Path) -> dict[str, dict]:
    """run_id -> census estimate (judges_census.run_estimate under the adjudicated blind labels) of every kept run of the
    three grids whose census members are all labelled."""
    labels = final_labels()
    out = {}
    for grid in (PHASE1_GRID, CONFIRM_GRID, KCURVE_GRID):
        if not (results_dir / "bench_runs" / grid).is_dir():
            continue
        for run in find_runs(grid, results_dir):
            if run.run_id in out:  # a record shared by two grids (the aligned evaluation)
                continue
            estimate = run_estimate(grid, run.run_id, read_replies(run.replies), labels)
            if estimate is not None:
                out[run.run_id] = estimate
    return out


def nominate(results_dir: Path) -> None:
    choice = choose_method(load_records(results_dir, PHASE1_GRID))
    print(f"rule: {choice['rule']}\n")
    print(f"{'method':32s} {'datasets':>8s} {'dR':>8s} {'dO':>8s} {'dL':>8s}  eligible")
    for e in choice["inputs"]:
        print(f"{e['method']:32s} {e['n_datasets']:8d} {e['dR']:+8.4f} {e['dO']:+8.4f} {e['dL']:+8.4f}  {'yes' if e['eligible'] else 'no'}")
    print(f"\noutcome: {choice['outcome']}" + (f": {choice['method']} (endpoint {choice['endpoint']})" if choice["method"] else "")
          + f"\n{choice['reason']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("nominate", "apply the plan's rule to phase 1's records"), ("confirm", "run phase 2 (the test)"),
                            ("kcurve", "run phase 3 (the k curve)"), ("report", "write results/selection_v2.json/.md")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
        if name in ("confirm", "kcurve"):
            sub.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
            sub.add_argument("--commit", action="store_true", help="git-commit each finished run record and the outputs")
            add_commit_every(sub)
        if name in ("confirm", "kcurve", "report"):
            sub.add_argument("--no-census", action="store_true", help="leave the census estimates out (no label files read)")
    args = parser.parse_args()
    command = "python benchmarks/selection_v2.py " + " ".join(sys.argv[1:])
    start_script(render_only=args.command in ("nominate", "report"))
    try:
        if args.command == "nominate":
            nominate(args.results_dir)
            return
        census = None if args.no_census else census_estimates(args.results_dir)
        if args.command == "report":
            markdown = write_outputs(args.results_dir, command, census)[1]
        else:
            markdown = run_phase(args.command, args.results_dir, args.cache_dir, commit=args.commit, command=command,
                                 commit_every=args.commit_every, census=census)
    except IncompleteGrid as error:
        print(f"selection_v2: {error}", file=sys.stderr)
        sys.exit(2)
    print(markdown.read_text())


if __name__ == "__main__":
    main()
