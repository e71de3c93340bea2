"""Stage 3, mixed-input training: CPT with a fraction p (paper: 0.1) of chunks left as raw tokens, in place,
so the decoder learns to read any mix of compressed and expanded chunks (what selective expansion feeds it)."""

from __future__ import annotations

from refrag.errors import InputError
from refrag.modeling import RefragModel
from refrag.train.common import StageOptions
from refrag.train.cpt import next_paragraph
from refrag.train.data import TokenCorpus
from refrag.train.loop import TrainOptions, TrainResult


def mixed(model: RefragModel, corpus: TokenCorpus, options: StageOptions, train_options: TrainOptions) -> TrainResult:
    if not options.expand_fraction:
        raise InputError("mixed-input training needs --expand-fraction > 0 (paper: 0.1).")
    return next_paragraph("mixed", model, corpus, options, train_options)
