"""Selectors in representation space (sentence embeddings of the requests; faiss for search and k-means).

All work on unit-normalised embeddings, cached in the SelectionContext (`pool_embeddings`,
`user_embeddings`), so several selectors in one benchmark embed once. The user data enters as a
weighted summary (at most USER_SUMMARY k-means centroids weighted by cluster size) so selection
stays seconds-scale for 100k-example datasets.

- `kmeans`: k clusters of the pool; the member nearest each centroid (covers the pool's modes).
- `kcenter`: greedy farthest-first traversal of the pool (diversity; a 2-approximation of k-center).
- `facility_location`: greedy maximisation of sum_u w_u max_s sim(u, s) over the user summary
  (the safety examples that best cover the user's data; monotone submodular, (1-1/e) greedy).
- `nearest_user`: the pool examples most similar to the user data (mimic its distribution): each
  pool example scored by the weighted mean of its similarity to the user summary.
- `dpp`: a k-DPP MAP by greedy Cholesky (Chen et al. 2018) with kernel L = diag(q) S diag(q),
  quality q = exp(alpha * relevance to the user data): relevance and diversity traded by alpha.
"""

from __future__ import annotations

import numpy as np

from safekeel.selectors.base import Selection, SelectionContext, register_selector

USER_SUMMARY = 256


def pool_embeddings(context: SelectionContext) -> np.ndarray:
    if "pool_embeddings" not in context.cache:
        from safekeel.models.embedder import embed

        context.cache["pool_embeddings"] = embed([e.request for e in context.pool])
    return context.cache["pool_embeddings"]


