"""Fit the learned selection model (safekeel/selectors/assets/learned_selection.json) and print its
leave-one-dataset-out validation.

The rows are the committed grids' replay runs on the development datasets (safekeel.bench.selection_fit): per
run, the features of its selected set (safekeel.selectors.learned.SET_FEATURES, against that dataset's user
data; the base model's pool losses from --cache-dir/selection, computed there if missing) and its harmful rate
and over-refusal centred on its block. Ridge regression per outcome; the validation fits on all datasets but
one and predicts that one: rank correlation, RMSE against the block mean, and which run it would have chosen in
each block. The outcome column is configurable: --judge (the committed records hold the classifier's rates,
which measure refusal rather than harmful content; refit on rejudged records with --results-dir OUT --judge NAME
after `safekeel rejudge --judge NAME --out OUT GRID...`).

    python benchmarks/learned_selection.py                    # refits the shipped model, prints the validation
    python benchmarks/learned_selection.py --validate-only    # prints the validation, writes nothing
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from safekeel.bench.selection_fit import (DEV_DATASETS, dataset_tables, design, fit_ridge, format_validation,  # noqa: E402
                                          leave_one_dataset_out, outcome_rows, outcomes_digest, targets)
from safekeel.data.safety import AUTHORED_POOL, load_pool  # noqa: E402
from safekeel.provenance import write_json_atomic  # noqa: E402
from safekeel.selectors.learned import asset_path  # noqa: E402

HELD_OUT = ("sqlgen-100", "alpaca_safety-100")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / "cache" / "bench",
                        help="the bench cache: templated datasets and the selection store with the base model's pool losses")
    parser.add_argument("--judge", default="classifier")
    parser.add_argument("--harmful-metric", default="harmful")
    parser.add_argument("--datasets", nargs="+", default=list(DEV_DATASETS))
    parser.add_argument("--model", default="smollm2-135m-safe", help="the base model whose pool losses are a feature")
    parser.add_argument("--ridge-lambda", type=float, default=1.0)
    parser.add_argument("--overrefusal-weight", type=float, default=1.0)
    parser.add_argument("--validate-only", action="store_true")
    parser.add_argument("--out", type=Path, default=asset_path())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    leaked = sorted(set(args.datasets) & set(HELD_OUT))
    if leaked:
        parser.error(f"{leaked} are the selection_v2 grid's held-out datasets: the model must not be fitted on them")
    pool = load_pool(AUTHORED_POOL)
    rows = outcome_rows(args.results_dir, pool, judge=args.judge, harmful_metric=args.harmful_metric, datasets=args.datasets)
    if len({r["dataset"] for r in rows}) < 2:
        parser.error(f"need runs on two or more datasets under {args.results_dir}/bench_runs (judge {args.judge!r}), found "
                     f"{sorted({r['dataset'] for r in rows})}")
    x = design(rows, dataset_tables(rows, pool, args.model, args.cache_dir), pool)
    lodo = leave_one_dataset_out(rows, x, args.ridge_lambda, args.overrefusal_weight)
    print(f"{len(rows)} runs, {len({r['block'] for r in rows})} blocks, {args.judge} judge; leave-one-dataset-out:")
    print(format_validation(lodo))
    settings = {"judge": args.judge, "harmful_metric": args.harmful_metric, "model": args.model,
                "ridge_lambda": args.ridge_lambda, "features": "SET_FEATURES"}
    training = {"command": "python benchmarks/learned_selection.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                **settings, "datasets": sorted({r["dataset"] for r in rows}), "n_runs": len(rows),
                "n_blocks": len({r["block"] for r in rows}), "grids": sorted({r["grid"] for r in rows}),
                "sha256": outcomes_digest(rows, **settings),
                "fitted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    model = fit_ridge(x, targets(rows), args.ridge_lambda, args.overrefusal_weight,
                      {"training": training, "leave_one_dataset_out": lodo})
    if not args.validate_only:
        write_json_atomic(args.out, model.to_dict())
        print(f"written: {args.out}")
    return model.to_dict()


if __name__ == "__main__":
    main()
