"""Where a user dataset sits between harmful requests and safe ones, in sentence-embedding space.

For every user example (its last user turn) we find the cosine similarity to the nearest harmful
reference request (the safety pool) and to the nearest benign reference request (the authored
benign set). An example is flagged when it is closer to a harmful request than to any benign one
and that similarity is high. The report gives the distribution and the most harmful-looking
examples, so a user (and the gate) can see if a dataset is an attack in disguise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from safekeel.audit.distances import distance_report, lda_projections
from safekeel.audit.flags import GATED_FLAGS, example_flags, flag_summary
from safekeel.data.conversation import Conversation, SafetyExample
from safekeel.models.embedder import DEFAULT_EMBEDDER, embed


@dataclass
class AuditReport:
    n_examples: int
    embedder: str
    mean_harmful_similarity: float
    """Mean over examples of the cosine similarity to the nearest harmful reference request."""
    mean_benign_similarity: float
    harmful_centroid_similarity: float
    """Cosine between the dataset's mean embedding and the harmful pool's mean embedding."""
    benign_centroid_similarity: float
    flagged_fraction: float
    """Share of examples nearer a harmful request than any benign one, with similarity >= threshold."""
    flag_threshold: float
    flagged: list[dict]
    """The most harmful-looking flagged examples (index, similarity, nearest harmful id, text)."""
    flag_counts: dict | None = None
    """Examples per flag (safekeel.audit.flags: harmful_request, persona_override, duplicate, empty_turn, long_turn)."""
    gated_fraction: float | None = None
    """Share of examples flagged harmful_request, harmful_answer or persona_override: what the data gate compares with its limit."""
    example_flags: list[dict] | None = None
    """Flagged examples with their reasons (the first `max_listed`)."""
    distances: dict | None = None
    """The dataset against the harmful and the safe reference as distributions (safekeel.audit.distances): Frechet
    distance, MMD^2 with its permutation p-value, and the share of examples on the harmful side of an LDA direction."""
    answer_judge: dict | None = None
    """The judge of the assistant answers behind the harmful_answer flag: {"name", "threshold", "mean_score"}."""
    hidden_state_distances: dict | None = None
    """The distances in the base model's own representation (hidden_state_distances), when asked for."""
    per_example: dict | None = None
    """Per example, in the dataset's order: "gated" (1 when flagged with one of GATED_FLAGS), "harmful_similarity"
    (cosine to the nearest harmful reference request), "benign_similarity", "lda_projection" (0 = the safe mean,
    1 = the harmful mean) and "answer_score" (the answer judge's probability of harmful content, when judged).
    What the shift step (safekeel.audit.act) acts on."""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        text = (f"audit of {self.n_examples} examples: {self.flagged_fraction:.1%} flagged as harmful-looking; "
                f"mean nearest-harmful similarity {self.mean_harmful_similarity:.3f}, "
                f"nearest-benign {self.mean_benign_similarity:.3f}")
        if self.answer_judge:
            text += f"; answers judged by {self.answer_judge['name']} (mean harmful-content score {self.answer_judge['mean_score']:.3f})"
        if self.flag_counts:
            text += "; flags: " + ", ".join(f"{k} {v}" for k, v in self.flag_counts.items())
        if self.distances:
            d = self.distances
            text += (f"; {d['lda']['harmful_side_share']:.1%} on the harmful side of the harmful/safe direction; "
                     f"Frechet to harmful {d['harmful']['frechet']:.3f}, to safe {d['safe']['frechet']:.3f}")
        return text


AnswerJudge = Callable[[list[str], list[str]], Sequence[float]]
"""(requests, answers) -> probability per answer that it holds content helping a harmful aim."""


@lru_cache(maxsize=8)
def reference_embeddings(texts: tuple[str, ...], embedder: str) -> np.ndarray:
    """Embeddings of a reference set (the harmful pool, the benign set), computed once per (texts, embedder) in a
    process: a service or a panel audits many datasets against the same references. Read-only."""
    vectors = embed(list(texts), embedder)
    vectors.setflags(write=False)
    return vectors


