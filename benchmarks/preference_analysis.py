"""Issue 32's analysis of the preference grid (safekeel.bench.preference_analysis): the runs, the spread across backbones
per objective and the safety preference replay against no replay, with the closing note's answers, from the grid's run
records. Seconds, no model; works on a partial grid (missing runs are pending, never 0).

    python benchmarks/preference_analysis.py                       # records in results/bench_runs/preference/
    python benchmarks/preference_analysis.py --run-table benchmarks/results/preference_bench.json

Reads the records of --grid (default: the `preference` preset, as the grid resolves now: its lr and batch come from the
committed search result or the fallback, and records made under another protocol are left out and counted), or with
--run-table the table the bench writes after each run (it has no refusal rates: those stay pending). Without records it
falls back to the run table when there is one. Writes <results-dir>/<stem>.json and .md (default preference.*).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safekeel.bench.presets import load_grid  # noqa: E402
from safekeel.bench.preference_analysis import analyse, load_records, load_run_table, write_analysis  # noqa: E402


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default="preference", help="a grid preset or file with preference objectives (default: preference)")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--records", type=Path, help="folder of run records (default: <results-dir>/bench_runs/<grid name>)")
    parser.add_argument("--run-table", type=Path, help="the bench's run table (<results-dir>/<grid output>.json) instead of records")
    parser.add_argument("--stem", default="preference", help="output file stem (default: preference)")
    args = parser.parse_args(argv)
    grid = load_grid(args.grid)
    records, table, source = [], None, "no records yet"
    if args.run_table:
        if not args.run_table.is_file():
            parser.error(f"no run table {args.run_table}")
        table, source = load_run_table(args.run_table), str(args.run_table)
    else:
        folder = args.records or args.results_dir / "bench_runs" / grid.name
        records = load_records(folder)
        fallback = args.results_dir / f"{grid.output_stem}.json"
        if records:
            source = f"{len(records)} records in {folder}"
        elif fallback.is_file():
            table, source = load_run_table(fallback), str(fallback)
    command = "python benchmarks/preference_analysis.py" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    analysis = analyse(grid, records, table, command=command)
    analysis["source"] = source
    paths = write_analysis(analysis, args.results_dir, args.stem)
    status = analysis["status"]
    print(f"read {source}: {status['fine_tunes_done']}/{status['fine_tunes']} fine-tunes, {status['aligned_done']}/{status['aligned']} "
          f"untuned evaluations ({len(status['unmatched_records'])} records of another protocol left out)")
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
