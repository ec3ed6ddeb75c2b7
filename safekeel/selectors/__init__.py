"""Selectors pick k safety examples from a pool. Registry: a new selector is one file with
@register_selector. (A subpackage on purpose: a top-level `selectors` would shadow the stdlib's.)"""

from safekeel.selectors.base import Selection, SelectionContext, Selector, get_selector, known_selectors, register_selector

# importing the built-in families registers them
from safekeel.selectors import random_choice as _random_choice  # noqa: F401,E402
from safekeel.selectors import representation as _representation  # noqa: F401,E402
from safekeel.selectors import model_aware as _model_aware  # noqa: F401,E402
from safekeel.selectors import contrastive as _contrastive  # noqa: F401,E402
from safekeel.selectors import universal as _universal  # noqa: F401,E402
from safekeel.selectors import learned as _learned  # noqa: F401,E402

from safekeel.defaults import DEFAULT_SELECTOR  # noqa: E402 (re-exported)

__all__ = ["DEFAULT_SELECTOR", "Selection", "SelectionContext", "Selector", "get_selector", "known_selectors", "register_selector"]
