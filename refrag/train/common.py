"""What every recipe shares: the recipe's own facts (stage, what it may start from, the paper's learning rate),
loading models for a stage (checking the stage order), choosing what trains, and the stage's examples."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from refrag import checkpoint
from refrag.config import AdapterScope, RefragConfig, check_choice, check_fraction
from refrag.errors import CheckpointError, InputError
from refrag.modeling import RefragModel
from refrag.train.curriculum import build_curriculum, chunk_types, flat_order
from refrag.train.data import TokenCorpus
from refrag.train.loop import TrainOptions, TrainResult, train
from refrag.train.objectives import StageTask

log = logging.getLogger(__name__)

DEFAULT_LORA_RANK = 8  # a new decoder adapter's rank when --lora-rank is not given
Stage = Literal["reconstruct", "cpt", "mixed", "policy", "sft"]
TrainDecoder = Literal["frozen", "full", "lora"]


@dataclass(frozen=True)
class Recipe:
    """A stage's fixed facts, declared in the stage's own module."""

    stage: Stage
    after: tuple[Stage | None, ...]  # stages whose checkpoint it may start from (None: fresh models)
    paper_lr: float  # peak learning rate when --lr is not given


@dataclass(frozen=True)
class StageOptions:
    """The data side of a stage."""

    max_chunks: int = 8  # longest context, in chunks (s = max_chunks * k)
    curriculum: bool = True  # Table 8 mixture; False shuffles the same examples (the paper's ablation)
    continuation_tokens: int = 0  # o: tokens to predict after the context (0: reconstruct the context)
    expand_fraction: float = 0.0  # p: chunks left uncompressed at random (mixed-input training: 0.1)
    distill: float = 0.0  # weight of the KL from the full-context decoder (not in the paper; cpt / mixed only)
    distill_hidden: float = 0.0  # weight of every layer's hidden-state distance from that decoder's at the targets
    train_decoder: TrainDecoder = "frozen"
    train_encoder: bool = True  # False: only the projector (and the decoder per train_decoder) trains
    lora_rank: int | None = None  # train_decoder="lora": a new adapter's rank (None: DEFAULT_LORA_RANK); with an
    # init that has an adapter, a larger rank widens it (RefragModel.widen_adapter), None or its rank keeps it
    adapter_scope: AdapterScope | None = None  # where that adapter applies (None: as the checkpoint / config has it)
    seed: int = 0
    eval_per_type: int = 8  # held-out examples per number of chunks at each evaluation

    def __post_init__(self) -> None:
        if self.max_chunks < 1:
            raise InputError(f"--max-chunks must be >= 1 (got {self.max_chunks}).")
        check_fraction(self.expand_fraction, "--expand-fraction", below_one=True)
        if not 0.0 <= self.distill <= 1.0:
            raise InputError(f"--distill must be in [0, 1] (got {self.distill}).")
        if self.distill_hidden < 0:
            raise InputError(f"--distill-hidden must be >= 0 (got {self.distill_hidden}).")
        if (self.distill or self.distill_hidden) and not self.continuation_tokens:
            raise InputError("--distill and --distill-hidden need a continuation to predict: they apply to `cpt` and "
                             "`mixed`.")
        if self.train_decoder not in ("frozen", "full", "lora"):
            raise InputError(f"--train-decoder must be frozen, full or lora (got {self.train_decoder!r}).")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise InputError(f"--lora-rank must be >= 1 (got {self.lora_rank}).")
        if self.adapter_scope is not None:
            check_choice(self.adapter_scope, AdapterScope, "--adapter-scope")


def check_stage_order(recipe: Recipe, init_stage: str | None) -> None:
    """Refuse to start a stage from a checkpoint of the wrong previous stage (the order matters)."""
    if init_stage in recipe.after:
        return
    got = f"a `{init_stage}` checkpoint" if init_stage else "fresh (untrained) models"
    if recipe.after[0] is None:
        fix = "start it from fresh models (no --init) or from a `reconstruct` checkpoint"
    else:
        fix = f"run `refrag train {recipe.after[0]}` first and pass its output folder with --init"
    raise CheckpointError(
        f"`refrag train {recipe.stage}` cannot start from {got}: the recipe is reconstruct -> cpt -> mixed "
        f"(the paper's ablations show the order matters); {fix}."
    )


def load_for_stage(recipe: Recipe, init: str | Path | None, fresh: RefragConfig | None = None, *,
                   progress: bool = True) -> RefragModel:
    """fp32 models for the stage: from ``init`` (a checkpoint of an allowed previous stage) or ``fresh`` parts.
    An answer adapter in ``init`` stays behind: it was trained for the compressor as it is, and no stage
    continues it (``train sft --learn adapter`` trains a fresh one)."""
    manifest = checkpoint.CheckpointManifest.read(Path(init)) if init else None
    check_stage_order(recipe, manifest.compressor_stage if manifest else None)  # what continues: the compressor
    if init:
        model = checkpoint.load(init, dtype="float32", progress=progress, answer_adapter=False)
        if manifest and manifest.answer_adapter is not None:
            log.warning("%s has an answer adapter: it is left out of this stage (no stage trains it further; the "
                        "new checkpoint has its compressor only, or a fresh answer adapter with --learn adapter)", init)
            extra = {k: v for k, v in model.config.extra.items() if k != checkpoint.COMPRESSOR_STAGE}
            model.config = replace(model.config, extra={**extra, "stage": manifest.compressor_stage})
        return model
    return checkpoint.from_config(replace(fresh or RefragConfig(), dtype="float32"), progress=progress)


def set_trainable(model: RefragModel, options: StageOptions, *, bf16: bool) -> None:
    """The projector always trains, the encoder unless ``train_encoder`` is off. The decoder is frozen, fully
    trained, or adapted with LoRA (added here unless the checkpoint already holds an adapter, which then trains
    further, widened first to ``lora_rank`` if that is given and larger). Under bf16 training, frozen decoder
    weights are cast to bf16: no master copy is needed for weights that never change, and bf16 matmuls are 2-3x
    faster with AMX."""
    train_decoder = options.train_decoder
    if model.has_answer_adapter:
        raise InputError("this checkpoint has an answer adapter trained on its compressor as it is: train the "
                         "compressor further from the checkpoint the answer adapter was trained from (its --init).")
    if model.has_adapter and train_decoder == "full":
        raise InputError("this checkpoint's decoder has a LoRA adapter: continue with --train-decoder lora.")
    if options.lora_rank is not None and train_decoder != "lora":
        raise InputError("--lora-rank sizes the decoder's LoRA adapter: it needs --train-decoder lora.")
    if options.adapter_scope is not None:
        if train_decoder != "lora" and not model.has_adapter:
            raise InputError("--adapter-scope places the decoder's LoRA adapter: it needs --train-decoder lora.")
        model.set_adapter_scope(options.adapter_scope)
    if train_decoder == "lora" and not model.has_adapter:
        model.add_lora(options.lora_rank or DEFAULT_LORA_RANK)
    elif train_decoder == "lora" and options.lora_rank is not None:
        model.widen_adapter(options.lora_rank)
    model.encoder.set_trainable(options.train_encoder)
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
        distill=options.distill, distill_hidden=options.distill_hidden, seed=options.seed,
        eval_chunks=tuple(chunk_types(options.max_chunks)),
        eval_per_type=options.eval_per_type,
    )


def require_continuation(recipe: Recipe, options: StageOptions) -> None:
    """The next-paragraph stages predict a continuation."""
    if options.continuation_tokens < 1:
        raise InputError(f"`{recipe.stage}` predicts a continuation: set --continuation-tokens (paper: o >= 128).")


def run_stage(recipe: Recipe, model: RefragModel, corpus: TokenCorpus, options: StageOptions,
              train_options: TrainOptions) -> TrainResult:
    """Mark what trains, build the stage's examples, run the shared loop (at the paper's LR unless given)."""
    set_trainable(model, options, bf16=train_options.bf16)
    train_options = replace(train_options, lr=train_options.lr or recipe.paper_lr)
    task = stage_task(recipe.stage, model, corpus, options, train_options.steps * train_options.batch_size)
    return train(model, task, train_options)
