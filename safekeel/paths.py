"""Where safekeel keeps its caches (models, runs) and where it finds the shared reference data."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def safekeel_home() -> Path:
    """Cache root: $SAFEKEEL_HOME, else ~/.cache/safekeel."""
    home = os.environ.get("SAFEKEEL_HOME")
    path = Path(home).expanduser() if home else Path.home() / ".cache" / "safekeel"
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    path = safekeel_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir() -> Path | None:
    """The public reference data (../shared/data beside the checkout), or $SAFEKEEL_SHARED_DATA.

    Returns None when it is absent: callers that need it raise or skip with a clear reason.
    """
    env = os.environ.get("SAFEKEEL_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return None


def require_shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        raise FileNotFoundError(
            "the shared reference data (../shared/data beside the checkout, or $SAFEKEEL_SHARED_DATA) "
            "is not present; it holds AdvBench, XSTest and GSM8K used for evaluation"
        )
    return path
