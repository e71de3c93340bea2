"""Options and helpers shared by CLI commands (model selection, JSON output)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from refrag.config import DEFAULT_DECODER, DEFAULT_ENCODER

Checkpoint = Annotated[
    str | None, typer.Option("--model", "-m", help="refrag checkpoint folder (default: the shipped compressor)")
]
Decoder = Annotated[str, typer.Option(help="decoder: built-in name, folder or Hugging Face id")]
Encoder = Annotated[str, typer.Option(help="chunk encoder: built-in name, folder or Hugging Face id")]
K = Annotated[int, typer.Option("--k", help="decoder tokens per compressed chunk")]
DType = Annotated[str, typer.Option(help="bfloat16 (fast on CPUs with AMX) or float32")]
Json = Annotated[bool, typer.Option("--json", help="print machine-readable JSON only")]

DEFAULTS = {"decoder": DEFAULT_DECODER, "encoder": DEFAULT_ENCODER}


def setup_torch() -> None:
    """Quiet third-party logs; use every core (2 on the reference machine)."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # per-load "Loading weights" bars; refrag shows its own progress


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))
