"""The test-time guard: what a fine-tuned model's requests get before they reach the engine. Built in one place.

A Guard is decided once per fine-tune (safekeel.pipeline builds it from the job's mode, selection and guard
options) and then used twice, unchanged: the evaluation and the safety gate ask their prompts through it, and
the service serves the deployed model through it (stored with the model as `Guard.to_dict()`). Its parts:

- a system prompt: a backdoor secret first (BackdoorAlign: the trigger the safety examples carried in
  training), then a safety system prompt (PTST: train without it, serve with it), then the caller's own;
- in-context safety demonstrations, one of
  - static: a set chosen at job time (the same prefix on every request, so vLLM's prefix cache makes it nearly
    free; the `icl` mode's selection);
  - contrastive: the static set with each refusal beside the nearest borderline-but-safe request answered
    helpfully (the authored benign set's borderline pairs), so the model sees both sides of the line (each pair's
    order seeded); one prefix, cached as static is;
  - clustered: C prefixes (C = n_clusters, 2-16) built at job time by spherical k-means (seeded) over the pool's
    request embeddings (MiniLM); each prefix holds the pool examples nearest its cluster centroid (optionally
    paired as contrastive does). A request gets the prefix of its nearest centroid: one embedding and C dot
    products, and every request routed to a cluster gets the identical prefix, so the prefix cache reuses it.
    The centroids and prefixes are stored in the guard, named by `cluster_set` (a hash, checked when served);
  - retrieved: the pool examples nearest to each request (faiss inner-product search over sentence embeddings;
    a different prefix per request, nothing cached).
"""

from __future__ import annotations

import functools
import random
import threading
from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

import numpy as np

from safekeel.data.conversation import SafetyExample
from safekeel.data.safety import BENIGN_FILES_V1, load_authored_benign, load_pool
from safekeel.defaults import DEFAULT_SAFETY_SYSTEM_PROMPT
from safekeel.provenance import sha256_json

DEMONSTRATION_MODES = ("none", "static", "retrieved", "contrastive", "clustered")
DEMONSTRATION_HELP = {
    "none": "no demonstrations",
    "static": "the first n selected examples (mode icl: all k), one prefix on every request (prefix-cached)",
    "contrastive": "static, each refusal beside the nearest borderline-safe request answered helpfully (pair order seeded; prefix-cached)",
    "clustered": "n_clusters prefixes from seeded k-means over the pool's requests; each request gets its nearest "
                 "centroid's prefix (one embedding + C dot products; each prefix cached; cluster_set hash recorded)",
    "retrieved": "the n pool examples nearest each request (faiss; a new prefix per request, not cached)",
}
PREFIX_MODES = ("static", "contrastive")
"""Demonstrations that are one fixed prefix for every request (`Guard.static_demonstrations`)."""
DEFAULT_CLUSTERS = 6
CLUSTER_RANGE = (2, 16)
CLUSTER_EMBEDDER = "all-minilm-l6-v2"
BORDERLINE_KIND = "borderline"


@dataclass
class GuardAction:
    """What the guard did to one request (for metrics and the response's `safekeel` field)."""

    system_prompt: bool = False
    demonstrations: list[str] = field(default_factory=list)
    mode: str = "none"


