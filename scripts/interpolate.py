"""Weight-space interpolation of two checkpoints of one compressor (WiSE-FT, Wortsman et al. 2022): every trained
tensor becomes (1 - alpha) * A + alpha * B, so a fine-tuned checkpoint B can keep part of what its start A did
well (e.g. SFT's answers without losing CPT's perplexity protocol).

    python scripts/interpolate.py refrag/checkpoints/smollm2-135m-self-k16 runs/sft-cloze-replay/final 0.5 runs/wise-50

B must continue A (same encoder, adapter and projector shapes: a later stage of the same run); LoRA factors are
interpolated factor by factor (close to interpolating their product when B moved little from A). The result
keeps B's manifest (stage, config) and is written atomically like any checkpoint.
"""

from __future__ import annotations

import sys

import torch

from refrag.checkpoint import load, save


def main(a_path: str, b_path: str, alpha: float, out: str) -> None:
    if not 0.0 <= alpha <= 1.0:
        sys.exit(f"alpha must be in [0, 1], got {alpha}")
    a, b = load(a_path, dtype="float32", progress=False), load(b_path, dtype="float32", progress=False)
    a_state = dict(a.named_parameters())
    moved = 0
    with torch.no_grad():
        for name, param in b.named_parameters():
            start = a_state.get(name)
            if start is None or start.shape != param.shape:
                sys.exit(f"{b_path} does not continue {a_path}: {name} is missing or has another shape")
            if not torch.equal(start, param):
                param.lerp_(start, 1.0 - alpha)  # param + (1 - alpha) * (start - param)
                moved += 1
    save(b, out)
    print(f"{out}: {moved} tensors interpolated at alpha = {alpha}")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
