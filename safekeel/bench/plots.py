"""The benchmark's plots, drawn from bench_<grid>.json alone into the folder the caller gives: harmful rate vs
k, retention vs utility, over-refusal, the paired differences from random, and the selection features.
matplotlib is imported inside the functions that draw (deferred on purpose: a heavy import the runs never need).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from safekeel.bench.grids import REFERENCE_SELECTOR
from safekeel.bench.selection_features import FEATURES, centred_rates


def _cell_name(cell: dict, first_pool: str | None = None) -> str:
    """The selector, with the mode when it is not replay and the pool when it is not `first_pool`."""
    if cell["mode"] == "none" or cell["selector"] is None:
        return cell["mode"]
    tags = [t for t in (cell["mode"] if cell["mode"] != "replay" else None,
                        cell["pool"] if first_pool is not None and cell["pool"] != first_pool else None) if t]
    return cell["selector"] + (f" ({', '.join(tags)})" if tags else "")


def render_plots(data: dict, folder: Path, stem: str) -> list[Path]:
    """Harmful rate vs k per selector (CI error bars); retention vs utility; over-refusal per selector; each
    selector's per-seed differences from random in harmful rate and over-refusal."""
    import matplotlib  # deferred on purpose: heavy, only drawing needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = data["summary"]
    judges = summary["judges"]
    if not judges:
        return []
    primary, cells, aligned = judges[0], summary["cells"], summary["aligned"]
    outputs = []

    def errors(entry: dict) -> tuple[float, float]:
        if not entry["ci95"] or entry["mean"] is None:
            return (0.0, 0.0)
        return (max(entry["mean"] - entry["ci95"][0], 0.0), max(entry["ci95"][1] - entry["mean"], 0.0))

    panels = sorted({(c["dataset"], c["pool"], c["mode"]) for c in cells if c["selector"] is not None})
    if panels:
        columns = min(3, len(panels))
        rows_n = math.ceil(len(panels) / columns)
        figure, axes = plt.subplots(rows_n, columns, figsize=(5.5 * columns, 4 * rows_n), squeeze=False)
        for ax, (dataset, pool, mode) in zip(axes.flat, panels):
            members = [c for c in cells if (c["dataset"], c["pool"], c["mode"]) == (dataset, pool, mode)]
            for selector in sorted({c["selector"] for c in members}, key=lambda s: (s != REFERENCE_SELECTOR, s)):
                points = sorted((c for c in members if c["selector"] == selector and c["harmful"][primary]["mean"] is not None),
                                key=lambda c: c["k"])
                if points:
                    low, high = zip(*(errors(c["harmful"][primary]) for c in points))
                    ax.errorbar([c["k"] for c in points], [c["harmful"][primary]["mean"] for c in points], yerr=[low, high],
                                marker="o", capsize=3, label=selector, linewidth=2.5 if selector == REFERENCE_SELECTOR else 1.2)
            none = [c for c in cells if c["dataset"] == dataset and c["mode"] == "none"]
            if none and none[0]["harmful"][primary]["mean"] is not None:
                ax.axhline(none[0]["harmful"][primary]["mean"], color="black", linestyle="--", linewidth=1, label="none (k=0)")
            if aligned and aligned["harmful"][primary]["rate"] is not None:
                ax.axhline(aligned["harmful"][primary]["rate"], color="grey", linestyle=":", linewidth=1, label="aligned")
            ax.set_title(f"{dataset} / {pool} / {mode}", fontsize=9)
            ax.set_xticks(sorted({c["k"] for c in members}))
            ax.set_xlabel("k (safety examples)")
            ax.set_ylabel(f"harmful rate ({primary})")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        figure.tight_layout()
        outputs.append(folder / f"{stem}_harm_vs_k.png")
        figure.savefig(outputs[-1], dpi=110)
        plt.close(figure)

    scatter = [c for c in cells if c["mode"] != "none" and c["retention"][primary]["mean"] is not None
               and c["utility_loss"]["mean"] is not None]
    figure, ax = plt.subplots(figsize=(7, 5))
    markers = {"replay": "o", "backdoor": "s", "icl": "^", "ptst": "D"}
    first_pool = (data["grid"].get("pools") or [None])[0]
    names = sorted({_cell_name(c, first_pool) for c in scatter})
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colours = {name: palette(i % palette.N) for i, name in enumerate(names)}
    for c in scatter:
        ax.scatter(c["utility_loss"]["mean"], c["retention"][primary]["mean"], marker=markers.get(c["mode"], "o"),
                   color=colours[_cell_name(c, first_pool)], s=20 + 2 * c["k"], alpha=0.8)
    for name in names:
        ax.scatter([], [], color=colours[name], label=name)
    for mode in sorted({c["mode"] for c in scatter}):
        ax.scatter([], [], color="black", marker=markers.get(mode, "o"), label=f"mode {mode}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.axhline(1, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("held-out loss (lower = more utility)")
    ax.set_ylabel(f"safety retention ({primary})")
    ax.set_title("retention vs utility per cell (marker size grows with k)", fontsize=9)
    if scatter:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no cell with a defined retention yet", ha="center", transform=ax.transAxes)
    figure.tight_layout()
    outputs.append(folder / f"{stem}_retention_utility.png")
    figure.savefig(outputs[-1], dpi=110)
    plt.close(figure)

    datasets = sorted({c["dataset"] for c in cells})
    if datasets:
        bars: dict[str, dict[str, float]] = {}
        for dataset in datasets:
            groups: dict[str, list[float]] = {}
            for c in cells:
                value = c["overrefusal"][primary]["mean"]
                if c["dataset"] == dataset and value is not None:
                    groups.setdefault(_cell_name(c, first_pool), []).append(value)
            references = {"aligned": aligned["overrefusal"][primary]["rate"]} if aligned and aligned["overrefusal"][primary]["rate"] is not None else {}
            references.update({name: statistics.mean(groups.pop(name)) for name in ("none", "ptst") if name in groups})
            bars[dataset] = {**references, **{label: statistics.mean(groups[label]) for label in sorted(groups)}}
        height = 1.2 + 0.3 * max(len(b) for b in bars.values())
        figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), height), squeeze=False)
        for ax, dataset in zip(axes.flat, datasets):
            labels, values = list(bars[dataset])[::-1], list(bars[dataset].values())[::-1]
            ax.barh(labels, values, color=["grey" if label in ("aligned", "none", "ptst") else "tab:blue" for label in labels])
            for y, value in enumerate(values):
                ax.text(value + 0.01, y, f"{value:.2f}", va="center", fontsize=7)
            ax.tick_params(axis="y", labelsize=8)
            ax.set_xlim(0, 1)
            ax.set_xlabel(f"over-refusal ({primary}; mean over k, pools, seeds)")
            ax.set_title(dataset, fontsize=9)
        figure.tight_layout()
        outputs.append(folder / f"{stem}_overrefusal.png")
        figure.savefig(outputs[-1], dpi=110)
        plt.close(figure)

    comparisons = [c for c in summary["comparisons"] if c["judge"] == primary and c["n_pairs"]]
    blocks = sorted({(c["dataset"], c["pool"], c["k"], c["mode"]) for c in comparisons}, key=str)
    if blocks:
        # each seed's paired difference from random, beside the mean and its bootstrap CI: the spread a
        # p-value summarises, and whether a safer selector pays for it in over-refusal
        seeds = sorted({seed for c in comparisons for pairs in c["paired_differences"].values() for seed, _ in pairs})
        seed_colours = {seed: plt.get_cmap("tab10")(i % 10) for i, seed in enumerate(seeds)}
        metrics = (("harmful", "harmful rate", "mean_difference", "difference_ci95"),
                   ("overrefusal", "over-refusal", "overrefusal_difference", "overrefusal_difference_ci95"))
        columns = min(3, len(blocks))
        figure, axes = plt.subplots(2 * math.ceil(len(blocks) / columns), columns, figsize=(6 * columns, 7 * math.ceil(len(blocks) / columns)),
                                    squeeze=False)
        for index, block in enumerate(blocks):
            column, first_row = index % columns, 2 * (index // columns)
            members = [c for c in comparisons if (c["dataset"], c["pool"], c["k"], c["mode"]) == block]
            selectors = [c["selector"] for c in members]
            for row, (metric, label, mean_key, ci_key) in enumerate(metrics):
                ax = axes[first_row + row][column]
                for x, comparison in enumerate(members):
                    for seed, value in comparison["paired_differences"][metric]:
                        ax.scatter(x + 0.3 * (seeds.index(seed) - (len(seeds) - 1) / 2) / len(seeds), value,
                                   color=seed_colours[seed], s=14, zorder=3)
                    mean = comparison[mean_key]
                    if mean is not None:
                        low, high = comparison[ci_key] or (mean, mean)
                        ax.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt="_", color="black", markersize=14, capsize=4, zorder=4)
                ax.axhline(0, color="grey", linewidth=0.8)
                ax.set_xticks(range(len(selectors)))
                ax.set_xticklabels(selectors, rotation=45, ha="right", fontsize=7)
                ax.set_ylabel(f"{label}: selector - random ({primary})", fontsize=8)
                if row == 0:
                    ax.set_title(f"{block[0]} / {block[1]} / k={block[2]} / {block[3]}", fontsize=9)
        for index in range(len(blocks), columns * math.ceil(len(blocks) / columns)):
            for row in (0, 1):
                axes[2 * (index // columns) + row][index % columns].axis("off")
        for seed in seeds:
            axes[0][0].scatter([], [], color=seed_colours[seed], s=14, label=f"seed {seed}")
        axes[0][0].legend(fontsize=6, ncol=2)
        figure.suptitle("paired by training seed (dots); black: mean with bootstrap 95% CI; below 0 = lower than random", fontsize=9)
        figure.tight_layout(rect=(0, 0, 1, 0.97))
        outputs.append(folder / f"{stem}_paired.png")
        figure.savefig(outputs[-1], dpi=110)
        plt.close(figure)
    features = features_plot(data, folder, stem)
    return outputs + ([features] if features else [])


LABELS = {"n_categories": "harm categories covered", "refusal_words": "mean refusal length (words)",
          "request_words": "mean request length (words)"}


def features_plot(data: dict, folder: Path, stem: str) -> Path | None:
    """<stem>_features.png: per block (columns) and feature (rows), each run's seed-centred harmful rate
    against the feature, coloured by selector; None when no run has features."""
    import matplotlib  # deferred on purpose: heavy, only drawing needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judge = data["summary"]["judges"][0] if data["summary"]["judges"] else None
    runs = [r for r in data["runs"] if r.get("selector") is not None and r.get("selection_features")
            and judge and r["harmful"][judge]["rate"] is not None]
    blocks = sorted({(r["dataset"], r["pool"], r["k"], r["mode"]) for r in runs}, key=str)
    if not blocks:
        return None
    selectors = sorted({r["selector"] for r in runs})
    palette = plt.get_cmap("tab10" if len(selectors) <= 10 else "tab20")
    colours = {s: palette(i % palette.N) for i, s in enumerate(selectors)}
    figure, axes = plt.subplots(len(FEATURES), len(blocks), figsize=(4.8 * len(blocks), 3.6 * len(FEATURES)), squeeze=False)
    for column, block in enumerate(blocks):
        points = centred_rates([r for r in runs if (r["dataset"], r["pool"], r["k"], r["mode"]) == block], judge)
        for row, feature in enumerate(FEATURES):
            ax = axes[row][column]
            for selector in selectors:
                chosen = [(r["selection_features"][feature], y) for r, y in points if r["selector"] == selector]
                if chosen:
                    xs, ys = zip(*chosen)
                    ax.scatter(xs, ys, color=colours[selector], s=16, alpha=0.8, label=selector)
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_xlabel(LABELS[feature], fontsize=8)
            ax.set_ylabel(f"harmful rate - seed mean ({judge})", fontsize=8)
            if row == 0:
                ax.set_title(f"{block[0]} / {block[1]} / k={block[2]} / {block[3]}", fontsize=9)
    axes[0][0].legend(fontsize=6, ncol=2)
    figure.suptitle("each dot a run; exploratory: features chosen after the runs were seen", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    path = folder / f"{stem}_features.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
