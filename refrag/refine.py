"""Refining a passage's chunk encodings at index time (test-time optimisation of the stored vectors; not in
the paper).

The chunk encoder maps every chunk on its own, so a chunk's vector cannot know what the decoder will already have
read from the chunks before it. A few Adam steps per passage adjust the passage's stored encodings jointly, the
whole model frozen: the decoder reading the passage's first i chunk vectors should predict chunk i + 1 as the
original decoder predicts it reading the first i chunks as text (KL, at a few prefix lengths i). Only the passage
itself is used, never what the decoder will later be asked, so the result is still precomputable per passage
(a passage's refined encodings depend on that passage alone), at ~10 x ``steps`` times the encoding cost.

The encodings stay in the chunk encoder's space (the projector and the decoder read them as they read the
encoder's), so an index stores them as it stores unrefined ones; they are keyed to the whole compressor
(:func:`compressor_fingerprint`), not only to the encoder. A passage's LAST chunk is never a target's prefix end,
so its vector stays the encoder's. Measured: docs/training.md ("Refined chunk vectors").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from refrag.chunking import Chunk
from refrag.encoders import tensors_digest
from refrag.errors import InputError
from refrag.modeling import COMPRESSOR_ADAPTER, Layout, RefragModel, start_token
from refrag.train.objectives import teacher_outputs, token_kl


@dataclass(frozen=True)
class RefineOptions:
    """How stored chunk encodings are refined (saved in an index's manifest; ``add`` reuses them)."""

    steps: int = 10  # Adam steps per passage
    lr: float = 0.05  # step size, relative to each encoding's RMS
    cuts: int = 5  # prefix lengths i per passage (evenly spread over 1 .. chunks - 1)
    group: int = 16  # passages refined together (one batched forward per step)

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.cuts <= 0 or self.group <= 0:
            raise InputError(f"refinement needs positive steps, cuts and group (got {self}).")
        if not 0 < self.lr <= 1:
            raise InputError(f"the refinement step size must be in (0, 1] (got {self.lr}).")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cut_points(chunks: int, cuts: int) -> list[int]:
    """Up to ``cuts`` prefix lengths i in [1, chunks - 1], evenly spread, the last one always chunks - 1: the
    decoder reads i vectors and predicts chunk i (0-based). A one-chunk passage has none."""
    if chunks < 2:
        return []
    return sorted({int(x) for x in np.rint(np.linspace(chunks - 1, 1, min(cuts, chunks - 1)))})


def compressor_fingerprint(model: RefragModel) -> str:
    """sha256 of everything a refined encoding depends on beyond the encoder key: the decoder's name, the adapter's
    scope, the projector's and the decoder's compressor-adapter weights (not the decoder's own weights: a
    decoder is named by its spec; the tokenizer is in the index's key)."""
    tensors = {f"projector.{n}": t for n, t in model.projector.state_dict().items()}
    tensors |= {n: p for n, p in model.decoder.named_parameters() if f".{COMPRESSOR_ADAPTER}." in n}
    return tensors_digest(tensors, prefix=f"{model.config.decoder}|{model.config.adapter_scope}".encode())


def refine_encodings(model: RefragModel, passages: Sequence[Sequence[Chunk]], encoded: torch.Tensor,
                     options: RefineOptions) -> torch.Tensor:
    """[sum L, E] encodings of the passages' chunks (in order) -> the refined encodings, same shape and dtype.

    Each passage's loss is its own mean KL (summed over the group), so a passage is refined as it would be
    alone. The vectors are read as the compressor was trained to read them (``RefragModel.compressor_only``: an
    answer adapter, if any, is off). Works under ``torch.inference_mode`` too; the model's weights get no
    gradient. One-chunk passages are returned as they are (nothing precedes a chunk to predict)."""
    sizes = [len(p) for p in passages]
    if sum(sizes) != encoded.shape[0]:
        raise InputError(f"{encoded.shape[0]} encodings for {sum(sizes)} chunks.")
    out, row = [], 0
    for g in range(0, len(passages), options.group):
        group = passages[g : g + options.group]
        n = sum(sizes[g : g + options.group])
        out.append(_refine_group(model, group, encoded[row : row + n], options))
        row += n
    return torch.cat(out) if out else encoded


def _refine_group(model: RefragModel, passages: Sequence[Sequence[Chunk]], encoded: torch.Tensor,
                  options: RefineOptions) -> torch.Tensor:
    start = start_token(model.tokenizer)
    head = [[start]] if start is not None else []
    cuts: list[tuple[int, int, tuple[int, ...]]] = []  # (first row, i vectors read, the tokens of chunk i)
    teacher: list[Layout] = []
    weights: list[float] = []  # per target token: 1 / the passage's target tokens (each passage's mean KL)
    row = 0
    for chunks in passages:
        mine = [(row, i, chunks[i].token_ids) for i in cut_points(len(chunks), options.cuts)]
        cuts += mine
        teacher += [model.scored_layout([*head, [t for c in chunks[:i] for t in c.token_ids]], nxt)
                    for _, i, nxt in mine]
        tokens = sum(len(nxt) for *_, nxt in mine)
        weights += [1 / max(tokens, 1)] * tokens
        row += len(chunks)
    if not cuts:
        return encoded
    with torch.inference_mode(False), torch.enable_grad(), model.compressor_only():
        target = teacher_outputs(model, teacher)
        per_token = torch.tensor(weights, device=model.device)  # [targets]
        base = encoded.detach().clone().float()  # [N, E]
        scale = base.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)  # [N, 1]
        delta = torch.zeros_like(base, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=options.lr)
        for _ in range(options.steps):
            vectors = model.project(base + scale * delta)  # [N, D]
            layouts = [model.scored_layout([*head, vectors[r : r + i]], nxt) for r, i, nxt in cuts]
            student = model.label_outputs(model.build_inputs(layouts))
            loss = (token_kl(student, target) * per_token).sum()  # the sum of the passages' mean KLs
            (delta.grad,) = torch.autograd.grad(loss, [delta])
            opt.step()
        return (base + scale * delta).detach().to(encoded.dtype)
