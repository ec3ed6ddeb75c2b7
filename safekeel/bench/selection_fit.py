"""Selection methods found from the committed grids' (selection, outcome) pairs: the universal ranking and the
learned outcome model (safekeel.selectors.universal, safekeel.selectors.learned), and how well the model predicts
on datasets it did not see.

The rows are the replay runs of every grid under <results_dir>/bench_runs/ (a run shared by two grids counts
once) from the authored pool, replayed plain, whose selected ids are all pool examples. The outcome columns are
configurable: the judge (`judge`, default the classifier the committed records were judged with; point
`results_dir` at `safekeel rejudge --out DIR`'s folder to fit on rejudged rates) and the metric names. A run's
block is everything but its selection: (dataset with its training preset, k, seed, evaluation); outcomes are
centred on their block's mean, and blocks with a single run are left out (they say nothing about selection).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.stats import spearmanr

from safekeel.bench.grids import DatasetSpec
from safekeel.bench.runner import prepare_dataset
from safekeel.data.conversation import SafetyExample
from safekeel.data.formats import load_conversations
from safekeel.models.registry import base_model_provenance
from safekeel.provenance import sha256_json
from safekeel.selectors.base import SelectionContext
from safekeel.selectors.learned import SET_FEATURES, OutcomeModel, PoolTable, pool_losses, pool_table, set_features
from safekeel.selectors.model_aware import round_robin

log = logging.getLogger(__name__)

DEV_DATASETS = ("pure_bad_10", "gsm8k_random100", "samsum-100", "identity_shift_aoa")
"""The user datasets of the committed grids: what `universal` is found on and `learned` is fitted on. The
selection_v2 grid's held-out datasets (sqlgen-100, alpaca_safety-100) must never be among them."""


def outcome_rows(results_dir: str | Path, pool: Sequence[SafetyExample], judge: str = "classifier",
                 harmful_metric: str = "harmful", overrefusal_metric: str = "refused",
                 datasets: Sequence[str] | None = DEV_DATASETS) -> list[dict]:
    """One row per usable run: run_id, dataset (label), dataset_config, k, seed, selector, ids, harmful, overrefusal,
    block, and the block-centred harmful_centred / overrefusal_centred."""
    in_pool = {e.id for e in pool}
    rows: dict[str, dict] = {}
    skipped: dict[str, int] = defaultdict(int)
    for path in sorted(Path(results_dir).glob("bench_runs/*/*.json")):
        record = json.loads(path.read_text())
        config = record.get("config") or {}
        if config.get("kind") != "finetune" or config.get("mode") != "replay" or record["run_id"] in rows:
            continue
        label = DatasetSpec(**config["dataset"]).label
        ids = record.get("selected_ids") or []
        if config.get("pool") != "authored" or config.get("replay_format", "plain") != "plain" or not ids \
                or any(i not in in_pool for i in ids):
            skipped["not a plain replay of authored pool examples"] += 1
            continue
        if datasets is not None and label not in datasets:
            skipped[f"dataset {label} not among {list(datasets)}"] += 1
            continue
        harmful = record["report"]["harmful"].get(judge, {}).get(harmful_metric, {}).get("rate")
        over = record["report"]["overrefusal"].get(judge, {}).get(overrefusal_metric, {}).get("rate")
        if harmful is None or over is None:
            skipped[f"no {judge} {harmful_metric}/{overrefusal_metric} rate"] += 1
            continue
        rows[record["run_id"]] = {
            "run_id": record["run_id"], "grid": path.parent.name, "dataset": label, "dataset_config": config["dataset"],
            "k": config["k"], "seed": config["seed"], "selector": config["selector"], "ids": list(ids),
            "harmful": float(harmful), "overrefusal": float(over),
            "block": sha256_json([config["dataset"], config["k"], config["seed"], config["eval"]])[:16]}
    blocks: dict[str, list[dict]] = defaultdict(list)
    for row in rows.values():
        blocks[row["block"]].append(row)
    out = []
    for members in blocks.values():
        if len(members) < 2:
            skipped["alone in its block"] += len(members)
            continue
        harmful_mean = float(np.mean([r["harmful"] for r in members]))
        over_mean = float(np.mean([r["overrefusal"] for r in members]))
        for row in members:
            out.append({**row, "harmful_centred": row["harmful"] - harmful_mean, "overrefusal_centred": row["overrefusal"] - over_mean})
    if skipped:
        log.info("runs left out: %s", dict(skipped))
    return sorted(out, key=lambda r: r["run_id"])


