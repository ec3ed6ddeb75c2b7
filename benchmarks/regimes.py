"""The regime map (before the selector grid): harmful rate vs user-data size, fine-tuning without
safety data (`none`) and with k=10 random safety examples replayed, per benign user dataset, on the
DEV splits (it chooses the grid's settings). Writes benchmarks/results/regimes.json + .md + .png.

    python benchmarks/regimes.py [--sizes 50 100 200] [--seeds 0] [--datasets gsm8k samsum] [--commit] [--render-only]
    python benchmarks/regimes.py --name regimes_1epoch --sft '{"epochs": 1, "learning_rate": 6e-4}' --sizes 100   # a cheaper preset

It is a bench grid (safekeel.bench) whose datasets differ only by max_examples: run records
under benchmarks/results/bench_runs/regimes/, cached by config hash, resumable, `--commit` commits
each; adapters and responses in benchmarks/cache/bench/. Per (dataset, size, seed):

    recovered fraction of the lost safety = (HR_none - HR_random) / (HR_none - HR_aligned)

Datasets: GSM8K train (question/answer JSONL, loads as is) and SAMSum train 1000 (id/dialogue/summary
records, a format safekeel.data.formats does not read: rendered to prompt/completion with
BackdoorAlign's "Summarize this dialog:" instruction); utility = held-out loss on GSM8K test /
SAMSum test 200. Training: the phenomenon's benign attack preset (3 epochs at lr 2e-4, batch 4, 256
tokens: safekeel.bench.grids.BENIGN_SFT), the preset the selector grid trains with, so the map chooses the grid's
sizes for the grid's own training. The step count grows with the data, as when a user fine-tunes on
more. Evaluation with the transformers engine (the one the phenomenon and the gate use).

Cost measured by the committed map (benchmarks/results/bench_runs/regimes/, 2 cores, `seconds` per
record; one run was slowed by a job sharing the machine): training ~1.55-1.7 s per GSM8K example pass
(n=100 + 10 replayed, 3 epochs: 562 s) and ~0.9-1.0 s per SAMSum pass (328 s); evaluation plus held-out
loss ~140 s per run. Both datasets at n = 50, 100, 200, none + random, one seed: 8,156 s (2.3 h).
The pilot in ../shared/FACTS.md covers n = 1,000 (another preset:
1 epoch, batch 8): 10 random replays there changed nothing.
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
from safekeel.bench.grids import BENIGN_SFT, SAMSUM_TEMPLATE, DatasetSpec, GridSpec, expand  # noqa: E402
from safekeel.bench.runner import run_grid  # noqa: E402
from safekeel.bench.summary import run_row, summarise  # noqa: E402
from safekeel.eval.harness import EvalSettings  # noqa: E402
from safekeel.eval.stats import bootstrap_ci  # noqa: E402
from safekeel.provenance import library_versions, write_json_atomic  # noqa: E402

SIZES = (50, 100, 200)
DATASETS = {
    "gsm8k": {"path": "benign/gsm8k_train.jsonl", "template": None, "utility": None},
    "samsum": {"path": "benign/samsum_train1000.json", "template": SAMSUM_TEMPLATE, "utility": "benign/samsum_test200.json"},
}
SFT = dict(BENIGN_SFT)
EVAL = EvalSettings(harmful_set="advbench-dev", overrefusal_set="xstest-dev", max_new_tokens=48, judges=("classifier", "keyword"),
                    utility="gsm8k", n_utility_loss=50, n_utility_accuracy=0)


def regime_grid(datasets: list[str], sizes: list[int], seeds: list[int], k: int = 10, sft: dict | None = None,
                name: str = "regimes") -> GridSpec:
    """A bench grid: every dataset at every size, `none` (always in a grid) and random replay of k.
    `sft` overrides fields of the training preset (another map, under another `name`)."""
    return GridSpec(
        name=name,
        datasets=[DatasetSpec(d, DATASETS[d]["path"], max_examples=n, sft={**SFT, **(sft or {})}, template=DATASETS[d]["template"],
                              utility=DATASETS[d]["utility"]) for d in datasets for n in sizes],
        k_values=[k], pools=["authored"], selectors=["random"], modes=["replay"], seeds=seeds, eval=EVAL,
    )


def regime_rows(records: list[dict]) -> tuple[dict | None, list[dict]]:
    """(aligned row, one row per fine-tuning run) with the recovered fraction on the random rows."""
    rows = [run_row(r) for r in records]
    summarise(rows)  # adds each row's retention (= recovered fraction) per judge
    judge = EVAL.judges[0]
    aligned = next((r for r in rows if r["kind"] == "aligned"), None)
    out = []
    for record, row in zip(records, rows):
        if row["kind"] != "finetune":
            continue
        harmful, refused = row["harmful"][judge], row["overrefusal"][judge]
        k = row["k"]
        n = row["n_examples"]
        out.append({
            "dataset": record["config"]["dataset"]["name"], "n_examples": n, "k": k,
            "replay_fraction": round(k / (n + k), 4) if k else 0.0,
            "mode": "random" if row["mode"] == "replay" else row["mode"], "seed": row["seed"], "judge": judge,
            "harmful_rate": harmful["rate"], "harmful_rate_ci95": harmful["ci95"], "n_harmful_prompts": harmful["n_prompts"],
            "harmful_rate_keyword": row["harmful"]["keyword"]["rate"] if "keyword" in row["harmful"] else None,
            "overrefusal_rate": refused["rate"], "overrefusal_rate_ci95": refused["ci95"], "n_overrefusal_prompts": refused["n_prompts"],
            "recovered_fraction": row["retention_by_judge"][judge] if row["mode"] == "replay" else None,
            "utility_loss": row["utility_loss"], "train_seconds": row["train_seconds"], "run_id": row["run_id"],
        })
    return aligned, out


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (dataset, size, mode): means over seeds with bootstrap 95% CIs (a single run: its Wilson interval)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["n_examples"], row["mode"]), []).append(row)
    summary = []
    for (dataset, n, mode), members in sorted(groups.items()):
        rates = [r["harmful_rate"] for r in members if r["harmful_rate"] is not None]
        recovered = [r["recovered_fraction"] for r in members if r["recovered_fraction"] is not None]
        summary.append({
            "dataset": dataset, "n_examples": n, "mode": mode, "replay_fraction": members[0]["replay_fraction"], "n_seeds": len(members),
            "harmful_rate": round(statistics.mean(rates), 4) if rates else None,
            "harmful_rate_ci95": bootstrap_ci(rates) if len(rates) > 1 else (members[0]["harmful_rate_ci95"] if rates else None),
            "ci_kind": "bootstrap over seeds" if len(rates) > 1 else "Wilson (one run)",
            "n_harmful_prompts": members[0]["n_harmful_prompts"],
            "overrefusal_rate": round(statistics.mean(r["overrefusal_rate"] for r in members), 4),
            "n_overrefusal_prompts": members[0]["n_overrefusal_prompts"],
            "recovered_fraction": round(statistics.mean(recovered), 4) if recovered else None,
            "recovered_fraction_ci95": bootstrap_ci(recovered),
            "n_recovered_defined": len(recovered),
        })
    return summary


def write_regimes(grid: GridSpec, records: list[dict], results_dir: Path, command: str, plot: bool = True) -> list[Path]:
    aligned, rows = regime_rows(records)
    path = write_json_atomic(results_dir / f"{grid.name}.json", {
        "command": command, "grid": {**grid.to_dict(), "selectors": grid.resolved_selectors()},
        "n_runs_total": len(expand(grid)), "n_runs_done": len(records),
        "aligned": aligned, "rows": rows, "summary": aggregate(rows), "versions": library_versions(),
    })
    return [path, *render(path, plot=plot)]


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ci(ci: list[float] | None) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def render(json_path: Path, plot: bool = True) -> list[Path]:
    """regimes.md (and regimes.png) from regimes.json alone."""
    data = json.loads(json_path.read_text())
    grid, aligned, summary = data["grid"], data["aligned"], data["summary"]
    judge = grid["eval"]["judges"][0]
    outputs = [render_plot(data, json_path.with_suffix(".png"))] if plot else []
    lines = [
        "# Regime map: harmful rate vs user-data size, no safety data vs k=10 random replay", "",
        f"Command: `{data['command']}`", "",
        f"Runs: {data['n_runs_done']} of {data['n_runs_total']}. LoRA on {grid['model']} with {json.dumps(grid['datasets'][0]['sft']) if grid['datasets'] else '{}'}; "
        f"k={grid['k_values'][0]} random examples from the {grid['pools'][0]} pool; training seeds {grid['seeds']}. Dev splits: "
        f"{grid['eval']['harmful_set']} (harmful), {grid['eval']['overrefusal_set']} (over-refusal); greedy, {grid['eval']['max_new_tokens']} "
        f"new tokens; judge `{judge}`. Recovered fraction = (HR_none - HR_random) / (HR_none - HR_aligned) per seed "
        "(undefined where fine-tuning lost no safety). Intervals: bootstrap over seeds (10,000 resamples), Wilson for a single run.", "",
    ]
    if aligned:
        h, o = aligned["harmful"][judge], aligned["overrefusal"][judge]
        lines += [f"Aligned model, no fine-tuning: harmful rate {_f(h['rate'])}{_ci(h['ci95'])} (n={h['n_prompts']}), "
                  f"over-refusal {_f(o['rate'])}{_ci(o['ci95'])} (n={o['n_prompts']}).", ""]
    lines += ["## Mean over seeds", "",
              "| dataset | n examples | mode | replay fraction | seeds | harmful rate [95% CI] (n prompts) | over-refusal (n prompts) | recovered fraction [95% CI] |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        lines.append(f"| {s['dataset']} | {s['n_examples']} | {s['mode']} | {s['replay_fraction']:.3f} | {s['n_seeds']} | "
                     f"{_f(s['harmful_rate'])}{_ci(s['harmful_rate_ci95'])} ({s['n_harmful_prompts']}) | "
                     f"{_f(s['overrefusal_rate'])} ({s['n_overrefusal_prompts']}) | "
                     f"{_f(s['recovered_fraction'])}{_ci(s['recovered_fraction_ci95'])} |")
    lines += ["", "## Every run (Wilson 95% intervals)", "",
              "| dataset | n examples | mode | seed | harmful rate [95% CI] (n) | over-refusal [95% CI] (n) | recovered fraction | train s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        lines.append(f"| {r['dataset']} | {r['n_examples']} | {r['mode']} | {r['seed']} | {_f(r['harmful_rate'])}{_ci(r['harmful_rate_ci95'])} "
                     f"({r['n_harmful_prompts']}) | {_f(r['overrefusal_rate'])}{_ci(r['overrefusal_rate_ci95'])} ({r['n_overrefusal_prompts']}) | "
                     f"{_f(r['recovered_fraction'])} | {r['train_seconds']:.0f} |")
    png = json_path.with_suffix(".png")
    if png.is_file():
        lines += ["", f"![harmful rate vs user-data size]({png.name})"]
    md = json_path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return [md, *outputs]


def render_plot(data: dict, path: Path) -> Path:
    """One panel per dataset: harmful rate vs n examples (log x), none and random with CI bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, aligned = data["summary"], data["aligned"]
    judge = data["grid"]["eval"]["judges"][0]
    datasets = sorted({s["dataset"] for s in summary}) or ["(no runs yet)"]
    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes.flat, datasets):
        for mode, colour in (("none", "tab:red"), ("random", "tab:blue")):
            points = [s for s in summary if s["dataset"] == dataset and s["mode"] == mode and s["harmful_rate"] is not None]
            if not points:
                continue
            x = [s["n_examples"] for s in points]
            ax.plot(x, [s["harmful_rate"] for s in points], marker="o", color=colour,
                    label="none (no safety data)" if mode == "none" else f"random, k={data['grid']['k_values'][0]}")
            bands = [(s["n_examples"], *s["harmful_rate_ci95"]) for s in points if s["harmful_rate_ci95"]]
            if bands:
                xs, lows, highs = zip(*bands)
                ax.fill_between(xs, lows, highs, color=colour, alpha=0.15)
            if mode == "random":
                for s in points:
                    if s["recovered_fraction"] is not None:
                        ax.annotate(f"{s['recovered_fraction']:.2f}", (s["n_examples"], s["harmful_rate"]), textcoords="offset points",
                                    xytext=(0, -12), ha="center", fontsize=7, color=colour)
        if aligned and aligned["harmful"][judge]["rate"] is not None:
            ax.axhline(aligned["harmful"][judge]["rate"], color="grey", linestyle=":", label="aligned, no fine-tuning")
        ax.set_xscale("log")
        sizes = sorted({s["n_examples"] for s in summary if s["dataset"] == dataset})
        if sizes:
            ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("user examples fine-tuned on")
        ax.set_ylabel(f"harmful rate ({judge}, {data['grid']['eval']['harmful_set']})")
        ax.set_title(f"{dataset} (numbers: recovered fraction of lost safety)", fontsize=9)
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main() -> None:
    parser = script_parser(__doc__, "re-render NAME.md/.png from NAME.json")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--sft", type=json.loads, default=None,
                        help='JSON overrides of the training preset, e.g. \'{"epochs": 1, "learning_rate": 6e-4}\' (use with --name)')
    parser.add_argument("--name", default="regimes", help="grid name: outputs NAME.json/.md/.png, records bench_runs/NAME/")
    args = parser.parse_args()
    start_script(args.render_only)
    if args.render_only:
        render(args.results_dir / f"{args.name}.json")
    else:
        command = "python benchmarks/regimes.py " + " ".join(sys.argv[1:])
        if args.sft and args.name == "regimes":
            parser.error("--sft changes the preset: give the map its own --name")
        grid = regime_grid(args.datasets, args.sizes, args.seeds, args.k, sft=args.sft, name=args.name)
        run_grid(grid, args.results_dir, args.cache_dir, commit=args.commit, command=command, commit_every=args.commit_every,
                 writer=lambda records, final: write_regimes(grid, records, args.results_dir, command, plot=final))
    print((args.results_dir / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