@dataclass
class Guard:
    """What the served (and evaluated) model gets before each request. `to_dict()` is the stored form."""

    system_prompt: str | None = None
    demonstrations: Literal["none", "static", "retrieved", "contrastive", "clustered"] = "none"
    static_demonstrations: list[dict] = field(default_factory=list)
    """{id, request, refusal[, kind]} per demonstration, in order (demonstrations "static" or "contrastive"). `refusal`
    is the assistant's turn: a refusal, or for kind "helpful" (contrastive) the borderline request's helpful answer."""
    n_demonstrations: int = 3
    """Retrieved demonstrations per request (demonstrations == "retrieved")."""
    n_clusters: int = DEFAULT_CLUSTERS
    """Prefixes of a clustered guard."""
    paired: bool = False
    """Clustered: each refusal in a prefix beside its nearest borderline-safe helpful answer (as contrastive)."""
    seed: int = 0
    """Seeds the contrastive pairs' order and the clustering."""
    clusters: list[dict] = field(default_factory=list)
    """Clustered: per cluster {centroid (unit vector, 6 decimals), size (pool members), demonstrations (the prefix)}."""
    cluster_set: str | None = None
    """Clustered: sha256 of the embedder, centroids and prefix ids (`cluster_set_hash`); checked when routing."""
    pool: str = "authored"
    """Where retrieved demonstrations come from."""
    backdoor: bool = False
    """The system prompt starts with a BackdoorAlign secret."""
    monitor_policy: str = "default"

    def __post_init__(self) -> None:
        if self.demonstrations not in DEMONSTRATION_MODES:
            raise ValueError(f"unknown guard demonstrations {self.demonstrations!r}; known: {', '.join(DEMONSTRATION_MODES)}")
        if self.demonstrations == "clustered":
            check_clusters(self.n_clusters)
            if self.clusters and len(self.clusters) != self.n_clusters:
                raise ValueError(f"a clustered guard with n_clusters={self.n_clusters} holds {len(self.clusters)} clusters")

    @property
    def active(self) -> bool:
        return bool(self.system_prompt) or self.demonstrations != "none"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "Guard":
        if not data:
            return cls()
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})

    def system_text(self, caller_system: str | None = None) -> str | None:
        """The system message the engine sees: the guard's prompt first, then the caller's own."""
        parts = [p for p in (self.system_prompt, caller_system) if p]
        return "\n\n".join(parts) if parts else None

    def demonstrations_for(self, request: str) -> list[dict]:
        if self.demonstrations in PREFIX_MODES:
            return list(self.static_demonstrations)
        if self.demonstrations == "clustered":
            return list(self.clusters[self.route(request)]["demonstrations"])
        if self.demonstrations == "retrieved":
            return [{"id": e.id, "request": e.request, "refusal": e.refusal}
                    for e in retrieval_index(self.pool).nearest(request, self.n_demonstrations)]
        return []

    def route(self, request: str) -> int:
        """The cluster whose prefix a request gets: the nearest centroid to its embedding (cosine)."""
        from safekeel.models.embedder import embed  # deferred on purpose: loads the sentence embedder

        return int(np.argmax(centroid_matrix(self) @ embed([request[:2000]], CLUSTER_EMBEDDER)[0]))

    def apply(self, messages: list[dict]) -> tuple[list[dict], GuardAction]:
        """The messages the engine sees, and what was added."""
        action = GuardAction(system_prompt=bool(self.system_prompt), mode=self.demonstrations)
        caller_system = "\n\n".join(m["content"] for m in messages if m["role"] in ("system", "developer")) or None
        rest = [m for m in messages if m["role"] not in ("system", "developer")]
        last_user = next((m["content"] for m in reversed(rest) if m["role"] == "user"), "")
        demos = self.demonstrations_for(last_user)
        action.demonstrations = [d["id"] for d in demos]
        return assemble(self.system_text(caller_system), demos, rest), action


def assemble(system: str | None, demonstrations: Sequence[dict], messages: Sequence[dict]) -> list[dict]:
    """The one layout of a guarded chat: the system message, each demonstration as a user turn and its refusal
    as the assistant's turn, then the conversation."""
    out: list[dict] = [{"role": "system", "content": system}] if system else []
    for demo in demonstrations:
        out += [{"role": "user", "content": demo["request"]}, {"role": "assistant", "content": demo["refusal"]}]
    return out + list(messages)


def apply_guard(messages: list[dict], guard: "Guard | dict | None") -> tuple[list[dict], GuardAction]:
    """`Guard.apply` for a stored guard (a dict) or none."""
    if not guard:
        return messages, GuardAction()
    return (guard if isinstance(guard, Guard) else Guard.from_dict(guard)).apply(messages)


