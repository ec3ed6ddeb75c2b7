"""Entry point of the selector benchmark (safekeel.eval.bench): a grid of fine-tuning runs, every
selector against random selection, paired by training seed. Same as `safekeel bench`.

    python benchmarks/bench.py --quick [--commit]
    python benchmarks/bench.py --grid selectors|full|<grid.yaml|grid.json> [--commit] [--render-only]

Run records: benchmarks/results/bench_runs/<grid>/ (resumable, committed with --commit); outputs:
benchmarks/results/bench_<grid>.{json,md,*.png} (the selectors preset: selectors.*); adapters and responses: benchmarks/cache/bench/.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safekeel.eval.bench import CACHE_DIR, RESULTS_DIR, main_command  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default=None, help="preset (quick, selectors, full) or a grid file (.json, .yaml)")
    parser.add_argument("--quick", action="store_true", help="the quick preset (20 min on 2 CPU cores, measured)")
    parser.add_argument("--commit", action="store_true", help="git-commit each finished run record and the summary")
    parser.add_argument("--render-only", action="store_true", help="re-analyse the runs in bench_<grid>.json and re-render the markdown and plots (no run is executed)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    args = parser.parse_args()
    if args.quick == bool(args.grid):
        parser.error("give exactly one of --quick and --grid")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    markdown = main_command("quick" if args.quick else args.grid, args.results_dir, args.cache_dir, commit=args.commit,
                            render_only=args.render_only, command="python benchmarks/bench.py " + " ".join(sys.argv[1:]))
    print(markdown.read_text())


if __name__ == "__main__":
    main()
