"""A universal set: one fixed ranking of the authored pool, found once on the development datasets; no per-job cost.

The product's cheapest answer to "the user's data is unknown until the job": `universal` returns the first k
examples of a ranking shipped in assets/universal_set.json, whatever the user data, model or seed (the seed and
the data are ignored: the same k examples every time). The ranking was found from the committed benchmark grids
on the development datasets only (safekeel.bench.selection_fit.universal_ranking; its provenance, the command
that rebuilds it and the hash of the outcomes it used are in the file): each pool example is credited with the
mean, over the runs that replayed it, of the run's harmful rate plus over-refusal minus the mean of its block
(the other selections of the same dataset, k and training seed), shrunk towards zero for examples seen in few
runs; the ranking takes harm categories in turn (ordered by their best example), so every prefix covers
categories. Whether it holds on datasets it was not found on is the selection_v2 grid's question.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from safekeel.selectors.base import Selection, SelectionContext, register_selector

ASSET = "universal_set.json"


def asset_path() -> Path:
    return Path(str(resources.files("safekeel.selectors") / "assets" / ASSET))


@lru_cache(maxsize=4)
def load_universal(path: str | None = None) -> dict:
    source = Path(path) if path else asset_path()
    if not source.is_file():
        raise FileNotFoundError(f"no universal set at {source}: build it with python benchmarks/universal_set.py")
    data = json.loads(source.read_text())
    if not isinstance(data.get("ranking"), list) or not data["ranking"]:
        raise ValueError(f"{source}: no ranking")
    return data


@register_selector("universal")
class UniversalSelector:
    """The first k of one fixed ranking found on the development datasets (no per-job selection cost)."""

    name = "universal"
    path: str | None = None

    def select(self, context: SelectionContext) -> Selection:
        data = load_universal(self.path)
        in_pool = {e.id for e in context.pool}
        ranking = [entry["id"] for entry in data["ranking"]]
        if context.k > len(ranking):
            raise ValueError(f"the universal set ranks {len(ranking)} examples: k={context.k} is more")
        missing = [i for i in ranking[: context.k] if i not in in_pool]
        if missing:
            raise ValueError(f"the universal set ranks the {data.get('pool', 'authored')!r} pool's examples; this pool lacks "
                             f"{missing[:3]}{' ...' if len(missing) > 3 else ''} (use pool {data.get('pool', 'authored')!r})")
        chosen = data["ranking"][: context.k]
        categories = {e.id: e.category for e in context.pool}
        return Selection(
            self.name, context.k, context.seed, [entry["id"] for entry in chosen], [entry["credit"] for entry in chosen],
            f"the first {context.k} of the universal ranking (built on {', '.join(data['provenance']['datasets'])} from the "
            f"committed grids; the same examples for every job); score = credit (centred outcome, lower is better)",
            {"categories": [categories[entry["id"]] for entry in chosen],
             "universal_set_sha256": data["provenance"].get("outcomes_sha256"),
             "pool_matches": data.get("pool_sha256") == context.pool_digest})
