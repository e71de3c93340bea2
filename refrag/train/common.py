"""What every recipe does before the loop: load models for a stage (checking the stage order), choose what
trains, and build the stage's examples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from refrag.config import RefragConfig
from refrag.errors import InputError
from refrag.modeling import RefragModel
from refrag.train.checkpoint import stage_of
from refrag.train.curriculum import build_curriculum, chunk_types, flat_order
from refrag.train.data import TokenCorpus
from refrag.train.objectives import StageTask, check_stage_order


@dataclass(frozen=True)
class StageOptions:
    """The data side of a stage."""

    max_chunks: int = 8  # longest context, in chunks (s = max_chunks * k)
    curriculum: bool = True  # Table 8 mixture; False shuffles the same examples (the paper's ablation)
    continuation_tokens: int = 0  # o: tokens to predict after the context (0: reconstruct the context)
    expand_fraction: float = 0.0  # p: chunks left uncompressed at random (mixed-input training: 0.1)
    distill: float = 0.0  # weight of the KL from the full-context decoder (not in the paper; cpt / mixed only)
    train_decoder: Literal["frozen", "full", "lora"] = "frozen"
    train_encoder: bool = True  # False: only the projector (and the decoder per train_decoder) trains
    lora_rank: int = 8  # rank of the decoder's LoRA adapter (train_decoder="lora")
    seed: int = 0
    eval_per_type: int = 8  # held-out examples per number of chunks at each evaluation

    def __post_init__(self) -> None:
        if self.max_chunks < 1:
            raise InputError(f"--max-chunks must be >= 1 (got {self.max_chunks}).")
        if not 0.0 <= self.expand_fraction < 1.0:
            raise InputError(f"--expand-fraction must be in [0, 1) (got {self.expand_fraction}).")
        if not 0.0 <= self.distill <= 1.0:
            raise InputError(f"--distill must be in [0, 1] (got {self.distill}).")
        if self.distill and not self.continuation_tokens:
            raise InputError("--distill needs a continuation to predict: it applies to `cpt` and `mixed`.")
        if self.train_decoder not in ("frozen", "full", "lora"):
            raise InputError(f"--train-decoder must be frozen, full or lora (got {self.train_decoder!r}).")
        if self.lora_rank < 1:
            raise InputError(f"--lora-rank must be >= 1 (got {self.lora_rank}).")


def load_for_stage(
    stage: str, init: str | Path | None, *, decoder: str, encoder: str, k: int, progress: bool = True
) -> RefragModel:
    """fp32 models for ``stage``: from ``init`` (a checkpoint of the allowed previous stage) or fresh."""
    check_stage_order(stage, stage_of(init) if init else None)
    if init:
        return RefragModel.load(init, dtype="float32", progress=progress)
    config = RefragConfig(decoder=decoder, encoder=encoder, k=k, dtype="float32")
    return RefragModel.from_config(config, progress=progress)


def set_trainable(model: RefragModel, options: StageOptions, *, bf16: bool) -> None:
    """The projector always trains, the encoder unless ``train_encoder`` is off. The decoder is frozen, fully
    trained, or adapted with LoRA (added here unless the checkpoint already holds an adapter, which then trains
    further). Under bf16 training, frozen decoder weights are cast to bf16: no master copy is needed for weights
    that never change, and bf16 matmuls are 2-3x faster with AMX."""
    train_decoder = options.train_decoder
    if model.has_adapter and train_decoder == "full":
        raise InputError("this checkpoint's decoder has a LoRA adapter: continue with --train-decoder lora.")
    if train_decoder == "lora" and not model.has_adapter:
        model.add_lora(options.lora_rank)
    model.encoder.requires_grad_(options.train_encoder)
    model.projector.requires_grad_(True)
    model.decoder.requires_grad_(train_decoder == "full")
    for name, p in model.decoder.named_parameters():
        if train_decoder == "lora" and "lora_" in name:
            p.requires_grad_(True)
        elif not p.requires_grad and bf16:  # weights only: buffers (rotary inv_freq) stay fp32 as at inference
            p.data = p.data.to(torch.bfloat16)


def stage_task(stage: str, model: RefragModel, corpus: TokenCorpus, options: StageOptions, examples: int) -> StageTask:
    """The stage's examples: ``examples`` in total, over 1..max_chunks chunks (curriculum or shuffled)."""
    order = (build_curriculum(options.max_chunks, examples).order(options.seed) if options.curriculum
             else flat_order(options.max_chunks, examples, options.seed))
    return StageTask(
        stage=stage, train_tokens=corpus.train, val_tokens=corpus.val, k=model.k, order=order,
        continuation_tokens=options.continuation_tokens, expand_fraction=options.expand_fraction,
        distill=options.distill, seed=options.seed, eval_chunks=tuple(chunk_types(options.max_chunks)),
        eval_per_type=options.eval_per_type,
    )