def build_guard(mode: str, *, selected: Sequence[SafetyExample] = (), secret: str | None = None,
                system_prompt: bool | str | None = False, demonstrations: str = "none", n_demonstrations: int = 3,
                pool: str = "authored", static_pick: Sequence[SafetyExample] | None = None,
                monitor_policy: str = "default", n_clusters: int = DEFAULT_CLUSTERS, paired: bool = False,
                seed: int = 0) -> Guard:
    """The guard a fine-tune is evaluated and served with.

    The mode decides its core: `backdoor` serves the secret it trained with, `ptst` serves safekeel's safety
    system prompt, `icl` serves the k selected examples as static demonstrations. The guard options add to it:
    `system_prompt` (True: safekeel's default prompt, or your own text), `demonstrations` ("static": the first
    `n_demonstrations` of the selection, or of `static_pick` when the mode selected nothing; "contrastive": the same,
    each refusal beside its nearest borderline-safe helpful answer; "clustered": `n_clusters` prefixes of the
    pool examples nearest each k-means centroid of the pool, `n_demonstrations` per prefix (in mode icl the
    selection's size k; the selection itself is not used), routed per request; "retrieved": the pool examples
    nearest to each request). The mode icl takes static (its default), contrastive or clustered."""
    parts: list[str] = []
    if mode == "backdoor":
        if not secret:
            raise ValueError("a backdoor guard needs the secret prompt the safety examples were trained with")
        parts.append(secret)
    if mode == "ptst" or system_prompt is True:
        parts.append(DEFAULT_SAFETY_SYSTEM_PROMPT)
    if isinstance(system_prompt, str) and system_prompt and system_prompt not in parts:
        parts.append(system_prompt)
    if demonstrations not in DEMONSTRATION_MODES:
        raise ValueError(f"unknown guard demonstrations {demonstrations!r}; known: {', '.join(DEMONSTRATION_MODES)}")
    if paired and demonstrations != "clustered":
        raise ValueError(f"guard option paired applies to clustered demonstrations, not {demonstrations!r} "
                         "(contrastive demonstrations are always paired)")
    static: list[dict] = []
    clusters: list[dict] = []
    if mode == "icl":
        if demonstrations == "retrieved":
            raise ValueError("mode icl serves its selected examples as static demonstrations; guard demonstrations "
                             "'retrieved' would replace them (choose static, contrastive or clustered)")
        if demonstrations == "none":
            demonstrations = "static"
        if demonstrations == "clustered":
            n_demonstrations = len(selected) or n_demonstrations
        chosen = list(selected)
    else:
        chosen = (list(selected) if selected else list(static_pick or []))[:n_demonstrations]
        if demonstrations in PREFIX_MODES and not chosen:
            raise ValueError(f"{demonstrations} guard demonstrations need examples: a selection, or a pick from the pool")
    if demonstrations == "static":
        static = [_demo(e) for e in chosen]
    elif demonstrations == "contrastive":
        static = contrastive_demonstrations(chosen, seed)
    elif demonstrations == "clustered":
        clusters = build_clusters(pool, n_clusters, n_demonstrations, seed, paired)
    return Guard(system_prompt="\n\n".join(dict.fromkeys(parts)) or None, demonstrations=demonstrations,  # type: ignore[arg-type]
                 static_demonstrations=static, n_demonstrations=n_demonstrations, pool=pool,
                 backdoor=mode == "backdoor", monitor_policy=monitor_policy, n_clusters=n_clusters, paired=paired,
                 seed=seed, clusters=clusters, cluster_set=cluster_set_hash(clusters) if clusters else None)


def _demo(example: SafetyExample, kind: str | None = None) -> dict:
    demo = {"id": example.id, "request": example.request, "refusal": example.refusal}
    return {**demo, "kind": kind} if kind else demo


def check_clusters(n_clusters: int) -> None:
    low, high = CLUSTER_RANGE
    if not isinstance(n_clusters, int) or isinstance(n_clusters, bool) or not low <= n_clusters <= high:
        raise ValueError(f"guard n_clusters must be an integer from {low} to {high} (a few prefixes, each cached), got {n_clusters!r}")


@functools.lru_cache(maxsize=1)
def borderline_candidates() -> tuple[list[SafetyExample], np.ndarray]:
    """The authored borderline-but-safe requests with their helpful answers (the files the organism and the
    `contrastive` selector use, BENIGN_FILES_V1) as SafetyExamples (`refusal` holds the answer), and their
    request embeddings."""
    from safekeel.models.embedder import embed  # deferred on purpose: loads the sentence embedder

    examples = [SafetyExample(str(c.meta["id"]), "borderline_safe", c.last_user, c.completion or "", "helpful", c.source)
                for c in load_authored_benign(BENIGN_FILES_V1) if c.meta.get("kind") == BORDERLINE_KIND]
    return examples, embed([e.request for e in examples], CLUSTER_EMBEDDER)


