"""One place that turns what a user typed (a checkpoint, or decoder + encoder specs) into a RefragModel."""

from __future__ import annotations

import logging
from pathlib import Path

from refrag.config import DEFAULT_DECODER, DEFAULT_ENCODER, RefragConfig
from refrag.modeling import MANIFEST, RefragModel

log = logging.getLogger(__name__)

# The compressor trained for the embedded default models (SmolLM2-135M + all-MiniLM-L6-v2, k=16).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "smollm2-135m-minilm-k16"


def load_model(
    checkpoint: str | Path | None = None,
    *,
    decoder: str = DEFAULT_DECODER,
    encoder: str = DEFAULT_ENCODER,
    k: int = 16,
    dtype: str = "bfloat16",
    progress: bool = True,
    merge: bool = True,
) -> RefragModel:
    """A trained checkpoint when given (or the shipped default for the default models), else fresh parts.

    ``merge`` keeps a merged copy of an adapted decoder for compressed inputs (faster decoding, one more
    decoder's memory, ~1 s); commands that only encode chunks (index build/add/bench) pass False.

    A fresh projector is untrained: compressed chunks are then noise to the decoder (full mode is unaffected).
    """
    is_default = (decoder, encoder, k) == (DEFAULT_DECODER, DEFAULT_ENCODER, 16)
    if checkpoint is None and is_default and (DEFAULT_CHECKPOINT / MANIFEST).exists():
        checkpoint = DEFAULT_CHECKPOINT
    if checkpoint is not None:
        model = RefragModel.load(checkpoint, dtype=dtype, progress=progress)
        if merge:
            model.merge_adapter()  # a no-op without an adapter
        return model
    model = RefragModel.from_config(
        RefragConfig(decoder=decoder, encoder=encoder, k=k, dtype=dtype), progress=progress  # type: ignore[arg-type]
    )
    log.warning("no trained compressor for %s + %s at k=%d: the projector is untrained", decoder, encoder, k)
    return model
