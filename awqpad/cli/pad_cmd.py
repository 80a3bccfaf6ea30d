"""`awqpad pad` (not yet implemented)."""

from __future__ import annotations

import typer

HELP = "Not yet implemented."


def pad(args: list[str] = typer.Argument(None, hidden=True)) -> None:
    typer.echo("awqpad pad: not yet implemented", err=True)
    raise typer.Exit(2)