def contrastive_demonstrations(examples: Sequence[SafetyExample], seed: int) -> list[dict]:
    """Each refusal beside the nearest borderline-safe request (cosine of MiniLM request embeddings, each used once;
    ties to the first) answered helpfully; the seed decides, per pair, which side comes first. Examples that are
    already borderline-safe answers (a `contrastive` selection) stay as they are, unpaired."""
    from safekeel.models.embedder import embed  # deferred on purpose: loads the sentence embedder

    candidates, vectors = borderline_candidates()
    refusals = [e for e in examples if e.category != "borderline_safe"]
    if len(refusals) > len(candidates):
        raise ValueError(f"contrastive demonstrations pair each refusal with a borderline answer: {len(refusals)} refusals, "
                         f"only {len(candidates)} borderline answers")
    used = {e.id for e in examples}
    similarity = embed([e.request for e in refusals], CLUSTER_EMBEDDER) @ vectors.T if refusals else np.zeros((0, 0))
    rng = random.Random(seed)
    out: list[dict] = []
    row_index = 0
    for example in examples:
        if example.category == "borderline_safe":
            out.append(_demo(example, "helpful"))
            continue
        row = similarity[row_index].copy()
        row_index += 1
        row[[i for i, c in enumerate(candidates) if c.id in used]] = -np.inf
        partner = candidates[int(np.argmax(row))]
        used.add(partner.id)
        pair = [_demo(example, "refusal"), {**_demo(partner, "helpful"), "paired_with": example.id}]
        out += pair[::-1] if rng.random() < 0.5 else pair
    return out