def outcomes_digest(rows: Sequence[dict], **settings) -> str:
    """Hash of the training data: each run's id, selection and raw outcomes, and the settings that read them."""
    return sha256_json({"rows": [[r["run_id"], r["ids"], r["harmful"], r["overrefusal"]] for r in rows], **settings})


# --------------------------------------------------------------------------------------------- universal


def universal_ranking(rows: Sequence[dict], pool: Sequence[SafetyExample], overrefusal_weight: float = 1.0,
                      prior_runs: float = 5.0) -> list[dict]:
    """Every pool example with its credit: sum over the runs that replayed it of (harmful_centred + overrefusal_weight
    x overrefusal_centred), divided by (its number of runs + prior_runs) (shrunk towards 0, the block mean, when
    seen rarely); ordered by harm category in turn (categories by their best credit, lowest first)."""
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for row in rows:
        outcome = row["harmful_centred"] + overrefusal_weight * row["overrefusal_centred"]
        for example_id in row["ids"]:
            total[example_id] += outcome
            count[example_id] += 1
    credit = np.array([total[e.id] / (count[e.id] + prior_runs) for e in pool])
    order = round_robin(credit, [e.category for e in pool], len(pool))
    return [{"id": pool[i].id, "category": pool[i].category, "credit": round(float(credit[i]), 6), "n_runs": count[pool[i].id]}
            for i in order]


# --------------------------------------------------------------------------------------------- learned


def dataset_tables(rows: Sequence[dict], pool: Sequence[SafetyExample], model: str, cache_dir: str | Path) -> dict[str, PoolTable]:
    """Per dataset label: the pool's feature table against that dataset's user data (as a job on it would see it),
    the base model's pool losses read from (or computed into) cache_dir/selection."""
    provenance = base_model_provenance(model)
    shared: dict = {}
    tables = {}
    for label, config in sorted({r["dataset"]: r["dataset_config"] for r in rows}.items()):
        dataset = DatasetSpec(**config)
        users = load_conversations(prepare_dataset(dataset.path, dataset.template, Path(cache_dir))).conversations
        context = SelectionContext(list(pool), users[: dataset.max_examples] if dataset.max_examples else users, 1, 0,
                                   model_name=model, store=Path(cache_dir) / "selection",
                                   model_fingerprint=sha256_json(provenance) if provenance else None)
        context.cache.update(shared)  # the pool's embeddings and the loaded model, once for every dataset
        losses, read = pool_losses(context, "the learned selection fit")
        log.info("%s: base-model pool losses %s", label, "read from the store" if read else "computed")
        tables[label] = pool_table(context, losses)
        shared = {k: v for k, v in context.cache.items() if k == "pool_embeddings" or k.startswith("model:")}
    return tables


def design(rows: Sequence[dict], tables: dict[str, PoolTable], pool: Sequence[SafetyExample]) -> np.ndarray:
    index = {e.id: i for i, e in enumerate(pool)}
    return np.array([set_features(tables[r["dataset"]], [index[i] for i in r["ids"]]) for r in rows])


def fit_ridge(x: np.ndarray, outcomes: dict[str, np.ndarray], ridge_lambda: float, overrefusal_weight: float,
              meta: dict | None = None) -> OutcomeModel:
    """Ridge on standardised features (penalty ridge_lambda x n, so it does not shrink with more runs)."""
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (x - mean) / scale
    gram = z.T @ z + ridge_lambda * len(z) * np.eye(z.shape[1])
    weights = {name: np.linalg.solve(gram, z.T @ y) for name, y in outcomes.items()}
    return OutcomeModel(list(SET_FEATURES), mean, scale, x.min(axis=0), x.max(axis=0), weights, overrefusal_weight, meta or {})


