"""How well chunk vectors let the decoder (with its LoRA adapter, when the checkpoint has one) read the context
back: token accuracy and log-perplexity of reconstructing n x k held-out tokens from n chunk vectors
(teacher-forced, as in stage 1), for n = 1, 2, 4...; with ``greedy``, also the decoder GENERATING each 1 x k chunk
from its vector alone (exact-chunk rate and accuracy per position): teacher-forced accuracy can be high while
greedy generation still fails, since one wrong token derails the rest."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from refrag.chunking import chunk_token_ids
from refrag.errors import InputError
from refrag.modeling import RefragModel, start_token
from refrag.train.curriculum import chunk_types
from refrag.train.data import sample_window, tokenize_source
from refrag.train.objectives import Example, score_examples

MAX_TOKENS = 300_000  # of the held-out text read (windows are sampled from them)


@dataclass(frozen=True)
class ReconstructionRow:
    chunks: int  # n: chunk vectors the decoder reads
    tokens: int  # target tokens scored (examples * n * k)
    log_ppl: float  # mean nats per token
    accuracy: float  # top-1 next-token accuracy under teacher forcing


@dataclass(frozen=True)
class GreedyReconstruction:
    """The decoder generating a chunk from its one vector: [start] e -> k tokens, greedily."""

    chunks: int  # chunks generated (one vector each)
    exact: float  # share of chunks reproduced token for token
    position_accuracy: tuple[float, ...]  # [k] share right at each position (after the model's own earlier tokens)


@dataclass(frozen=True)
class ReconstructionReport:
    k: int
    data: str
    examples: int  # per row
    rows: tuple[ReconstructionRow, ...]
    greedy: GreedyReconstruction | None = None

    def to_json(self) -> dict:
        return asdict(self)


def eval_reconstruction(
    model: RefragModel,
    data: str,
    *,
    max_chunks: int = 8,
    examples: int = 32,
    seed: int = 0,
    batch_size: int = 8,
    greedy: bool = False,
    progress: bool = True,
) -> ReconstructionReport:
    """Score reconstruction on ``examples`` seeded windows of ``data`` for each n in 1, 2, 4, .. max_chunks (and,
    with ``greedy``, generate the 1-chunk examples from their vectors)."""
    if examples < 1:
        raise InputError(f"--examples must be >= 1 (got {examples}).")
    tokens = tokenize_source(data, model.tokenizer, MAX_TOKENS)
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
    greedy_row = None
    if greedy:
        rng = np.random.default_rng((seed, 1))  # the same windows as the 1 x k row
        targets = [tuple(sample_window(tokens, model.k, rng)) for _ in range(examples)]
        greedy_row = greedy_reconstruction(model, targets, batch_size)
    return ReconstructionReport(k=model.k, data=data, examples=examples, rows=tuple(rows), greedy=greedy_row)


@torch.inference_mode()
def greedy_reconstruction(model: RefragModel, targets: list[tuple[int, ...]], batch_size: int = 8) -> GreedyReconstruction:
    """Each target chunk (k decoder tokens) encoded to one vector; the decoder reads [start] e and generates k
    tokens greedily (no KV cache: k short forwards); scored against the chunk."""
    if not targets:
        raise InputError("greedy reconstruction needs at least one chunk.")
    k, start = len(targets[0]), start_token(model.tokenizer)
    head = [] if start is None else [start]
    right = torch.zeros(k)
    exact = 0
    for first in range(0, len(targets), batch_size):
        batch = targets[first : first + batch_size]
        vectors = model.embed_chunks([chunk_token_ids(t, model.tokenizer, k)[0] for t in batch])  # [b, D]
        made: list[list[int]] = [[] for _ in batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.dtype == torch.bfloat16):
            for _ in range(k):
                layouts = [model.layout([head, vectors[i : i + 1], made[i]]) for i in range(len(batch))]
                nxt = model.decoder_logits(model.build_inputs(layouts))[:, -1].argmax(-1).tolist()  # [b]
                for row, token in zip(made, nxt):
                    row.append(int(token))
        hits = torch.tensor([[a == b for a, b in zip(m, t)] for m, t in zip(made, batch)], dtype=torch.float)
        right += hits.sum(0)
        exact += int(hits.all(1).sum())
    n = len(targets)
    return GreedyReconstruction(chunks=n, exact=exact / n, position_accuracy=tuple((right / n).tolist()))
