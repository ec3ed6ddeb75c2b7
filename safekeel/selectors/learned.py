"""Learned selection: a model of a selection's outcome, fitted on the committed grids, chooses the k examples.

The benchmark grids hold hundreds of (selection, outcome) pairs: runs that replayed different sets of safety
examples on the same user data with the same training seed. Within such a block (dataset, k, seed, evaluation,
training preset) the sets differ and everything else is shared, so a run's harmful rate (and over-refusal) minus
its block's mean is what its selection did. A ridge regression predicts these two centred outcomes from features
of the selected set (SET_FEATURES), each the mean over the chosen examples unless said otherwise:

- `share_<category>`: the share of the set in each of the 11 HEx-PHI harm categories;
- `category_coverage`: distinct categories / min(k, 11);
- `refusal_words`, `request_words`: lengths in words; `explain_share`: the share of refusals with a reason;
- `base_loss_z`: the base model's loss on the example's refusal (mean NLL per assistant token, z-scored within
  the pool; the same stored `pool-loss` the `forgetting` selector computes);
- `user_relevance`: cosine similarity of the request to the user data (safekeel.selectors.representation);
- `within_similarity`: mean pairwise cosine similarity of the chosen requests (0 for k = 1).

`learned` picks the set that minimises predicted harmful rate + overrefusal_weight x predicted over-refusal: the
best of N_CANDIDATES seeded random sets, improved by swaps (each position, every other pool example) until a
pass changes nothing or MAX_PASSES passes. Features are clipped to the range seen in training before predicting,
so the search cannot win by extrapolating. The model ships as assets/learned_selection.json (weights,
standardisation, the clip range, the training data's hash, the leave-one-dataset-out validation);
`python benchmarks/learned_selection.py` refits it (safekeel.bench.selection_fit), on another judge's outcomes
too (`--judge`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from safekeel.data.safety import HARM_CATEGORIES
from safekeel.models.lora import LoraSFTConfig
from safekeel.selectors.base import Selection, SelectionContext, register_selector
from safekeel.selectors.model_aware import assistant_losses, base_model
from safekeel.selectors.representation import pool_embeddings, user_relevance

ASSET = "learned_selection.json"
SET_FEATURES = ([f"share_{c}" for c in HARM_CATEGORIES]
                + ["category_coverage", "refusal_words", "request_words", "explain_share", "base_loss_z", "user_relevance",
                   "within_similarity"])
N_CANDIDATES = 256
MAX_PASSES = 3


@dataclass
class PoolTable:
    """Per pool example, what the set features are made of (rows in pool order)."""

    categories: np.ndarray
    """(n, 11) one-hot over HARM_CATEGORIES (all zeros for another category)."""
    refusal_words: np.ndarray
    request_words: np.ndarray
    explain: np.ndarray
    loss_z: np.ndarray
    relevance: np.ndarray
    embeddings: np.ndarray


def pool_losses(context: SelectionContext, who: str) -> tuple[np.ndarray, bool]:
    """The base model's mean assistant-token NLL on each pool example's refusal, stored as `forgetting` stores it
    (the same name and parameters: one computation serves both). Returns (losses, whether they were read)."""
    max_length = LoraSFTConfig.max_length

    def compute() -> dict[str, np.ndarray]:
        model, tokenizer = base_model(context, who)
        return {"loss": assistant_losses(model, tokenizer, [e.to_conversation() for e in context.pool], max_length=max_length)}

    stored, read = context.persisted("pool-loss", compute, uses_user=False, max_length=max_length)
    return stored["loss"], read


def pool_table(context: SelectionContext, losses: np.ndarray) -> PoolTable:
    pool = context.pool
    index = {c: i for i, c in enumerate(HARM_CATEGORIES)}
    categories = np.zeros((len(pool), len(HARM_CATEGORIES)))
    for row, example in enumerate(pool):
        if example.category in index:
            categories[row, index[example.category]] = 1.0
    losses = np.asarray(losses, dtype=np.float64)
    spread = losses.std()
    return PoolTable(categories, np.array([len(e.refusal.split()) for e in pool], dtype=np.float64),
                     np.array([len(e.request.split()) for e in pool], dtype=np.float64),
                     np.array([e.style == "explain" for e in pool], dtype=np.float64),
                     (losses - losses.mean()) / spread if spread > 0 else np.zeros_like(losses),
                     np.asarray(user_relevance(context), dtype=np.float64),
                     np.asarray(pool_embeddings(context), dtype=np.float64))


def set_features(table: PoolTable, chosen: list[int] | np.ndarray) -> np.ndarray:
    """The SET_FEATURES vector of the examples at `chosen` (pool indices)."""
    chosen = np.asarray(chosen, dtype=int)
    k = len(chosen)
    shares = table.categories[chosen].mean(axis=0)
    coverage = float((table.categories[chosen].sum(axis=0) > 0).sum()) / min(k, len(HARM_CATEGORIES))
    if k > 1:
        vectors = table.embeddings[chosen]
        gram = vectors @ vectors.T
        within = (gram.sum() - np.trace(gram)) / (k * (k - 1))
    else:
        within = 0.0
    return np.concatenate([shares, [coverage, table.refusal_words[chosen].mean(), table.request_words[chosen].mean(),
                                    table.explain[chosen].mean(), table.loss_z[chosen].mean(), table.relevance[chosen].mean(),
                                    within]])


@dataclass
class OutcomeModel:
    """Ridge regressions of the centred harmful rate and over-refusal on standardised, clipped set features."""

    features: list[str]
    mean: np.ndarray
    scale: np.ndarray
    low: np.ndarray
    high: np.ndarray
    weights: dict[str, np.ndarray]
    """Per target ('harmful', 'overrefusal'): one weight per feature (the targets are centred: no intercept)."""
    overrefusal_weight: float
    meta: dict

    def predict(self, features: np.ndarray) -> dict[str, np.ndarray]:
        x = np.clip(np.atleast_2d(features), self.low, self.high)
        z = (x - self.mean) / self.scale
        return {target: z @ w for target, w in self.weights.items()}

    def objective(self, features: np.ndarray) -> np.ndarray:
        predicted = self.predict(features)
        return predicted["harmful"] + self.overrefusal_weight * predicted["overrefusal"]

    def to_dict(self) -> dict:
        return {"features": list(self.features), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "clip_low": self.low.tolist(), "clip_high": self.high.tolist(),
                "weights": {t: w.tolist() for t, w in self.weights.items()},
                "overrefusal_weight": self.overrefusal_weight, **self.meta}

    @classmethod
    def from_dict(cls, data: dict) -> "OutcomeModel":
        if data.get("features") != SET_FEATURES:
            raise ValueError(f"the learned selection model's features {data.get('features')} are not this code's {SET_FEATURES}: "
                             "refit it (python benchmarks/learned_selection.py)")
        known = {"features", "mean", "scale", "clip_low", "clip_high", "weights", "overrefusal_weight"}
        return cls(list(data["features"]), np.array(data["mean"]), np.array(data["scale"]), np.array(data["clip_low"]),
                   np.array(data["clip_high"]), {t: np.array(w) for t, w in data["weights"].items()},
                   float(data["overrefusal_weight"]), {k: v for k, v in data.items() if k not in known})


def asset_path() -> Path:
    return Path(str(resources.files("safekeel.selectors") / "assets" / ASSET))


@lru_cache(maxsize=4)
def load_model(path: str | None = None) -> OutcomeModel:
    """The shipped model (or one at `path`)."""
    source = Path(path) if path else asset_path()
    if not source.is_file():
        raise FileNotFoundError(f"no learned selection model at {source}: fit one with python benchmarks/learned_selection.py")
    return OutcomeModel.from_dict(json.loads(source.read_text()))


def swap_features(table: PoolTable, current: list[int], position: int) -> tuple[np.ndarray, np.ndarray]:
    """(candidates, features): the SET_FEATURES of `current` with its element at `position` replaced by each pool
    example outside `current`, computed for all candidates at once (equal to set_features of each swapped set)."""
    k, n = len(current), len(table.refusal_words)
    outside = np.setdiff1d(np.arange(n), current)
    rest = [c for i, c in enumerate(current) if i != position]
    counts = table.categories[rest].sum(axis=0)[None, :] + table.categories[outside]
    columns = [counts / k, ((counts > 0).sum(axis=1) / min(k, len(HARM_CATEGORIES)))[:, None]]
    for values in (table.refusal_words, table.request_words, table.explain, table.loss_z, table.relevance):
        columns.append(((values[rest].sum() + values[outside]) / k)[:, None])
    if k > 1:
        vectors = table.embeddings[rest]
        total = vectors.sum(axis=0)
        within_rest = float(total @ total - np.einsum("ij,ij->", vectors, vectors))
        columns.append(((within_rest + 2.0 * (table.embeddings[outside] @ total)) / (k * (k - 1)))[:, None])
    else:
        columns.append(np.zeros((len(outside), 1)))
    return outside, np.hstack(columns)


def search(model: OutcomeModel, table: PoolTable, k: int, seed: int, n_candidates: int = N_CANDIDATES,
           max_passes: int = MAX_PASSES) -> tuple[list[int], dict]:
    """The set with the lowest predicted objective found: the best of n_candidates seeded random sets, then best-swap
    passes. Returns (pool indices, the search's record)."""
    n = len(table.refusal_words)
    rng = random.Random(f"learned-{seed}")
    candidates = [rng.sample(range(n), k) for _ in range(n_candidates)]
    scores = model.objective(np.array([set_features(table, c) for c in candidates]))
    best = list(candidates[int(np.argmin(scores))])
    best_score = float(scores.min())
    passes = 0
    for passes in range(1, max_passes + 1):
        improved = False
        for position in range(k):
            outside, features = swap_features(table, best, position)
            trial_scores = model.objective(features)
            pick = int(np.argmin(trial_scores))
            if trial_scores[pick] < best_score - 1e-12:
                best = best[:position] + [int(outside[pick])] + best[position + 1:]
                best_score, improved = float(trial_scores[pick]), True
        if not improved:
            break
    return best, {"random_candidates": n_candidates, "random_objective_mean": round(float(scores.mean()), 6),
                  "best_random_objective": round(float(scores.min()), 6), "objective": round(best_score, 6),
                  "swap_passes": passes}


@register_selector("learned")
class LearnedSelector:
    """The set a model fitted on the committed grids' (selection, outcome) pairs predicts to be safest without over-refusing."""

    name = "learned"
    model_path: str | None = None

    def select(self, context: SelectionContext) -> Selection:
        model = load_model(self.model_path)
        losses, read = pool_losses(context, f"selector {self.name!r}")
        table = pool_table(context, losses)
        chosen, record = search(model, table, context.k, context.seed)
        features = set_features(table, chosen)
        predicted = model.predict(features)
        per_example = model.objective(np.array([set_features(table, [i]) for i in chosen]))
        return Selection(
            self.name, context.k, context.seed, [context.pool[i].id for i in chosen], [round(float(s), 6) for s in per_example],
            f"the set with the lowest predicted harmful rate + {model.overrefusal_weight} x over-refusal (ridge model on the "
            f"committed grids' outcomes, {model.meta.get('training', {}).get('judge', '?')} judge), best of {record['random_candidates']} "
            f"seeded random sets improved by swaps; score = the objective of the example alone",
            {"categories": [context.pool[i].category for i in chosen], "model": context.model_name,
             "predicted": {"harmful_centred": round(float(predicted["harmful"][0]), 6),
                           "overrefusal_centred": round(float(predicted["overrefusal"][0]), 6)},
             "search": record, "features": dict(zip(SET_FEATURES, (round(float(v), 6) for v in features))),
             "model_training_sha256": model.meta.get("training", {}).get("sha256"), "stored_results_reused": read})