def spherical_kmeans(vectors: np.ndarray, n_clusters: int, seed: int, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(unit centroids, labels) of unit vectors: k-means++ seeding and Lloyd steps on cosine similarity (numpy,
    deterministic for a seed); an emptied cluster is re-seeded with the point farthest from its centroid."""
    rng = np.random.default_rng(seed)
    centroids = [vectors[int(rng.integers(len(vectors)))]]
    for _ in range(1, n_clusters):
        distance = np.clip(1.0 - (vectors @ np.asarray(centroids).T).max(axis=1), 0.0, None)
        weights = distance / distance.sum() if distance.sum() > 0 else np.full(len(vectors), 1.0 / len(vectors))
        centroids.append(vectors[int(rng.choice(len(vectors), p=weights))])
    matrix = np.asarray(centroids, dtype=np.float64)
    labels = np.full(len(vectors), -1)
    for _ in range(iterations):
        similarity = vectors @ matrix.T
        new = similarity.argmax(axis=1)
        for c in range(n_clusters):
            if not (new == c).any():  # re-seed an empty cluster with the worst-fitting point of a cluster of 2+
                fit = similarity[np.arange(len(vectors)), new].copy()
                fit[np.bincount(new, minlength=n_clusters)[new] < 2] = np.inf
                new[int(np.argmin(fit))] = c
        if (new == labels).all():
            break
        labels = new
        for c in range(n_clusters):
            mean = vectors[labels == c].mean(axis=0)
            matrix[c] = mean / (np.linalg.norm(mean) or 1.0)
    return matrix, labels


def build_clusters(pool_name: str, n_clusters: int, per_prefix: int, seed: int, paired: bool) -> list[dict]:
    """The clustered guard's prefixes: k-means (seeded) over the pool's request embeddings; per cluster, its members
    nearest the centroid first, then the nearest others if it has fewer than `per_prefix` (so every prefix starts
    with a different example and the C prefixes are distinct)."""
    from safekeel.models.embedder import embed  # deferred on purpose: loads the sentence embedder

    check_clusters(n_clusters)
    if per_prefix < 1:
        raise ValueError(f"a clustered guard needs at least one demonstration per prefix, got {per_prefix}")
    pool = load_pool(pool_name)
    if len(pool) < n_clusters:
        raise ValueError(f"guard n_clusters={n_clusters} is more than the {len(pool)} examples of pool {pool_name!r}")
    vectors = embed([e.request for e in pool], CLUSTER_EMBEDDER).astype(np.float64)
    centroids, labels = spherical_kmeans(vectors, n_clusters, seed)
    centroids = np.round(centroids, 6)
    clusters = []
    for c in range(n_clusters):
        similarity = vectors @ centroids[c]
        order = sorted(range(len(pool)), key=lambda i: (labels[i] != c, -similarity[i], i))[:per_prefix]
        chosen = [pool[i] for i in order]
        demos = contrastive_demonstrations(chosen, seed) if paired else [_demo(e) for e in chosen]
        clusters.append({"centroid": centroids[c].tolist(), "size": int((labels == c).sum()), "demonstrations": demos})
    return clusters


def cluster_set_hash(clusters: Sequence[dict]) -> str:
    """Names a clustered guard's routing and prefixes: sha256 of the embedder, the centroids and each prefix (ids,
    requests and replies)."""
    return sha256_json({"embedder": CLUSTER_EMBEDDER, "centroids": [c["centroid"] for c in clusters],
                        "prefixes": [c["demonstrations"] for c in clusters]})


_VERIFIED: dict[str, tuple[np.ndarray, list]] = {}
"""cluster_set -> (centroids, prefixes) of a clustered guard whose hash was checked."""


def centroid_matrix(guard: Guard) -> np.ndarray:
    """A clustered guard's centroids as a matrix, its clusters checked against its `cluster_set`: hashed the first time,
    then compared with what that hash named (cheaper than hashing on every request)."""
    if not guard.clusters or not guard.cluster_set:
        raise ValueError("a clustered guard needs its clusters and cluster_set (safekeel.guard.build_guard builds them)")
    centroids = np.asarray([c["centroid"] for c in guard.clusters], dtype=np.float64)
    prefixes = [c["demonstrations"] for c in guard.clusters]
    known = _VERIFIED.get(guard.cluster_set)
    if known is None or not (known[0].shape == centroids.shape and np.array_equal(known[0], centroids) and known[1] == prefixes):
        if cluster_set_hash(guard.clusters) != guard.cluster_set:
            raise ValueError(f"clustered guard: its clusters do not match its cluster_set {guard.cluster_set[:12]}... "
                             "(edited or corrupted)")
        known = _VERIFIED[guard.cluster_set] = (centroids, prefixes)
    return known[0]


def per_request(guard: Guard) -> dict | None:
    """What the evaluation needs to choose each prompt's demonstrations as the served guard does (None: a fixed
    prefix or none): EvalSettings.retrieval (safekeel.eval.harness)."""
    if guard.demonstrations == "retrieved":
        return {"pool": guard.pool, "n": guard.n_demonstrations}
    if guard.demonstrations == "clustered":
        return {"clustered": {k: getattr(guard, k) for k in ("n_clusters", "paired", "seed", "clusters", "cluster_set", "pool")}}
    return None


def per_request_guard(retrieval: dict) -> Guard:
    """The guard of an EvalSettings.retrieval (`per_request`)."""
    if "clustered" in retrieval:
        return Guard(demonstrations="clustered", **retrieval["clustered"])
    return Guard(demonstrations="retrieved", pool=retrieval["pool"], n_demonstrations=retrieval["n"])


class RetrievalIndex:
    """Nearest safety examples to a request: faiss IndexFlatIP over unit-normalised embeddings."""

    def __init__(self, pool_name: str) -> None:
        import faiss  # deferred on purpose: an optional, heavy dependency only retrieval needs

        from safekeel.models.embedder import embed

        self.embed = embed
        self.pool = load_pool(pool_name)
        vectors = embed([e.request for e in self.pool])
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.lock = threading.Lock()

    def nearest(self, text: str, k: int) -> list:
        query = self.embed([text[:2000]])
        with self.lock:
            _, ids = self.index.search(np.ascontiguousarray(query), min(k, len(self.pool)))
        return [self.pool[i] for i in ids[0] if i >= 0]


@functools.lru_cache(maxsize=8)
def retrieval_index(pool_name: str) -> RetrievalIndex:
    return RetrievalIndex(pool_name)
