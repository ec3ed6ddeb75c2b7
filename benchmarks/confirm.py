"""The confirmatory test of the selectors benchmark (safekeel.bench.confirm), as fixed in
benchmarks/confirm_plan.md: choose one selector from the finished k=10 part of results/selectors.json by
the plan's rule, run it and random on eight fresh seeds x three datasets, one one-sided Wilcoxon test.

    python benchmarks/confirm.py [--commit] [--render-only]

Records: benchmarks/results/bench_runs/confirm/ (resumable, committed with --commit); outputs:
benchmarks/results/confirm.{json,md}. Refuses (exit 2) while the selectors grid's k=10 part is unfinished.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safekeel.bench.cli import script_parser, start_script  # noqa: E402
from safekeel.bench.confirm import IncompleteGrid, main_command  # noqa: E402


def main() -> None:
    args = script_parser(__doc__, "re-render confirm.md from confirm.json").parse_args()
    start_script(args.render_only)
    try:
        markdown = main_command(args.results_dir, args.cache_dir, commit=args.commit, render_only=args.render_only,
                                commit_every=args.commit_every, command="python benchmarks/confirm.py " + " ".join(sys.argv[1:]))
    except IncompleteGrid as error:
        print(f"confirm: {error}", file=sys.stderr)
        sys.exit(2)
    print(markdown.read_text())


if __name__ == "__main__":
    main()
