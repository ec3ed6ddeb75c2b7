"""Baselines: seeded uniform random choice, and category-stratified random choice."""

from __future__ import annotations

import random
from collections import defaultdict

from safekeel.selectors.base import Selection, SelectionContext, register_selector


@register_selector("random")
class RandomSelector:
    """k examples uniformly at random without replacement (seeded): the baseline to beat."""

    name = "random"

    def select(self, context: SelectionContext) -> Selection:
        rng = random.Random(context.seed)
        chosen = rng.sample(range(len(context.pool)), context.k)
        return Selection(self.name, context.k, context.seed, [context.pool[i].id for i in chosen],
                         [1.0] * context.k, f"uniform random sample of {context.k} from {len(context.pool)} (seed {context.seed})")


@register_selector("stratified")
class StratifiedSelector:
    """Random, but one per harm category first (like BackdoorAlign's 11 category-wise examples),
    then round-robin over categories in a seeded order until k are chosen."""

    name = "stratified"

    def select(self, context: SelectionContext) -> Selection:
        rng = random.Random(context.seed)
        by_category: dict[str, list[int]] = defaultdict(list)
        for index, example in enumerate(context.pool):
            by_category[example.category].append(index)
        categories = sorted(by_category)
        rng.shuffle(categories)
        for members in by_category.values():
            rng.shuffle(members)
        chosen: list[int] = []
        while len(chosen) < context.k:
            for category in categories:
                if by_category[category] and len(chosen) < context.k:
                    chosen.append(by_category[category].pop())
        return Selection(self.name, context.k, context.seed, [context.pool[i].id for i in chosen], [1.0] * context.k,
                         f"random within {len(categories)} categories, round-robin (seed {context.seed})",
                         {"categories": [context.pool[i].category for i in chosen]})
