"""Stage 2, continual pre-training (next-paragraph prediction): the decoder reads [e_1..e_L, x_{s+1}..] and
predicts x_{s+1..s+o}. Encoder + projector train; the decoder too with --train-decoder full, or a LoRA adapter of
it with --train-decoder lora."""

from __future__ import annotations

from refrag.errors import InputError
from refrag.modeling import RefragModel
from refrag.train.common import StageOptions, set_trainable, stage_task
from refrag.train.data import TokenCorpus
from refrag.train.loop import TrainOptions, TrainResult, train


def next_paragraph(
    stage: str, model: RefragModel, corpus: TokenCorpus, options: StageOptions, train_options: TrainOptions
) -> TrainResult:
    """CPT and mixed-input training share this; they differ in expand_fraction and their stage name."""
    if options.continuation_tokens < 1:
        raise InputError(f"`{stage}` predicts a continuation: set --continuation-tokens (paper: o >= 128).")
    set_trainable(model, options, bf16=train_options.bf16)
    task = stage_task(stage, model, corpus, options, train_options.steps * train_options.batch_size)
    return train(model, task, train_options)


def cpt(model: RefragModel, corpus: TokenCorpus, options: StageOptions, train_options: TrainOptions) -> TrainResult:
    if options.expand_fraction:
        raise InputError("cpt compresses every chunk; use `refrag train mixed` for --expand-fraction.")
    return next_paragraph("cpt", model, corpus, options, train_options)
