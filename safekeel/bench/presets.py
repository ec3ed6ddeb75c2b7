"""Every named grid (PRESETS) and load_grid: a preset name or a grid file. The presets live in safekeel.bench.grids
(the selector benchmark's: quick, selectors, full, modes, identity) and safekeel.bench.grids_v2 (issues 31 and 32:
selection_v2, selection_v2_k10, preference, preference_core)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import yaml

from safekeel.bench.grids import GridSpec, full_grid, identity_grid, modes_grid, quick_grid, selectors_grid
from safekeel.bench.grids_v2 import PRESETS_V2

PRESETS: dict[str, Callable[[], GridSpec]] = {"quick": quick_grid, "selectors": selectors_grid, "full": full_grid,
                                              "modes": modes_grid, "identity": identity_grid, **PRESETS_V2}


def load_grid(source: str | Path) -> GridSpec:
    """A preset name (PRESETS: quick, selectors, modes, identity, full, selection_v2, selection_v2_k10, preference, preference_core) or a grid file
    (.json, .yaml, .yml)."""
    if str(source) in PRESETS:
        return PRESETS[str(source)]()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no grid preset or file {str(source)!r} (presets: {', '.join(PRESETS)})")
    if path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text())
    else:
        data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a grid file holds a mapping of GridSpec fields")
    data.setdefault("name", path.stem)
    return GridSpec.from_dict(data)
