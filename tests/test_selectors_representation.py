"""Representation-space selectors on planted geometry (embeddings injected, no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from safekeel.data.conversation import Conversation, SafetyExample
from safekeel.selectors import SelectionContext, get_selector

DIM = 16


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def planted(n_per_cluster: int = 10, clusters: int = 4, seed: int = 0):
    """Pool: `clusters` tight clusters around orthogonal axes; ids say the cluster (c<k>-<i>)."""
    rng = np.random.default_rng(seed)
    rows, pool = [], []
    for c in range(clusters):
        for i in range(n_per_cluster):
            vector = np.zeros(DIM)
            vector[c] = 1.0
            rows.append(vector + 0.05 * rng.standard_normal(DIM))
            pool.append(SafetyExample(f"c{c}-{i}", f"cat{c}", f"request {c} {i}", "No.", "brief", "test"))
    return pool, unit(np.array(rows))


def context_for(pool, pool_vectors, user_vectors, k, seed=0) -> SelectionContext:
    users = [Conversation.from_pair(f"u{i}", "a") for i in range(len(user_vectors))]
    context = SelectionContext(pool, users, k, seed)
    context.cache["pool_embeddings"] = pool_vectors
    context.cache["user_embeddings"] = user_vectors
    return context


def users_near(axis_weights: dict[int, int], seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for axis, count in axis_weights.items():
        for _ in range(count):
            vector = np.zeros(DIM)
            vector[axis] = 1.0
            rows.append(vector + 0.05 * rng.standard_normal(DIM))
    return unit(np.array(rows))


def clusters_of(selection) -> list[int]:
    return [int(i.split("-")[0][1:]) for i in selection.ids]


@pytest.mark.parametrize("name", ["kmeans", "kcenter", "facility_location", "nearest_user", "dpp"])
def test_every_selector_returns_k_distinct_pool_ids_deterministically(name):
    pool, vectors = planted()
    users = users_near({0: 5, 1: 5})
    first = get_selector(name).select(context_for(pool, vectors, users, k=6))
    again = get_selector(name).select(context_for(pool, vectors, users, k=6))
    assert first.ids == again.ids and len(set(first.ids)) == 6 and len(first.scores) == 6
    assert set(first.ids) <= {e.id for e in pool} and first.rationale


@pytest.mark.parametrize("name", ["kmeans", "kcenter"])
def test_diversity_selectors_cover_every_cluster(name):
    pool, vectors = planted()
    selection = get_selector(name).select(context_for(pool, vectors, users_near({0: 3}), k=4))
    assert sorted(clusters_of(selection)) == [0, 1, 2, 3]


def test_facility_location_covers_where_the_user_data_is():
    pool, vectors = planted()
    selection = get_selector("facility_location").select(context_for(pool, vectors, users_near({2: 8, 3: 2}), k=2))
    assert clusters_of(selection) == [2, 3]  # the heavier user cluster first, then the other


def test_nearest_user_mimics_the_user_data_and_dpp_adds_diversity():
    pool, vectors = planted()
    users = users_near({1: 10})
    nearest = get_selector("nearest_user").select(context_for(pool, vectors, users, k=3))
    assert clusters_of(nearest) == [1, 1, 1]
    # duplicates in the pool: nearest_user takes both copies, the DPP never picks the same vector twice
    duplicated = pool + [SafetyExample("c1-dup", "cat1", "dup", "No.", "brief", "test")]
    best = int(np.argmax(vectors @ users.mean(axis=0)))
    dup_vectors = np.vstack([vectors, vectors[best]])
    near = get_selector("nearest_user").select(context_for(duplicated, dup_vectors, users, k=2))
    dpp = get_selector("dpp").select(context_for(duplicated, dup_vectors, users, k=2))
    assert set(near.ids) == {pool[best].id, "c1-dup"}
    assert not {pool[best].id, "c1-dup"} <= set(dpp.ids)