def audit_dataset(conversations: Sequence[Conversation], harmful: Sequence[SafetyExample],
                  benign: Sequence[Conversation], embedder: str = DEFAULT_EMBEDDER,
                  flag_threshold: float = 0.5, max_flagged: int = 10, n_permutations: int = 1000,
                  max_listed: int = 200, answer_judge: AnswerJudge | None = None, answer_threshold: float = 0.5,
                  answer_judge_name: str = "answer judge") -> AuditReport:
    """The audit of a user dataset (see the module doc). `answer_judge` scores the assistant answers for the
    harmful_answer flag (the caller's judge: the audit layer sits below the judges)."""
    if not conversations:
        raise ValueError("nothing to audit: the dataset has no conversations")
    user = embed([c.last_user[:2000] for c in conversations], embedder)
    harm = reference_embeddings(tuple(e.request for e in harmful), embedder)
    safe = reference_embeddings(tuple(c.last_user for c in benign), embedder)
    to_harm = user @ harm.T
    to_safe = user @ safe.T
    nearest_harm, nearest_harm_index = to_harm.max(axis=1), to_harm.argmax(axis=1)
    nearest_safe = to_safe.max(axis=1)
    flagged_mask = (nearest_harm > nearest_safe) & (nearest_harm >= flag_threshold)
    order = np.argsort(-nearest_harm)
    flagged = [{"index": int(i), "harmful_similarity": round(float(nearest_harm[i]), 4),
                "benign_similarity": round(float(nearest_safe[i]), 4),
                "nearest_harmful_id": harmful[int(nearest_harm_index[i])].id,
                "text": conversations[int(i)].last_user[:200]}
               for i in order if flagged_mask[i]][:max_flagged]

    def centroid_cosine(a: np.ndarray, b: np.ndarray) -> float:
        ca, cb = a.mean(axis=0), b.mean(axis=0)
        return float(ca @ cb / (np.linalg.norm(ca) * np.linalg.norm(cb) + 1e-12))

    answer_scores = judged = None
    if answer_judge is not None:
        answers = [c.completion or "" for c in conversations]
        answer_scores = [float(x) for x in answer_judge([c.last_user[:2000] for c in conversations], answers)]
        judged = {"name": answer_judge_name, "threshold": answer_threshold,
                  "mean_score": round(float(np.mean(answer_scores)), 4)}
    flags = example_flags(conversations, [bool(f) for f in flagged_mask], answer_scores=answer_scores,
                          answer_threshold=answer_threshold)
    counts, gated = flag_summary(flags, len(conversations))
    distances = distance_report(user, harm, safe, n_permutations=n_permutations) if len(conversations) >= 2 else None
    gated_indices = {entry["index"] for entry in flags if any(f in GATED_FLAGS for f in entry["flags"])}
    per_example = {"gated": [int(i in gated_indices) for i in range(len(conversations))],
                   "harmful_similarity": [round(float(x), 4) for x in nearest_harm],
                   "benign_similarity": [round(float(x), 4) for x in nearest_safe]}
    if distances is not None:
        per_example["lda_projection"] = [round(float(x), 4) for x in lda_projections(user, harm, safe)]
    if answer_scores is not None:
        per_example["answer_score"] = [round(x, 4) for x in answer_scores]
    return AuditReport(
        n_examples=len(conversations), embedder=embedder,
        mean_harmful_similarity=round(float(nearest_harm.mean()), 4),
        mean_benign_similarity=round(float(nearest_safe.mean()), 4),
        harmful_centroid_similarity=round(centroid_cosine(user, harm), 4),
        benign_centroid_similarity=round(centroid_cosine(user, safe), 4),
        flagged_fraction=round(float(flagged_mask.mean()), 4), flag_threshold=flag_threshold, flagged=flagged,
        flag_counts=counts, gated_fraction=round(gated, 4), example_flags=flags[:max_listed],
        distances=distances, answer_judge=judged, per_example=per_example)


def hidden_state_distances(model, tokenizer, conversations: Sequence[Conversation], harmful: Sequence[SafetyExample],
                           benign: Sequence[Conversation], layer: int | None = None, n_permutations: int = 1000) -> dict:
    """The distribution distances (safekeel.audit.distances) in the base model's own representation: the residual
    stream entering decoder block `layer` (default: the middle one), mean-pooled over each request, unit-normalised
    (safekeel.models.capture.request_hidden_states, the *_hidden selectors' space)."""
    from safekeel.models.capture import request_hidden_states

    count = model.config.num_hidden_layers
    layer = count // 2 if layer is None else layer
    if not 0 <= layer < count:
        raise ValueError(f"layer {layer} is out of range: the model has {count} decoder blocks (0..{count - 1})")
    vectors = [request_hidden_states(model, tokenizer, texts, layer) for texts in
               ([c.last_user[:2000] for c in conversations], [e.request for e in harmful], [c.last_user for c in benign])]
    return {"layer": layer, **distance_report(*vectors, n_permutations=n_permutations)}
