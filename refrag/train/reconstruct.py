"""Stage 1, reconstruction: encoder + projector learn chunk vectors from which the decoder can read the k tokens
back (prefix e_1..e_L, then x_1..x_{s-1} teacher-forced, loss on x_1..x_s).

The paper keeps the decoder frozen (the default). ``train_decoder="lora"`` also trains a LoRA adapter of the
decoder, which applies to compressed inputs only (text-only inputs run the original decoder): a small decoder
learns to read chunk vectors far faster with it (docs/training.md). Full decoder training is refused here: it
would change the decoder every text-only baseline relies on."""

from __future__ import annotations

from refrag.errors import InputError
from refrag.modeling import RefragModel
from refrag.train.common import StageOptions, set_trainable, stage_task
from refrag.train.data import TokenCorpus
from refrag.train.loop import TrainOptions, TrainResult, train


def reconstruct(model: RefragModel, corpus: TokenCorpus, options: StageOptions, train_options: TrainOptions) -> TrainResult:
    if options.continuation_tokens or options.expand_fraction or options.train_decoder == "full":
        raise InputError("reconstruction keeps the decoder frozen (or adapts it with LoRA) and predicts the context "
                         "itself: drop --continuation-tokens and --expand-fraction; --train-decoder is frozen or lora.")
    set_trainable(model, options, bf16=train_options.bf16)
    task = stage_task("reconstruct", model, corpus, options, train_options.steps * train_options.batch_size)
    return train(model, task, train_options)


