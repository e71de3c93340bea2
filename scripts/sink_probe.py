"""Does a raw text token before the chunk vectors change REFRAG's continuation log-ppl? With only [start] and
vectors before it, the continuation's " the" tokens grow a massive activation (an attention sink) that the
full-context decoder does not have there (scripts/hidden_gap.py); a raw token for it before the vectors is the
cheapest fix to try. Windows (s = 512, o = 128) from the last 3M characters of --data; paired against no prefix,
with the same prefix and no context as the control.

    python scripts/sink_probe.py --model refrag/checkpoints/smollm2-135m-self-k16 \
        --data ../shared/data/wiki_paragraph_segmentation_en.txt --windows 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from refrag.checkpoint import load
from refrag.chunking import chunk_token_ids
from refrag.eval.metrics import paired_bootstrap
from refrag.eval.perplexity import example_nll
from refrag.modeling import Layout, RefragModel, start_token

PREFIXES = {"none": "", "the": " the", "newline": "\n", "the x4": " the the the the"}


@torch.no_grad()
def window_nll(model: RefragModel, layouts: list[Layout], batch_size: int = 4) -> list[float]:
    """Mean NLL per target token of each layout (``example_nll`` over batches)."""
    return [x for i in range(0, len(layouts), batch_size) for x in example_nll(model, layouts[i : i + batch_size])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load(args.model, dtype="bfloat16", progress=False)
    text = Path(args.data).read_text(encoding="utf-8")[-3_000_000:]
    ids = np.array(model.tokenizer(text)["input_ids"])  # [N]
    starts = np.random.default_rng(args.seed).integers(0, len(ids) - 640, args.windows)
    targets = [tuple(ids[i + 512 : i + 640].tolist()) for i in starts]
    chunks = [chunk_token_ids(tuple(ids[i : i + 512].tolist()), model.tokenizer, model.k) for i in starts]
    contexts = model.contexts([[c] for c in chunks], [set() for _ in chunks])
    anchor = [] if (t := start_token(model.tokenizer)) is None else [t]
    scores: dict[str, tuple[list[float], list[float]]] = {}
    for name, prefix in PREFIXES.items():
        head = anchor + (model.tokenizer(prefix)["input_ids"] if prefix else [])
        refrag = window_nll(model, [model.scored_layout([head, *c], y) for c, y in zip(contexts, targets)])
        alone = window_nll(model, [model.scored_layout([head], y) for y in targets])
        scores[name] = refrag, alone
        print(f"{name!r}: REFRAG16 {np.mean(refrag):.4f}, no context {np.mean(alone):.4f}", flush=True)
    for name, (refrag, alone) in scores.items():
        if name != "none":
            d, c = paired_bootstrap(refrag, scores["none"][0]), paired_bootstrap(alone, scores["none"][1])
            print(f"{name!r} - none: REFRAG16 {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]; "
                  f"no context {c.mean:+.4f} [{c.low:+.4f}, {c.high:+.4f}]")


if __name__ == "__main__":
    main()
