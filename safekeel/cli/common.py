"""What every command shares: logging and thread setup, and the one way to fail."""

from __future__ import annotations

import logging
import os

import typer


def setup(threads: int | None = None) -> None:
    logging.basicConfig(level=os.environ.get("SAFEKEEL_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    import torch  # deferred on purpose: heavy, and not every command needs it

    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)
