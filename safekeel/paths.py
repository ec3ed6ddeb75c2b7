"""Where safekeel keeps its caches (models, runs, fetched evaluation data) and where it looks for the public
reference data (the evaluation sets: see `safekeel.data.home` and `safekeel data status`)."""

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


def data_home() -> Path:
    """Where `safekeel data fetch` puts the public evaluation sets: $SAFEKEEL_HOME/data (not created here)."""
    return safekeel_home() / "data"


def local_data_dirs() -> list[tuple[str, Path]]:
    """Local folders that may hold the public reference data, in the order they are searched, each with the
    label messages use: $SAFEKEEL_SHARED_DATA (when set), ../shared/data beside the checkout, and
    ../shared/data beside the working directory."""
    found: list[tuple[str, Path]] = []
    env = os.environ.get("SAFEKEEL_SHARED_DATA")
    if env:
        found.append(("$SAFEKEEL_SHARED_DATA", Path(env).expanduser()))
    beside = REPO_ROOT.parent / "shared" / "data"
    found.append(("../shared/data beside the checkout", beside))
    from_cwd = Path.cwd().parent / "shared" / "data"
    if from_cwd.resolve() != beside.resolve():
        found.append(("../shared/data beside the working directory", from_cwd))
    return found


def data_search_path() -> list[tuple[str, Path]]:
    """Every folder a reference data file is looked for in, in order: $SAFEKEEL_SHARED_DATA (an explicit
    choice wins), then $SAFEKEEL_HOME/data (what `safekeel data fetch` downloaded), then ../shared/data."""
    local = local_data_dirs()
    explicit = [entry for entry in local if entry[0] == "$SAFEKEEL_SHARED_DATA"]
    return explicit + [("$SAFEKEEL_HOME/data", data_home())] + [entry for entry in local if entry not in explicit]


def shared_data_dir() -> Path | None:
    """The local folder of public reference data (../shared/data beside the checkout, or $SAFEKEEL_SHARED_DATA).

    Returns None when it is absent: callers that need it raise or skip with a clear reason. Single files are
    better found with `safekeel.data.home.data_file`, which also looks in $SAFEKEEL_HOME/data.
    """
    for _, candidate in local_data_dirs():
        if candidate.is_dir():
            return candidate.resolve()
    return None


def require_shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        raise FileNotFoundError(
            "the shared reference data (../shared/data beside the checkout, or $SAFEKEEL_SHARED_DATA) "
            "is not present; it holds AdvBench, XSTest and GSM8K used for evaluation. Run `safekeel data status` "
            "to see what is missing and `safekeel data fetch` to download the public sets into $SAFEKEEL_HOME/data"
        )
    return path
