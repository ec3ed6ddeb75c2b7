"""How many prompts the safety gate needs: paired discordance measured on kept replies, then a power calculation.

    python benchmarks/gate_power.py            # writes benchmarks/results/gate_power.{json,md}

The gate (safekeel.eval.gate) passes a fine-tune only if the one-sided (1 - alpha) upper bound of
harmful(adapter) - harmful(base), paired on the same prompts, is within the margin. Its width depends on the
discordance: the share of prompts on which the two models' verdicts differ. That share is measured here on the
committed replies of every rerun fine-tune (benchmarks/results/replies/) against the aligned base model's replies
to the same harmful prompts (AdvBench test, 156 prompts), under each judge (the refusal classifier as recorded; the
content judge applied again), and turned into the number of prompts a gate needs
(safekeel.eval.stats.paired_gate_sample_size) for an unchanged model to pass with 80% power.
No generation: it reads replies and runs the content judge (seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from safekeel.eval.gate import DEFAULT_ALPHA, DEFAULT_MARGIN, harmful_flags  # noqa: E402
from safekeel.eval.judges import get_judge  # noqa: E402
from safekeel.eval.replies import read_replies  # noqa: E402
from safekeel.eval.stats import paired_gate_sample_size  # noqa: E402

BASE = ("confirm", "aligned-bf7c30998c")
JUDGES = ("classifier", "content")
SETS = ("advbench-test",)


def judged_rows(path: Path, judge: str) -> list[dict]:
    rows = [r for r in read_replies(path) if r["kind"] == "harmful" and r.get("set") in SETS]
    if judge not in rows[0]["judgements"]:
        verdicts = get_judge(judge).judge([r["prompt"] for r in rows], [r["response"] for r in rows])
        for row, verdict in zip(rows, verdicts):
            row["judgements"][judge] = {"refused": verdict.refused, "coherent": verdict.coherent, "content": verdict.content}
    return rows


def discordance(adapter: dict, base: dict) -> tuple[float, int, float]:
    keys = [k for k in adapter if k in base and adapter[k] is not None and base[k] is not None]
    differ = sum(adapter[k] != base[k] for k in keys)
    difference = (sum(adapter[k] for k in keys) - sum(base[k] for k in keys)) / len(keys)
    return differ / len(keys), len(keys), difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replies", type=Path, default=ROOT / "benchmarks" / "results" / "replies")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gate_power")
    args = parser.parse_args()
    base_path = args.replies / BASE[0] / f"{BASE[1]}.jsonl.gz"
    runs = sorted(p for p in args.replies.glob("*/*.jsonl.gz") if p != base_path)
    table = []
    for judge in JUDGES:
        base = harmful_flags(judged_rows(base_path, judge), judge)
        for path in runs:
            d, n, diff = discordance(harmful_flags(judged_rows(path, judge), judge), base)
            table.append({"judge": judge, "run": f"{path.parent.name}/{path.name.removesuffix('.jsonl.gz')}",
                          "n_pairs": n, "discordance": round(d, 4), "difference": round(diff, 4)})
    summary = {}
    for judge in JUDGES:
        values = [row["discordance"] for row in table if row["judge"] == judge]
        typical, worst = statistics.median(values), max(values)
        summary[judge] = {"median_discordance": typical, "max_discordance": worst,
                          "prompts_needed_median": paired_gate_sample_size(typical, DEFAULT_MARGIN, DEFAULT_ALPHA),
                          "prompts_needed_max": paired_gate_sample_size(worst, DEFAULT_MARGIN, DEFAULT_ALPHA)}
    result = {"command": "python benchmarks/gate_power.py", "base": "/".join(BASE), "sets": list(SETS), "margin": DEFAULT_MARGIN,
              "alpha": DEFAULT_ALPHA, "power": 0.8, "true_difference": 0.0, "runs": table, "summary": summary}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# How many prompts the safety gate needs", "",
             f"`{result['command']}`. Discordance: the share of the {', '.join(SETS)} prompts on which a rerun fine-tune's "
             f"verdict differs from the aligned base model's ({result['base']}), per judge. Prompts needed: "
             f"safekeel.eval.stats.paired_gate_sample_size at margin {DEFAULT_MARGIN}, one-sided alpha {DEFAULT_ALPHA}, "
             "power 0.8, for a fine-tune whose true harmful rate equals the base's.", "",
             "| judge | median discordance | max discordance | prompts needed (median) | prompts needed (max) |", "| --- | --- | --- | --- | --- |"]
    for judge, s in summary.items():
        lines.append(f"| {judge} | {s['median_discordance']:.3f} | {s['max_discordance']:.3f} | {s['prompts_needed_median']} | {s['prompts_needed_max']} |")
    lines += ["", "| judge | run | pairs | discordance | difference (adapter - base) |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['judge']} | {r['run']} | {r['n_pairs']} | {r['discordance']:.3f} | {r['difference']:+.3f} |" for r in table]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8 + len(summary)]))


if __name__ == "__main__":
    main()
