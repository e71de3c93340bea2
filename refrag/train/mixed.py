"""Stage 3, mixed-input training: CPT with a fraction of the chunks left as raw tokens, in place.

- Trains: as CPT (encoder + projector, and the decoder or its LoRA adapter per ``train_decoder``).
- Input: [start], the context's chunks in order, each independently kept as its k raw tokens with probability p
  (``expand_fraction``, paper 0.1; never all of them) and the rest as chunk vectors, then x_{s+1}..x_{s+o-1}.
- Target: x_{s+1..s+o}; ``distill`` as in CPT. The decoder learns to read any mix of compressed and expanded
  chunks: what selective expansion (``refrag.policy``) feeds it at inference.
- Loop: the shared one (``run_stage``), LR 5e-5 unless given; starts from a cpt checkpoint.
"""

from __future__ import annotations

from refrag.errors import InputError
from refrag.modeling import RefragModel
from refrag.train.common import Recipe, StageOptions, require_continuation, run_stage
from refrag.train.data import TokenCorpus
from refrag.train.loop import TrainOptions, TrainResult

RECIPE = Recipe(stage="mixed", after=("cpt", "mixed"), paper_lr=5e-5)


def mixed(model: RefragModel, corpus: TokenCorpus, options: StageOptions, train_options: TrainOptions) -> TrainResult:
    require_continuation(RECIPE, options)
    if not options.expand_fraction:
        raise InputError("mixed-input training needs --expand-fraction > 0 (paper: 0.1).")
    return run_stage(RECIPE, model, corpus, options, train_options)
