"""Median REFRAG prefill time of compressors side by side in ONE process (precomputed chunk vectors, s tokens of
held-out wiki text, no expansion), so machine noise hits them alike; what `bench ttft` runs one process per model.

    python scripts/time_prefill.py refrag/checkpoints/smollm2-135m-self-k16 runs/export-other --s 4096 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from refrag.checkpoint import load_model
from refrag.config import SamplingOptions
from refrag.generation import Request, generate

TEXT = "../shared/data/wiki_paragraph_segmentation_en.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--s", type=int, default=4096, help="context tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--text", default=TEXT, help="a text file the context is cut from (held-out text)")
    args = parser.parse_args()
    models = [load_model(c, dtype=args.dtype, progress=False) for c in args.checkpoints]
    tokenizer = models[0].tokenizer
    context = tokenizer.decode(tokenizer.encode(Path(args.text).read_text()[: args.s * 8])[: args.s])
    requests = [Request.from_texts("What is it about?", [context], m.tokenizer).with_encodings(m) for m in models]
    times: list[list[float]] = [[] for _ in models]
    for _ in range(args.repeats):  # interleaved: model A, model B, A, B, ...
        for i, (m, r) in enumerate(zip(models, requests)):
            times[i].append(generate(m, [r], sampling=SamplingOptions(max_new_tokens=1))[0].timings.prefill_s)
    for c, m, r, t in zip(args.checkpoints, models, requests, times):
        print(f"{c}: prefill median {statistics.median(t):.3f} s over {len(t)} runs ({len(r.chunks)} chunks, "
              f"adapter scope {m.config.adapter_scope})")


if __name__ == "__main__":
    main()
