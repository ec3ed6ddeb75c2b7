"""The control of the modes grid's `backdoor` cells: is BackdoorAlign's trigger learned, or does serving
under a random-string system prompt move the harmful rate by itself?

    python benchmarks/backdoor_control.py [--commit] [--render-only] [--seeds 3 4]

In the modes grid (benchmarks/results/modes.md) a backdoor run is trained with the k safety examples under
the seed's secret system prompt (safekeel.training.mixing.backdoor_prefix) and served under it; its
references (`none`, `replay`) are served without it. Two things change at once. This control serves the
models that never saw the secret under it, per training seed, with the modes grid's datasets, presets and
evaluation:

- `none` + secret: the modes grid's `none` adapter (same training configuration, so the adapter cache
  shares it) served under the seed's secret;
- aligned + secret: the aligned organism served under each seed's secret.

Paired by seed (classifier judge, the grids' primary), per dataset: none + secret - none (what the prompt
alone does to the fine-tuned model); backdoor - (none + secret), per pool (what backdoor training adds
when both are served alike: the trigger's own effect); and aligned + secret against the aligned model.
Records: benchmarks/results/bench_runs/backdoor_control/ (resumable, committed with --commit); the modes
grid's records are read from bench_runs/modes/; outputs benchmarks/results/backdoor_control.{json,md}.
Cost: 24 evaluations (6 seeds x (3 datasets + aligned)), about 2-3 min each on 2 cores where the `none`
adapters are cached (the modes grid's icl and ptst runs train them), about 3 min more each where not.
`--seeds` runs some seeds' evaluations only (the same records): run a seed on the machine that just ran the
modes grid's runs of that seed, and its adapters are cache hits; the outputs analyse every record there is.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safekeel.bench.cli import script_parser, start_script  # noqa: E402
from safekeel.bench.grids import GridSpec, aligned_config, modes_grid, run_config  # noqa: E402
from safekeel.bench.runner import run_grid  # noqa: E402
from safekeel.bench.summary import paired_comparison, run_row  # noqa: E402
from safekeel.eval.stats import bootstrap_ci  # noqa: E402
from safekeel.provenance import library_versions, write_json_atomic  # noqa: E402
from safekeel.guard import build_guard  # noqa: E402
from safekeel.training.mixing import backdoor_prefix  # noqa: E402

NAME = "backdoor_control"


def control_grid() -> GridSpec:
    """The modes grid under this control's name (its datasets, seeds, presets and evaluation)."""
    grid = modes_grid()
    grid.name = grid.output = NAME
    return grid


def secret_prompt(seed: int, system_prompt: str | None) -> str:
    """The system prompt a backdoor run of this seed is served with (the mode's own rule)."""
    return build_guard("backdoor", secret=backdoor_prefix(seed)).system_text(system_prompt)


def control_configs(grid: GridSpec | None = None) -> list[dict]:
    """Per seed: the aligned model, then each dataset's `none` run, served under the seed's secret. The
    aligned configurations carry the seed (their secret's) so they pair with the runs of that seed."""
    grid = grid or control_grid()
    configs = []
    for seed in grid.seeds:
        aligned = aligned_config(grid)
        aligned["eval"]["system_prompt"] = secret_prompt(seed, aligned["eval"]["system_prompt"])
        configs.append({**aligned, "seed": seed})
        for dataset in grid.datasets:
            config = run_config(grid, dataset, "none", seed)
            config["eval"]["system_prompt"] = secret_prompt(seed, config["eval"]["system_prompt"])
            configs.append(config)
    return configs