def targets(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    return {"harmful": np.array([r["harmful_centred"] for r in rows]),
            "overrefusal": np.array([r["overrefusal_centred"] for r in rows])}


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return round(float(spearmanr(a, b).statistic), 4)


def leave_one_dataset_out(rows: Sequence[dict], x: np.ndarray, ridge_lambda: float, overrefusal_weight: float) -> list[dict]:
    """Per dataset: fit on the others, predict its runs. Spearman correlation of predicted and observed centred
    outcome per target; RMSE relative to predicting the block mean (1.0: no better); and the choice it would make:
    per block, the observed outcome of the run it predicts best minus the block's mean (negative: it picks better
    than the average selection tried), beside the best possible choice (the oracle)."""
    out = []
    datasets = sorted({r["dataset"] for r in rows})
    for held_out in datasets:
        train = [i for i, r in enumerate(rows) if r["dataset"] != held_out]
        test = [i for i, r in enumerate(rows) if r["dataset"] == held_out]
        if not train or not test:
            continue
        model = fit_ridge(x[train], targets([rows[i] for i in train]), ridge_lambda, overrefusal_weight)
        predicted = model.predict(x[test])
        observed = targets([rows[i] for i in test])
        entry: dict = {"held_out": held_out, "n_train": len(train), "n_test": len(test)}
        for target in ("harmful", "overrefusal"):
            rmse = float(np.sqrt(np.mean((predicted[target] - observed[target]) ** 2)))
            baseline = float(np.sqrt(np.mean(observed[target] ** 2)))
            entry[target] = {"spearman": _spearman(predicted[target], observed[target]),
                             "rmse_vs_block_mean": round(rmse / baseline, 4) if baseline > 0 else None}
        objective = predicted["harmful"] + overrefusal_weight * predicted["overrefusal"]
        blocks: dict[str, list[int]] = defaultdict(list)
        for position, i in enumerate(test):
            blocks[rows[i]["block"]].append(position)
        picks = {"harmful": [], "overrefusal": [], "harm_only_harmful": [], "oracle_harmful": []}
        for members in blocks.values():
            best = min(members, key=lambda p: objective[p])
            picks["harmful"].append(observed["harmful"][best])
            picks["overrefusal"].append(observed["overrefusal"][best])
            picks["harm_only_harmful"].append(observed["harmful"][min(members, key=lambda p: predicted["harmful"][p])])
            picks["oracle_harmful"].append(min(observed["harmful"][p] for p in members))
        entry["choice"] = {"n_blocks": len(blocks), **{f"{name}_vs_block_mean": round(float(np.mean(v)), 4) for name, v in picks.items()}}
        out.append(entry)
    return out


def format_validation(lodo: Sequence[dict]) -> str:
    lines = ["held-out dataset      runs  harm rho  harm rmse  over rho  over rmse  blocks  chosen harm  chosen over"
             "  harm-only chosen harm  oracle harm"]
    for e in lodo:
        h, o, c = e["harmful"], e["overrefusal"], e["choice"]
        lines.append(f"{e['held_out']:<20} {e['n_test']:>5}  {_fmt(h['spearman'])}  {_fmt(h['rmse_vs_block_mean'])}   "
                     f"{_fmt(o['spearman'])}  {_fmt(o['rmse_vs_block_mean'])}   {c['n_blocks']:>5}  {c['harmful_vs_block_mean']:>+10.4f}  "
                     f"{c['overrefusal_vs_block_mean']:>+10.4f}  {c['harm_only_harmful_vs_block_mean']:>+20.4f}  "
                     f"{c['oracle_harmful_vs_block_mean']:>+10.4f}")
    lines.append("(rho: Spearman of predicted and observed block-centred outcome; rmse: relative to predicting the block mean; "
                 "chosen: the observed outcome, minus its block's mean, of the run the model ranks best by harmful + weight x "
                 "over-refusal, or by harmful alone; oracle: the best run of each block)")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return f"{value:>8.3f}" if value is not None else "     n/a"
