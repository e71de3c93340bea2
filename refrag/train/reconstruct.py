"""Stage 1, reconstruction (the paper's alignment stage).

- Trains: encoder + projector; a LoRA adapter of the decoder with ``train_decoder="lora"`` (the paper keeps the
  decoder frozen, the default). Full decoder training is refused: it would change the decoder every text-only
  baseline relies on. The adapter applies to compressed inputs only (text-only inputs run the original decoder);
  a small decoder learns to read chunk vectors far faster with it (docs/training.md).
- Input: [start] e_1..e_L (the context's L chunk vectors), then x_1..x_{s-1} teacher-forced.
- Target: x_1..x_s, the context itself (no continuation, nothing expanded).
- Loop: the shared one (``run_stage``): curriculum over 1..max_chunks chunks, LR 2e-4 unless given.
"""

from __future__ import annotations

from refrag.errors import InputError
from refrag.modeling import RefragModel
from refrag.train.common import Recipe, StageOptions, run_stage
from refrag.train.data import TokenCorpus
from refrag.train.loop import TrainOptions, TrainResult

RECIPE = Recipe(stage="reconstruct", after=(None, "reconstruct"), paper_lr=2e-4)


def reconstruct(model: RefragModel, corpus: TokenCorpus, options: StageOptions, train_options: TrainOptions) -> TrainResult:
    if options.continuation_tokens or options.expand_fraction or options.train_decoder == "full":
        raise InputError("reconstruction keeps the decoder frozen (or adapts it with LoRA) and predicts the context "
                         "itself: drop --continuation-tokens and --expand-fraction; --train-decoder is frozen or lora.")
    return run_stage(RECIPE, model, corpus, options, train_options)
