"""Median REFRAG prefill time of compressors side by side in ONE process, runs interleaved so machine noise hits
them alike (`refrag bench ttft` times one model per process). The context is `bench ttft`'s own
(`context_request`: s tokens as 256-token passages), its chunk vectors precomputed, no expansion.

    python scripts/time_prefill.py OLD_CHECKPOINT refrag/checkpoints/smollm2-135m-self-k16 --s 4096 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics

from refrag.bench.ttft import context_request
from refrag.checkpoint import load_model
from refrag.config import SamplingOptions
from refrag.generation import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--s", type=int, default=4096, help="context tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    models = [load_model(c, dtype=args.dtype, progress=False) for c in args.checkpoints]
    requests = [context_request(m, args.s).with_encodings(m) for m in models]
    sampling = SamplingOptions(max_new_tokens=1)
    for m, r in zip(models, requests):  # warm-up, untimed
        generate(m, [r], sampling=sampling)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(args.repeats):  # interleaved: model A, model B, A, B, ...
        for i, (m, r) in enumerate(zip(models, requests)):
            times[i].append(generate(m, [r], sampling=sampling)[0].timings.prefill_s)
    for c, m, r, t in zip(args.checkpoints, models, requests, times):
        print(f"{c}: prefill median {statistics.median(t):.3f} s over {len(t)} runs ({len(r.chunks)} chunks, "
              f"adapter scope {m.config.adapter_scope})")


if __name__ == "__main__":
    main()
