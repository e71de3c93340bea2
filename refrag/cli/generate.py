"""`refrag generate`: answer a question from context files, full or compressed."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from refrag.cli.common import (
    ExpansionChoice,
    Json,
    ModelChoice,
    expansion_options,
    model_options,
    print_json,
    setup_torch,
)
from refrag.errors import InputError


def read_context_files(paths: list[Path]) -> list[str]:
    """UTF-8 text of each file; errors name the file."""
    texts = []
    for path in paths:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise InputError(f"context file not found: {path}") from e
        except UnicodeDecodeError as e:
            raise InputError(f"{path} is not UTF-8 text (byte {e.start}); convert it or drop it.") from e
    return texts


@model_options()
@expansion_options()
def generate_cmd(
    context: Annotated[list[Path], typer.Option("--context", "-c", help="context text file(s)")],
    question: Annotated[str, typer.Option("--question", "-q", help="the question")],
    mode: Annotated[str, typer.Option(help="full (plain RAG) or refrag (compressed)")] = "refrag",
    max_new_tokens: Annotated[int, typer.Option(help="answer length cap")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 1.0,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    json_out: Json = False,
    *,
    choice: ModelChoice,
    expansion: ExpansionChoice,
) -> None:
    """Answer QUESTION from the context files; streams the answer, then prints timings."""
    setup_torch()
    from refrag.config import ChunkingOptions, SamplingOptions
    from refrag.generation import Request, generate

    compression = expansion.compression(mode)
    sampling = SamplingOptions(max_new_tokens, temperature, top_p, tuple(stop or ()), seed)
    from refrag.config import check_question

    texts = read_context_files(context)
    check_question(question)  # before the model loads
    if not any(t.strip() for t in texts):
        raise InputError("the context files are empty: give text to answer from.")
    m = choice.load(progress=not json_out)
    request = Request.from_texts(question, texts, m.tokenizer, ChunkingOptions(k=m.k))
    stream = None if json_out else (lambda _row, text: typer.echo(text, nl=False))
    answer = generate(m, [request], compression=compression, sampling=sampling, on_text=stream)[0]
    if json_out:
        print_json({**asdict(answer), "compression": answer.compression, "mode": mode})
        return
    t = answer.timings
    typer.echo(
        f"\n[{mode}] TTFT {t.ttft_s:.3f}s (encode {t.encode_s:.3f}s, policy {t.policy_s:.3f}s, "
        f"prefill {t.prefill_s:.3f}s), raw chunks {list(answer.expanded_chunks)} ({answer.policy}), "
        f"TTIT {t.ttit_s * 1e3:.0f} ms, {len(answer.token_ids)} tokens, decoder positions "
        f"{answer.decoder_positions}, context {answer.context_tokens} tokens -> {answer.context_positions} "
        f"positions ({answer.compression:.1f}x)",
        err=True,
    )
