"""`safekeel data ...`: the public evaluation sets: where each is found, license, checksum; fetching them."""

from __future__ import annotations

from typing import Optional

import typer

from safekeel.cli.common import fail as _fail
from safekeel.data import home as data_home

data_app = typer.Typer(no_args_is_help=True, help="The public evaluation sets: where each is found, license, checksum; fetching them.")


@data_app.command("status")
def data_status_command(names: Optional[list[str]] = typer.Argument(None, help="Data sets (default: all)."),
                        verify: bool = typer.Option(True, help="Check each file found against its recorded sha256."),
                        check: bool = typer.Option(False, help="Exit 1 when a file is missing or its checksum differs.")) -> None:
    """Every public data set safekeel reads: its files, where each was found (or not), license, checksum, source."""
    try:
        found = data_home.status(names, verify=verify)
    except ValueError as error:
        _fail(str(error))
    typer.echo(data_home.describe_status(found))
    if check and any(row.location is None or row.checksum_ok is False for row in found):
        raise typer.Exit(1)


@data_app.command("fetch")
def data_fetch_command(names: Optional[list[str]] = typer.Argument(None, help="Data sets (default: all)."),
                       force: bool = typer.Option(False, help="Download again even when $SAFEKEEL_HOME/data has a verified copy."),
                       timeout: float = typer.Option(data_home.FETCH_TIMEOUT_S, help="Seconds to wait for each download.")) -> None:
    """Download public sets from their canonical sources into $SAFEKEEL_HOME/data, each checked against its recorded
    sha256 (nothing is written on a mismatch). Offline, evaluations read $SAFEKEEL_SHARED_DATA or ../shared/data."""
    try:
        results = data_home.fetch(names, force=force, timeout=timeout)
    except ValueError as error:
        _fail(str(error))
    typer.echo(data_home.describe_fetch(results))
    if any(result.local is None for result in results):
        _fail("files above are neither fetched nor in a local data folder: set SAFEKEEL_SHARED_DATA, or retry with a network")
