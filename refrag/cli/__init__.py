"""The `refrag` command line: one command per verb, each a thin wrapper over a plain Python function.

Each command group lives in its own module and imports heavy libraries (torch, transformers) inside the
command, so `refrag --help` stays fast. Errors from refrag's boundary print as one clear line (exit 2).
"""

from __future__ import annotations

import sys

import typer

from refrag.cli import ask, bench, data, generate, index, models, serve, train
from refrag.cli import eval as eval_cli
from refrag.errors import RefragError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="REFRAG: compressed-context RAG.")
app.add_typer(models.app, name="models")
app.add_typer(bench.app, name="bench")
app.add_typer(index.app, name="index")
app.add_typer(train.app, name="train")
app.add_typer(eval_cli.app, name="eval")
app.add_typer(data.app, name="data")
app.command("generate")(generate.generate_cmd)
app.command("search")(ask.search_cmd)
app.command("ask")(ask.ask_cmd)
app.command("report")(eval_cli.report_cmd)
app.command("serve")(serve.serve_cmd)


def main() -> None:
    command = typer.main.get_command(app)
    try:
        command.main(prog_name="refrag")  # click handles bad flags (exit 2) and Ctrl-C itself
    except RefragError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
