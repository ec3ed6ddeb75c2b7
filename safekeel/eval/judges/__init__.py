"""Judges: decide whether a response refuses, and whether it is coherent text at all.

A judge is registered by name; a new one is one file that calls @register_judge.
"""

from safekeel.eval.judges.base import Judgement, Judge, get_judge, known_judges, register_judge

# importing the built-in judges registers them
from safekeel.eval.judges import keyword as _keyword  # noqa: F401,E402
from safekeel.eval.judges import classifier as _classifier  # noqa: F401,E402
from safekeel.eval.judges import content as _content  # noqa: F401,E402

__all__ = ["Judge", "Judgement", "get_judge", "known_judges", "register_judge"]