def _load(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def analyse(control_records: list[dict], modes_records: list[dict], judge: str = "classifier") -> dict:
    """Rows (per seed and condition) and the paired comparisons of the module docstring."""
    control = [run_row(r) for r in control_records]
    modes = [run_row(r) for r in modes_records]
    aligned_plain = next((r for r in modes if r["kind"] == "aligned" and not r["eval_overrides"]), None)
    conditions: dict[tuple[str, str], list[dict]] = {}
    for row in control:
        conditions.setdefault((row["dataset"] or "aligned", "none + secret" if row["kind"] == "finetune" else "aligned + secret"),
                              []).append(row)
    for row in modes:
        if row["kind"] != "finetune" or row["k"] not in (0, 10):
            continue
        if row["mode"] == "none":
            conditions.setdefault((row["dataset"], "none"), []).append(row)
        elif row["mode"] in ("backdoor", "replay") and row["selector"] == "random":
            conditions.setdefault((row["dataset"], f"{row['mode']} {row['pool']}"), []).append(row)
    datasets = list(dict.fromkeys(d for d, c in conditions if d != "aligned"))
    comparisons = []
    for dataset in datasets:
        pairs = [("none + secret", "none", "the secret prompt alone, on the fine-tuned model")]
        pairs += [(c, "none + secret", "backdoor training, both served under the secret")
                  for d, c in conditions if d == dataset and c.startswith("backdoor ")]
        pairs += [(c, "none", "the modes grid's comparison with no fine-tuning safety data")
                  for d, c in conditions if d == dataset and c.startswith("backdoor ")]
        for member, reference, meaning in pairs:
            if (dataset, member) in conditions and (dataset, reference) in conditions:
                comparisons.append({"dataset": dataset, "condition": member, "reference": reference, "meaning": meaning,
                                    "judge": judge, **paired_comparison(conditions[(dataset, member)], conditions[(dataset, reference)], judge)})
    cells = []
    for (dataset, condition), members in conditions.items():
        rates = [r["harmful"][judge]["rate"] for r in members if r["harmful"][judge]["rate"] is not None]
        refusals = [r["overrefusal"][judge]["rate"] for r in members if r["overrefusal"][judge]["rate"] is not None]
        cells.append({"dataset": dataset, "condition": condition, "seeds": sorted(r["seed"] for r in members),
                      "harmful_rate": round(statistics.mean(rates), 4) if rates else None, "harmful_ci95": bootstrap_ci(rates),
                      "overrefusal_rate": round(statistics.mean(refusals), 4) if refusals else None,
                      "overrefusal_ci95": bootstrap_ci(refusals),
                      "n_prompts": sorted({r["harmful"][judge]["n_prompts"] for r in members})})
    aligned_shift = None
    if aligned_plain and ("aligned", "aligned + secret") in conditions:
        base = aligned_plain["harmful"][judge]["rate"]
        diffs = [r["harmful"][judge]["rate"] - base for r in conditions[("aligned", "aligned + secret")]]
        aligned_shift = {"aligned_rate": base, "mean_difference": round(statistics.mean(diffs), 4),
                         "difference_ci95": bootstrap_ci(diffs), "n_secrets": len(diffs), "n_prompts": aligned_plain["harmful"][judge]["n_prompts"]}
    return {"judge": judge, "cells": cells, "comparisons": comparisons, "aligned_under_secret": aligned_shift,
            "rows": [{k: r[k] for k in ("run_id", "kind", "dataset", "mode", "pool", "seed", "harmful", "overrefusal", "utility_loss")}
                     for r in control]}


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ci(ci) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _signed(value: float | None, ci) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def render(json_path: Path) -> Path:
    data = json.loads(json_path.read_text())
    summary = data["summary"]
    lines = ["# Backdoor control: the secret prompt without the backdoor training", "",
             f"Command: `{data['command']}`", "",
             f"Control runs: {data['n_runs_done']} of {data['n_runs_total']}; the backdoor, replay and none runs are the modes "
             f"grid's ({data['n_modes_records']} records read from bench_runs/modes/). Judge `{summary['judge']}`, AdvBench test "
             "(harmful rate) and XSTest safe test half (over-refusal); means over training seeds with bootstrap 95% intervals; "
             "differences paired by seed, two-sided Wilcoxon signed-rank (no correction across this table).", ""]
    shift = summary["aligned_under_secret"]
    if shift:
        lines += [f"Aligned organism: {_f(shift['aligned_rate'])} harmful on {shift['n_prompts']} prompts as served in the grids; "
                  f"under the {shift['n_secrets']} seeds' secrets the difference is {_signed(shift['mean_difference'], shift['difference_ci95'])}.", ""]
    lines += ["## Conditions", "", "| dataset | condition | seeds | harmful rate [95% CI] | over-refusal [95% CI] | n prompts |",
              "| --- | --- | --- | --- | --- | --- |"]
    for c in sorted(summary["cells"], key=lambda c: (c["dataset"], c["condition"])):
        lines.append(f"| {c['dataset']} | {c['condition']} | {len(c['seeds'])} | {_f(c['harmful_rate'])}{_ci(c['harmful_ci95'])} | "
                     f"{_f(c['overrefusal_rate'])}{_ci(c['overrefusal_ci95'])} | {', '.join(map(str, c['n_prompts']))} |")
    lines += ["", "## Paired by seed", "",
              "| dataset | condition | reference | what it measures | pairs | harmful difference [95% CI] | Wilcoxon p | over-refusal difference |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in summary["comparisons"]:
        p = c["wilcoxon"].get("p_value")
        lines.append(f"| {c['dataset']} | {c['condition']} | {c['reference']} | {c['meaning']} | {c['n_pairs']} | "
                     f"{_signed(c['mean_difference'], c['difference_ci95'])} | {'n/a' if p is None else f'{p:.3g}'} | "
                     f"{_signed(c['overrefusal_difference'], c['overrefusal_difference_ci95'])} |")
    md = json_path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return md


def write(records: list[dict], results_dir: Path, command: str, n_total: int) -> list[Path]:
    modes_records = _load(results_dir / "bench_runs" / "modes")
    path = write_json_atomic(results_dir / f"{NAME}.json", {
        "command": command, "grid": control_grid().to_dict(), "n_runs_total": n_total, "n_runs_done": len(records),
        "n_modes_records": len(modes_records), "summary": analyse(records, modes_records), "versions": library_versions(),
    })
    return [path, render(path)]


def main() -> None:
    parser = script_parser(__doc__, "re-analyse the committed records and re-render (no run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run only these training seeds' evaluations (the same records as the full control: run "
                             "a seed where its `none` adapter is cached, i.e. after the modes grid's runs of that seed)")
    args = parser.parse_args()
    command = "python benchmarks/backdoor_control.py " + " ".join(sys.argv[1:])
    configs = control_configs()
    runs_dir = args.results_dir / "bench_runs" / NAME
    if args.seeds is not None:
        seeds = sorted({c["seed"] for c in configs})
        unknown = sorted(set(args.seeds) - set(seeds))
        if unknown:
            parser.error(f"--seeds {unknown}: the control's seeds are {seeds}")
    start_script(args.render_only)
    if args.render_only:
        write(_load(runs_dir), args.results_dir, command, len(configs))
    else:  # the outputs always analyse every record there is, whichever seeds this invocation runs
        run_grid(control_grid(), args.results_dir, args.cache_dir, commit=args.commit, command=command,
                 commit_every=args.commit_every, configs=[c for c in configs if args.seeds is None or c["seed"] in args.seeds],
                 writer=lambda records, final: write(_load(runs_dir), args.results_dir, command, len(configs)))
    print((args.results_dir / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