def user_summary(context: SelectionContext) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, weights): the user data as at most USER_SUMMARY unit vectors with weights summing to 1."""
    if "user_summary" not in context.cache:
        if "user_embeddings" not in context.cache:
            if not context.user_data:
                raise ValueError("this selector needs the user's data, and there is none")
            from safekeel.models.embedder import embed

            context.cache["user_embeddings"] = embed([c.last_user[:2000] for c in context.user_data])
        users = np.ascontiguousarray(context.cache["user_embeddings"], dtype=np.float32)
        if len(users) <= USER_SUMMARY:
            centroids, weights = users, np.full(len(users), 1.0 / len(users), dtype=np.float32)
        else:
            import faiss

            kmeans = faiss.Kmeans(users.shape[1], USER_SUMMARY, niter=20, seed=context.seed, spherical=True)
            kmeans.train(users)
            _, assignment = kmeans.index.search(users, 1)
            counts = np.bincount(assignment[:, 0], minlength=USER_SUMMARY).astype(np.float32)
            keep = counts > 0
            centroids = kmeans.centroids[keep]
            centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-12
            weights = counts[keep] / counts.sum()
        context.cache["user_summary"] = (np.ascontiguousarray(centroids, dtype=np.float32), weights)
    return context.cache["user_summary"]


def _selection(name: str, context: SelectionContext, chosen: list[int], scores: list[float], rationale: str, **details) -> Selection:
    return Selection(name, context.k, context.seed, [context.pool[i].id for i in chosen],
                     [round(float(s), 6) for s in scores], rationale,
                     {"categories": [context.pool[i].category for i in chosen], "embedder": "all-minilm-l6-v2", **details})


@register_selector("kmeans")
class KMeansSelector:
    name = "kmeans"

    def select(self, context: SelectionContext) -> Selection:
        import faiss

        pool = np.ascontiguousarray(pool_embeddings(context), dtype=np.float32)
        kmeans = faiss.Kmeans(pool.shape[1], context.k, niter=25, nredo=5, seed=context.seed, spherical=True)
        kmeans.train(pool)
        index = faiss.IndexFlatIP(pool.shape[1])
        index.add(pool)
        taken: set[int] = set()
        chosen, scores = [], []
        _, neighbours = index.search(np.ascontiguousarray(kmeans.centroids), min(len(pool), 4 * context.k))
        similarities = kmeans.centroids @ pool.T
        for row, candidates in enumerate(neighbours):
            pick = next(int(c) for c in candidates if c >= 0 and int(c) not in taken)
            taken.add(pick)
            chosen.append(pick)
            scores.append(similarities[row, pick])
        return _selection(self.name, context, chosen, scores,
                          f"the pool example nearest each of {context.k} spherical k-means centroids of the pool (seed {context.seed})")


@register_selector("kcenter")
class KCenterSelector:
    name = "kcenter"

    def select(self, context: SelectionContext) -> Selection:
        pool = pool_embeddings(context)
        rng = np.random.default_rng(context.seed)
        first = int(rng.integers(len(pool)))
        chosen, scores = [first], [0.0]
        distance = 1.0 - pool @ pool[first]
        distance[first] = -np.inf
        while len(chosen) < context.k:
            pick = int(np.argmax(distance))
            chosen.append(pick)
            scores.append(float(distance[pick]))
            distance = np.minimum(distance, 1.0 - pool @ pool[pick])
            distance[chosen] = -np.inf
        return _selection(self.name, context, chosen, scores,
                          "greedy farthest-first traversal of the pool (cosine distance), seeded start; score = distance to the set when picked")


@register_selector("facility_location")
class FacilityLocationSelector:
    name = "facility_location"

    def select(self, context: SelectionContext) -> Selection:
        pool = pool_embeddings(context)
        users, weights = user_summary(context)
        similarity = users @ pool.T  # (users, pool)
        covered = np.zeros(len(users), dtype=np.float32)
        chosen, gains = [], []
        available = np.ones(len(pool), dtype=bool)
        for _ in range(context.k):
            gain = (weights[:, None] * np.maximum(similarity - covered[:, None], 0.0)).sum(axis=0)
            gain[~available] = -np.inf
            pick = int(np.argmax(gain))
            chosen.append(pick)
            gains.append(float(gain[pick]))
            available[pick] = False
            covered = np.maximum(covered, similarity[:, pick])
        return _selection(self.name, context, chosen, gains,
                          f"greedy facility location: the examples that best cover {len(users)} weighted summary points of the user data; "
                          "score = marginal coverage gain", coverage=float((weights * covered).sum()))


@register_selector("nearest_user")
class NearestUserSelector:
    name = "nearest_user"

    def select(self, context: SelectionContext) -> Selection:
        pool = pool_embeddings(context)
        users, weights = user_summary(context)
        relevance = weights @ (users @ pool.T)
        order = np.argsort(-relevance, kind="stable")[: context.k]
        return _selection(self.name, context, [int(i) for i in order], [relevance[i] for i in order],
                          "the pool examples with the highest weighted mean similarity to the user data")


@register_selector("dpp")
class DPPSelector:
    name = "dpp"
    alpha = 5.0
    """Quality exponent: larger favours relevance to the user data over diversity."""

    def select(self, context: SelectionContext) -> Selection:
        pool = pool_embeddings(context).astype(np.float64)
        users, weights = user_summary(context)
        relevance = weights @ (users @ pool.T)
        quality = np.exp(self.alpha * (relevance - relevance.max()))
        # greedy MAP for L = diag(q) S diag(q), S = pool pool^T (PSD); incremental Cholesky, O(k^2 n)
        n = len(pool)
        gains = quality ** 2 * np.einsum("ij,ij->i", pool, pool)
        vectors = np.zeros((context.k, n))
        chosen, scores = [], []
        for j in range(context.k):
            masked = gains.copy()
            masked[chosen] = -np.inf
            pick = int(np.argmax(masked))
            if masked[pick] <= 1e-12:
                break
            chosen.append(pick)
            scores.append(float(masked[pick]))
            row = quality[pick] * quality * (pool @ pool[pick])
            e = (row - vectors[:j].T @ vectors[:j, pick]) / np.sqrt(masked[pick])
            vectors[j] = e
            gains = gains - e ** 2
        if len(chosen) < context.k:  # the kernel's rank ran out: fill by relevance
            for i in np.argsort(-relevance):
                if len(chosen) == context.k:
                    break
                if int(i) not in chosen:
                    chosen.append(int(i))
                    scores.append(0.0)
        return _selection(self.name, context, chosen, scores,
                          f"greedy k-DPP MAP, kernel diag(q) S diag(q), q = exp({self.alpha} x relevance to the user data); "
                          "score = the determinant gain when picked", alpha=self.alpha)
