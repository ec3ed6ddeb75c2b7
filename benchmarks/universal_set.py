"""Build the universal set (safekeel/selectors/assets/universal_set.json) from the committed grids' development datasets.

One fixed ranking of the authored pool that `universal` returns the first k of, found from the replay runs of
the grids under --results-dir on the development datasets only (safekeel.bench.selection_fit.DEV_DATASETS: never
the selection_v2 grid's held-out sqlgen-100 and alpaca_safety-100): each example's credit is the mean block-centred
harmful rate + --overrefusal-weight x over-refusal of the runs that replayed it, shrunk by --prior-runs; harm
categories in turn. No model and no training: seconds. The file records this command, the outcomes' hash, the
datasets, the judge and the git revision of the records.

    python benchmarks/universal_set.py                     # rebuilds the shipped file
    python benchmarks/universal_set.py --judge content --results-dir OUT   # on rejudged records (safekeel rejudge --out OUT)
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from safekeel.bench.selection_fit import DEV_DATASETS, outcome_rows, outcomes_digest, universal_ranking  # noqa: E402
from safekeel.data.safety import AUTHORED_POOL, load_pool  # noqa: E402
from safekeel.provenance import sha256_json, write_json_atomic  # noqa: E402
from safekeel.selectors.universal import asset_path  # noqa: E402

HELD_OUT = ("sqlgen-100", "alpaca_safety-100")


def git_revision(path: Path) -> str | None:
    found = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or None


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--judge", default="classifier", help="whose rates are the outcome (the committed records: classifier)")
    parser.add_argument("--harmful-metric", default="harmful")
    parser.add_argument("--datasets", nargs="+", default=list(DEV_DATASETS), help="development datasets searched")
    parser.add_argument("--overrefusal-weight", type=float, default=1.0)
    parser.add_argument("--prior-runs", type=float, default=5.0)
    parser.add_argument("--keep", type=int, default=None, help="ranked examples shipped (the largest k it serves; default: the whole pool)")
    parser.add_argument("--out", type=Path, default=asset_path())
    args = parser.parse_args(argv)
    leaked = sorted(set(args.datasets) & set(HELD_OUT))
    if leaked:
        parser.error(f"{leaked} are the selection_v2 grid's held-out datasets: the universal set must not be found on them")
    pool = load_pool(AUTHORED_POOL)
    rows = outcome_rows(args.results_dir, pool, judge=args.judge, harmful_metric=args.harmful_metric, datasets=args.datasets)
    if not rows:
        parser.error(f"no usable runs under {args.results_dir}/bench_runs for {args.datasets} with judge {args.judge!r}")
    ranking = universal_ranking(rows, pool, args.overrefusal_weight, args.prior_runs)[: args.keep]
    settings = {"judge": args.judge, "harmful_metric": args.harmful_metric, "overrefusal_weight": args.overrefusal_weight,
                "prior_runs": args.prior_runs}
    data = {
        "pool": AUTHORED_POOL, "pool_sha256": sha256_json([asdict(e) for e in pool]), "ranking": ranking,
        "provenance": {
            "command": "python benchmarks/universal_set.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "method": "credit = sum over runs replaying the example of (harmful_centred + overrefusal_weight x "
                      "overrefusal_centred) / (n_runs + prior_runs), centred on the mean of the run's block (dataset, k, seed, "
                      "evaluation); harm categories in turn, ordered by their best credit",
            **settings, "datasets": sorted({r["dataset"] for r in rows}), "n_runs": len(rows),
            "n_blocks": len({r["block"] for r in rows}), "grids": sorted({r["grid"] for r in rows}),
            "outcomes_sha256": outcomes_digest(rows, **settings),
            "records_revision": git_revision(args.results_dir),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    }
    write_json_atomic(args.out, data)
    print(f"{len(rows)} runs in {data['provenance']['n_blocks']} blocks on {', '.join(data['provenance']['datasets'])} "
          f"({args.judge} judge); {len(ranking)} ranked, the first 20:")
    for place, entry in enumerate(ranking[:20], 1):
        print(f"{place:>3}  {entry['id']:<28} {entry['credit']:+.4f}  ({entry['n_runs']} runs)")
    print(f"written: {args.out}")
    return args.out


if __name__ == "__main__":
    main()
