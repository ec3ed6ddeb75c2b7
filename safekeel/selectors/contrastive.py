"""Contrastive replay: k examples from both sides of the line, refusals and borderline-safe helpful answers.

Replaying refusals alone teaches a fine-tune to refuse more, safe prompts included (over-refusal rose from
about 0.22 to 0.31-0.36 on XSTest with 10 replayed refusals; issue 31). `contrastive` replaces part of the k
refusals with borderline-but-safe requests answered helpfully (the authored benign set's 229 borderline pairs,
the ones the organism was aligned with), each chosen as the nearest borderline request to one of the chosen
refusals: the fine-tune sees a harmful request refused beside a similar-looking safe one answered.

The mix is a stated rule, matched to how near the user data sits to the harmful side:

    harmful_share  = the weighted share of the user data (its summary points, safekeel.selectors.representation)
                     whose nearest anchor, among the pool's harmful requests and the authored benign requests
                     (the same files: borderline, general and math), is a harmful request (sentence embeddings,
                     cosine). Measured on the development datasets: GSM8K 0.0, SAMSum 0.36, the identity-shift
                     attack 0.5, Qi et al.'s 10 harmful examples 0.9
    borderline_share = max_borderline_share x (1 - harmful_share)          (max_borderline_share = 0.5)
    n_borderline   = floor(borderline_share x k), at most k - 1;   n_refusals = k - n_borderline

so benign user data (far from the harmful anchors, where replayed refusals teach over-refusal) gets up to half
borderline answers, and data that looks like the harmful requests (a harmful attack) gets refusals only; k=1
is always one refusal. The refusals are chosen as `stratified` does (seeded, one harm category at a time); the
selection record holds the rule, the measured shares and which ids are which (`details["mix"]`), and the
borderline examples themselves (`details["added_examples"]`: they are not in the safety pool; their `refusal`
field holds the helpful answer, category `borderline_safe`, style `helpful`).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

import numpy as np

from safekeel.data.conversation import SafetyExample
from safekeel.data.safety import BENIGN_FILES_V1, load_authored_benign
from safekeel.selectors.base import Selection, SelectionContext, register_selector
from safekeel.selectors.representation import pool_embeddings, user_summary

BORDERLINE_CATEGORY = "borderline_safe"
BORDERLINE_STYLE = "helpful"


def benign_examples(files: tuple[str, ...] = BENIGN_FILES_V1) -> list[SafetyExample]:
    """The authored benign pairs as SafetyExamples whose `refusal` is the helpful answer (category
    BORDERLINE_CATEGORY for the borderline-but-safe ones, else the file's kind; style BORDERLINE_STYLE)."""
    out = []
    for conversation in load_authored_benign(files):
        kind = conversation.meta.get("kind")
        out.append(SafetyExample(str(conversation.meta["id"]), BORDERLINE_CATEGORY if kind == "borderline" else f"benign_{kind}",
                                 conversation.last_user, conversation.completion or "", BORDERLINE_STYLE, conversation.source))
    return out


def stratified_order(pool: list[SafetyExample], seed: int) -> list[int]:
    """Every pool index in `stratified`'s order for this seed (categories in a seeded order, members shuffled,
    round-robin): the first n are what `stratified` would select at k=n."""
    rng = random.Random(seed)
    by_category: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(pool):
        by_category[example.category].append(index)
    categories = sorted(by_category)
    rng.shuffle(categories)
    for members in by_category.values():
        rng.shuffle(members)
    order: list[int] = []
    while len(order) < len(pool):
        for category in categories:
            if by_category[category]:
                order.append(by_category[category].pop())
    return order


def harmful_share(context: SelectionContext, benign_vectors: np.ndarray) -> float:
    """The weighted share of the user data whose nearest anchor (pool request or benign request) is harmful."""
    users, weights = user_summary(context)
    to_harmful = (users @ pool_embeddings(context).T).max(axis=1)
    to_benign = (users @ benign_vectors.T).max(axis=1)
    return min(1.0, max(0.0, float(weights @ (to_harmful > to_benign).astype(np.float64))))  # float weights may sum past 1


@register_selector("contrastive")
class ContrastiveSelector:
    """Refusals and borderline-safe helpful answers together; the benign share grows as the user data sits farther from the harmful requests."""

    name = "contrastive"
    max_borderline_share = 0.5
    """The borderline share for user data with no point nearer a harmful request than a borderline one."""
    borderline_files: tuple[str, ...] = BENIGN_FILES_V1

    def benign(self, context: SelectionContext) -> tuple[list[SafetyExample], np.ndarray]:
        """(the authored benign examples, their request embeddings), cached in the context."""
        key = f"benign:{','.join(self.borderline_files)}"
        if key not in context.cache:
            examples = benign_examples(self.borderline_files)
            clash = sorted({e.id for e in examples} & {e.id for e in context.pool})
            if clash:
                raise ValueError(f"selector {self.name!r}: safety pool ids {clash[:3]} are also authored benign example ids")
            embeddings_key = f"{key}:embeddings"
            if embeddings_key not in context.cache:
                from safekeel.models.embedder import embed  # deferred on purpose: loads the sentence embedder

                context.cache[embeddings_key] = embed([e.request for e in examples])
            context.cache[key] = (examples, np.asarray(context.cache[embeddings_key], dtype=np.float32))
        return context.cache[key]

    def select(self, context: SelectionContext) -> Selection:
        benign, benign_vectors = self.benign(context)
        share = harmful_share(context, benign_vectors)
        keep = [i for i, e in enumerate(benign) if e.category == BORDERLINE_CATEGORY]
        examples, vectors = [benign[i] for i in keep], benign_vectors[keep]
        borderline_share = self.max_borderline_share * (1.0 - share)
        n_borderline = max(0, min(context.k - 1, math.floor(borderline_share * context.k + 1e-9), len(examples)))
        n_refusals = context.k - n_borderline
        refusals = stratified_order(list(context.pool), context.seed)[:n_refusals]
        pool_vectors = pool_embeddings(context)
        similarity = pool_vectors[refusals] @ vectors.T  # (refusals, borderline)
        taken: list[int] = []
        scores: list[float] = []
        for j in range(n_borderline):  # the nearest borderline request to each chosen refusal in turn
            row = similarity[j % len(refusals)].copy()
            row[taken] = -np.inf
            pick = int(np.argmax(row))
            taken.append(pick)
            scores.append(float(row[pick]))
        chosen = [context.pool[i] for i in refusals] + [examples[i] for i in taken]
        paired = {examples[i].id: context.pool[refusals[j % len(refusals)]].id for j, i in enumerate(taken)}
        return Selection(
            self.name, context.k, context.seed, [e.id for e in chosen], [1.0] * n_refusals + [round(s, 6) for s in scores],
            f"{n_refusals} refusals (stratified, seed {context.seed}) and {n_borderline} borderline-safe helpful answers, "
            f"each the nearest to one of the refusals; borderline share = {self.max_borderline_share} x (1 - harmful share "
            f"{share:.3f} of the user data) = {borderline_share:.3f}; score = 1 for a refusal, cosine to its refusal for a "
            "borderline answer",
            {"categories": [e.category for e in chosen], "embedder": "all-minilm-l6-v2",
             "mix": {"rule": "n_borderline = floor(max_borderline_share x (1 - harmful_share) x k), at most k - 1",
                     "max_borderline_share": self.max_borderline_share, "harmful_share": round(share, 4),
                     "borderline_share": round(borderline_share, 4), "n_refusals": n_refusals, "n_borderline": n_borderline,
                     "refusal_ids": [context.pool[i].id for i in refusals], "borderline_ids": [examples[i].id for i in taken],
                     "borderline_paired_with": paired, "borderline_files": list(self.borderline_files),
                     "borderline_pool_size": len(examples), "benign_anchors": len(benign)},
             "added_examples": [{"id": e.id, "category": e.category, "request": e.request, "refusal": e.refusal,
                                 "style": e.style, "source": e.source} for e in (examples[i] for i in taken)]})
