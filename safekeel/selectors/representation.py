"""Selectors in representation space (sentence embeddings of the requests; faiss for search and k-means).

All work on unit-normalised embeddings, cached in the SelectionContext (`pool_embeddings`,
`user_embeddings`), so several selectors in one benchmark embed once. The user data enters as a
weighted summary (at most USER_SUMMARY k-means centroids weighted by cluster size) so selection
stays seconds-scale for 100k-example datasets.

Each algorithm reads its vectors from an EmbeddingSpace (its `space` attribute): SENTENCE_SPACE here;
safekeel/selectors/model_aware.py adds the base model's own hidden states (the `*_hidden` variants).
A space names its cache entries, so the spaces of one context never mix.

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


class EmbeddingSpace:
    """Where vectors come from: one unit-normalised row per pool example / user conversation.

    The default is the sentence embedder over each request (pool) and each last user turn (user
    data), under the cache keys `pool_embeddings` and `user_embeddings`."""

    def cache_key(self, context: SelectionContext, name: str) -> str:
        return name

    def embed_pool(self, context: SelectionContext) -> np.ndarray:
        from safekeel.models.embedder import embed

        return embed([e.request for e in context.pool])

    def embed_user(self, context: SelectionContext) -> np.ndarray:
        from safekeel.models.embedder import embed

        return embed([c.last_user[:2000] for c in context.user_data])

    def details(self, context: SelectionContext) -> dict:
        return {"embedder": "all-minilm-l6-v2"}


SENTENCE_SPACE = EmbeddingSpace()


def pool_embeddings(context: SelectionContext, space: EmbeddingSpace = SENTENCE_SPACE) -> np.ndarray:
    key = space.cache_key(context, "pool_embeddings")
    if key not in context.cache:
        context.cache[key] = space.embed_pool(context)
    return context.cache[key]


def user_summary(context: SelectionContext, space: EmbeddingSpace = SENTENCE_SPACE) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, weights): the user data as at most USER_SUMMARY unit vectors with weights summing to 1."""
    key = space.cache_key(context, "user_summary")
    if key not in context.cache:
        embeddings_key = space.cache_key(context, "user_embeddings")
        if embeddings_key not in context.cache:
            if not context.user_data:
                raise ValueError("this selector needs the user's data, and there is none")
            context.cache[embeddings_key] = space.embed_user(context)
        users = np.ascontiguousarray(context.cache[embeddings_key], dtype=np.float32)
        if len(users) <= USER_SUMMARY:
            centroids, weights = users, np.full(len(users), 1.0 / len(users), dtype=np.float32)
        else:
            import faiss

            # k-means trains on at most 64 points per centroid (faiss subsamples; with its default, 256,
            # training took 7 s for 100k users, now 1.3 s): no change up to 16,384 users
            kmeans = faiss.Kmeans(users.shape[1], USER_SUMMARY, niter=20, seed=context.seed, spherical=True,
                                  max_points_per_centroid=64)
            kmeans.train(users)
            _, assignment = kmeans.index.search(users, 1)
            counts = np.bincount(assignment[:, 0], minlength=USER_SUMMARY).astype(np.float32)
            keep = counts > 0
            centroids = kmeans.centroids[keep]
            centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-12
            weights = counts[keep] / counts.sum()
        context.cache[key] = (np.ascontiguousarray(centroids, dtype=np.float32), weights)
    return context.cache[key]


def user_relevance(context: SelectionContext, space: EmbeddingSpace = SENTENCE_SPACE) -> np.ndarray:
    """Per pool example: the weighted mean cosine similarity to the user data summary (cached)."""
    key = space.cache_key(context, "user_relevance")
    if key not in context.cache:
        users, weights = user_summary(context, space)
        context.cache[key] = weights @ (users @ pool_embeddings(context, space).T)
    return context.cache[key]


def _selection(name: str, context: SelectionContext, space: EmbeddingSpace, chosen: list[int], scores: list[float], rationale: str,
               **details) -> Selection:
    return Selection(name, context.k, context.seed, [context.pool[i].id for i in chosen],
                     [round(float(s), 6) for s in scores], rationale,
                     {"categories": [context.pool[i].category for i in chosen], **space.details(context), **details})


@register_selector("kmeans")
class KMeansSelector:
    """The pool example nearest each of k spherical k-means centroids of the pool (covers its modes)."""

    name = "kmeans"
    space: EmbeddingSpace = SENTENCE_SPACE

    def select(self, context: SelectionContext) -> Selection:
        import faiss

        pool = np.ascontiguousarray(pool_embeddings(context, self.space), dtype=np.float32)
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
        return _selection(self.name, context, self.space, chosen, scores,
                          f"the pool example nearest each of {context.k} spherical k-means centroids of the pool (seed {context.seed})")


