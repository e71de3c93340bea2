"""Stage 2, continual pre-training (next-paragraph prediction).

- Trains: encoder (unless ``train_encoder`` is off) + projector; the decoder too with ``train_decoder="full"``,
  or a LoRA adapter of it with ``"lora"`` (then it applies to compressed inputs only).
- Input: [start] e_1..e_L (every chunk of the s context tokens compressed), then x_{s+1}..x_{s+o-1}.
- Target: x_{s+1..s+o}, the continuation (o = ``continuation_tokens``); with ``distill`` > 0 part of the loss is
  the KL from the original decoder reading the full context as tokens (not in the paper).
- Loop: the shared one (``run_stage``): curriculum, LR 5e-5 unless given; starts from a reconstruct checkpoint.
"""

from __future__ import annotations

from refrag.errors import InputError
from refrag.modeling import RefragModel
from refrag.train.common import Recipe, StageOptions, require_continuation, run_stage
from refrag.train.data import TokenCorpus
from refrag.train.loop import TrainOptions, TrainResult

RECIPE = Recipe(stage="cpt", after=("reconstruct", "cpt"), paper_lr=5e-5)


def cpt(model: RefragModel, corpus: TokenCorpus, options: StageOptions, train_options: TrainOptions) -> TrainResult:
    require_continuation(RECIPE, options)
    if options.expand_fraction:
        raise InputError("cpt compresses every chunk; use `refrag train mixed` for --expand-fraction.")
    return run_stage(RECIPE, model, corpus, options, train_options)
