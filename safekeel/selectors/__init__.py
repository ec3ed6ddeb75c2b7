"""Selectors pick k safety examples from a pool. Registry: a new selector is one file with
@register_selector. (A subpackage on purpose: a top-level `selectors` would shadow the stdlib's.)"""

from safekeel.selectors.base import Selection, SelectionContext, Selector, get_selector, known_selectors, register_selector

# importing the built-in families registers them
from safekeel.selectors import random_choice as _random_choice  # noqa: F401,E402
from safekeel.selectors import representation as _representation  # noqa: F401,E402
from safekeel.selectors import model_aware as _model_aware  # noqa: F401,E402

DEFAULT_SELECTOR = "forgetting"
"""What `safekeel finetune`, `safekeel select` and fine-tuning jobs use unless told otherwise: the one selector
that beat seeded random selection in a pre-registered test (benchmarks/results/confirm.md: k=10, replay, authored
pool, 8 fresh seeds x 3 user datasets, harmful rate -0.064 [-0.095, -0.034], one-sided Wilcoxon p = 0.0011, no
worse over-refusal or held-out loss). It costs a few minutes more than `random` on CPU (8 LoRA steps and the
pool's loss before and after; the confirmatory runs took a median 313-388 s against random's 184-262 s);
`random` is the cheap alternative."""

__all__ = ["DEFAULT_SELECTOR", "Selection", "SelectionContext", "Selector", "get_selector", "known_selectors", "register_selector"]
