"""How well chunk vectors let the decoder (with its LoRA adapter, when the checkpoint has one) read the context
back: token accuracy and log-perplexity of reconstructing n x k held-out tokens from n chunk vectors
(teacher-forced, as in stage 1), for n = 1, 2, 4..."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from refrag.errors import InputError
from refrag.modeling import RefragModel
from refrag.train.curriculum import chunk_types
from refrag.train.data import sample_window, tokenize_source
from refrag.train.objectives import Example, score_examples


@dataclass(frozen=True)
class ReconstructionRow:
    chunks: int  # n: chunk vectors the decoder reads
    tokens: int  # target tokens scored (examples * n * k)
    log_ppl: float  # mean nats per token
    accuracy: float  # top-1 next-token accuracy under teacher forcing


@dataclass(frozen=True)
class ReconstructionReport:
    k: int
    data: str
    examples: int  # per row
    rows: tuple[ReconstructionRow, ...]

    def to_json(self) -> dict:
        return asdict(self)


def eval_reconstruction(
    model: RefragModel,
    data: str,
    *,
    max_chunks: int = 8,
    examples: int = 32,
    seed: int = 0,
    max_tokens: int = 300_000,
    batch_size: int = 8,
    progress: bool = True,
) -> ReconstructionReport:
    """Score reconstruction on ``examples`` seeded windows of ``data`` for each n in 1, 2, 4, .. max_chunks."""
    if examples < 1:
        raise InputError(f"--examples must be >= 1 (got {examples}).")
    tokens = tokenize_source(data, model.tokenizer, max_tokens)
    rows = []
    model.eval()
    types = chunk_types(max_chunks)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(types, desc="reconstruction")
    for n in types:
        rng = np.random.default_rng((seed, n))
        exs = [Example(context=tuple(sample_window(tokens, n * model.k, rng)), continuation=())
               for _ in range(examples)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.dtype == torch.bfloat16):
            score = score_examples(model, exs, batch_size)
        rows.append(ReconstructionRow(chunks=n, tokens=score.tokens, log_ppl=score.log_ppl, accuracy=score.accuracy))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return ReconstructionReport(k=model.k, data=data, examples=examples, rows=tuple(rows))
