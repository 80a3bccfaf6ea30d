"""`awqpad verify` (not yet implemented)."""

from __future__ import annotations

import typer

HELP = "Not yet implemented."


def verify(args: list[str] = typer.Argument(None, hidden=True)) -> None:
    typer.echo("awqpad verify: not yet implemented", err=True)
    raise typer.Exit(2)
