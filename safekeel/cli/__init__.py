"""The `safekeel` command line (typer): safekeel.cli.main holds the app."""

from safekeel.cli.main import app, main

__all__ = ["app", "main"]
