"""What the judgement cache (safekeel/eval/judges/cache.py) buys `judges.py report`: one grid's kept runs judged
again three ways in one process, as the report does (benchmarks/judges_claims.run_rates): without the cache, with
an empty cache (every pair judged and stored), and with the cache filled by the second pass. Ratios against the
uncached pass of the same run; the three must give identical rates.

    python benchmarks/judgement_cache_bench.py --grid identity   # -> benchmarks/results/judgement_cache.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from judges import RESULTS
from judges_claims import JUDGES, run_rates
from safekeel.eval.judges import get_judge
from safekeel.eval.judges.cache import JudgementCache
from safekeel.provenance import library_versions


def measure(grid: str) -> dict:
    for judge in JUDGES:  # load the judges' models before any timed pass
        get_judge(judge).judge(["warm up"], ["warm up"])
    with tempfile.TemporaryDirectory() as folder, JudgementCache(Path(folder) / "judgements.sqlite") as cache:
        started = time.time()
        plain = run_rates(grid)
        plain_s = time.time() - started
        if not plain:
            raise SystemExit(f"grid {grid!r} has no kept runs under {RESULTS / 'replies' / grid}: nothing to measure")
        started = time.time()
        cold = run_rates(grid, cache=cache)
        cold_s = time.time() - started
        cold_misses = dict(cache.misses)
        started = time.time()
        warm = run_rates(grid, cache=cache)
        warm_s = time.time() - started
        stored = cache.size()
    return {"grid": grid, "runs": len(plain), "judges": list(JUDGES), "pairs_judged": cold_misses, "verdicts_stored": stored,
            "uncached_s": round(plain_s, 2), "empty_cache_s": round(cold_s, 2), "filled_cache_s": round(warm_s, 2),
            "empty_over_uncached": round(cold_s / plain_s, 3), "uncached_over_filled": round(plain_s / max(warm_s, 1e-9), 1),
            "identical_rates": plain == cold == warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="identity", help="a grid with kept replies under benchmarks/results/replies")
    parser.add_argument("--out", type=Path, default=RESULTS / "judgement_cache")
    args = parser.parse_args()
    result = measure(args.grid)
    result.update(command=f"python benchmarks/judgement_cache_bench.py --grid {args.grid}", cpus=os.cpu_count(),
                  versions=library_versions(),
                  note="one process, the passes in this order; the machine may have run other work beside it (see the closing note)")
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# The judgement cache and `judges.py report`", "", f"`{result['command']}`: the {result['runs']} kept runs of "
             f"`{result['grid']}` judged again by " + ", ".join(f"{j} ({n} (prompt, reply) pairs judged and stored)" for j, n in result["pairs_judged"].items())
             + ", three times in one process, after loading the judges' models.", "",
             "| pass | seconds | ratio to uncached |", "| --- | --- | --- |",
             f"| no cache | {result['uncached_s']:.1f} | 1 |",
             f"| empty cache (judge and store) | {result['empty_cache_s']:.1f} | {result['empty_over_uncached']:.2f} |",
             f"| filled cache | {result['filled_cache_s']:.2f} | 1/{result['uncached_over_filled']:.0f} |", "",
             f"Identical rates in all three passes: {result['identical_rates']}."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