@register_selector("kcenter")
class KCenterSelector:
    """Greedy farthest-first traversal of the pool (diversity; a 2-approximation of k-center)."""

    name = "kcenter"
    space: EmbeddingSpace = SENTENCE_SPACE

    def select(self, context: SelectionContext) -> Selection:
        pool = pool_embeddings(context, self.space)
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
        return _selection(self.name, context, self.space, chosen, scores,
                          "greedy farthest-first traversal of the pool (cosine distance), seeded start; score = distance to the set when picked")


FACILITY_BLOCK = 2048
"""Candidates whose exact coverage gain is computed at a time by the lazy greedy."""


def _best_gain(similarity: np.ndarray, weights: np.ndarray, covered: np.ndarray, available: np.ndarray,
               bound: np.ndarray) -> tuple[int, float]:
    """The available column with the largest gain sum_u w_u max(sim_us - covered_u, 0) (lowest index
    among ties, as argmax over all columns), refreshing `bound` for the columns it computes. Blocks
    have at least 2 columns so numpy sums each column in the same order as over the whole matrix."""
    order = np.argsort(-bound, kind="stable")
    best, best_gain = -1, -np.inf
    start = 0
    while start < len(order) and bound[order[start]] >= best_gain:
        end = start + FACILITY_BLOCK if len(order) - (start + FACILITY_BLOCK) != 1 else start + FACILITY_BLOCK + 1
        block = order[start:end]
        gain = (weights[:, None] * np.maximum(similarity[:, block] - covered[:, None], 0.0)).sum(axis=0)
        gain[~available[block]] = -np.inf
        bound[block] = gain
        top = gain.max()
        candidate = int(block[gain == top].min())
        if top > best_gain or (top == best_gain and candidate < best):
            best, best_gain = candidate, top
        start = end
    return best, float(best_gain)


@register_selector("facility_location")
class FacilityLocationSelector:
    """The safety examples that best cover the user's data (greedy facility location)."""

    name = "facility_location"
    space: EmbeddingSpace = SENTENCE_SPACE

    def select(self, context: SelectionContext) -> Selection:
        pool = pool_embeddings(context, self.space)
        users, weights = user_summary(context, self.space)
        similarity = users @ pool.T  # (users, pool)
        covered = np.zeros(len(users), dtype=np.float32)
        available = np.ones(len(pool), dtype=bool)
        # Lazy greedy (Minoux 1978): a gain computed in an earlier round bounds the current one
        # (submodularity; elementwise monotone in float too), so each round computes exact gains only
        # for the candidates in decreasing order of their bound, until no bound can beat the best.
        bound = np.full(len(pool), np.inf)  # float64 holds a float32 or float64 gain exactly
        chosen, gains = [], []
        for _ in range(context.k):
            pick, gain = _best_gain(similarity, weights, covered, available, bound)
            chosen.append(pick)
            gains.append(gain)
            available[pick] = False
            bound[pick] = -np.inf
            covered = np.maximum(covered, similarity[:, pick])
        return _selection(self.name, context, self.space, chosen, gains,
                          f"greedy facility location: the examples that best cover {len(users)} weighted summary points of the user data; "
                          "score = marginal coverage gain", coverage=float((weights * covered).sum()))


@register_selector("nearest_user")
class NearestUserSelector:
    """The pool examples most similar to the user data (mimics its distribution)."""

    name = "nearest_user"
    space: EmbeddingSpace = SENTENCE_SPACE

    def select(self, context: SelectionContext) -> Selection:
        relevance = user_relevance(context, self.space)
        order = np.argsort(-relevance, kind="stable")[: context.k]
        return _selection(self.name, context, self.space, [int(i) for i in order], [relevance[i] for i in order],
                          "the pool examples with the highest weighted mean similarity to the user data")


@register_selector("dpp")
class DPPSelector:
    """A greedy k-DPP MAP trading relevance to the user data against diversity (alpha)."""

    name = "dpp"
    space: EmbeddingSpace = SENTENCE_SPACE
    alpha = 5.0
    """Quality exponent: larger favours relevance to the user data over diversity."""

    def select(self, context: SelectionContext) -> Selection:
        pool = pool_embeddings(context, self.space).astype(np.float64)
        relevance = user_relevance(context, self.space)
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
        return _selection(self.name, context, self.space, chosen, scores,
                          f"greedy k-DPP MAP, kernel diag(q) S diag(q), q = exp({self.alpha} x relevance to the user data); "
                          "score = the determinant gain when picked", alpha=self.alpha)
