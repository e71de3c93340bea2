"""Diagnosis: does a compressor's decoder adapter or its chunk vectors cost QA accuracy? Runs `eval qa`'s
extractive + POLICY rows with the adapter forced ON (text read through the adapter) and its refrag + POLICY rows
with the adapter forced OFF (vectors read by the original decoder), on the first --answer questions of the same
seeded sample as `refrag eval qa --limit 300 --seed 0` (so rows pair with such a run's examples.jsonl by question).
For a compressor whose adapter runs at every position (`adapter_scope: sequence`, e.g. `git archive 06933f9
refrag/checkpoints | tar -x -C /tmp/prev`):

    python scripts/adapter_on_off_qa.py /tmp/prev/refrag/checkpoints/smollm2-135m-self-k16 --answer 150 --out runs/adapter-on-off
    python scripts/compare_runs.py runs/qa14-self:extractive+lexical10% runs/adapter-on-off:extractive+lexical10%
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import asdict
from pathlib import Path

from refrag.checkpoint import load_model
from refrag.eval.qa import QAOptions, _Answerer, load_qa, parse_modes  # _Answerer: a subset of the questions
from refrag.io import write_jsonl_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default="../shared/data/nq_bigbench.jsonl")
    parser.add_argument("--limit", type=int, default=300, help="the sample the distractors are drawn from")
    parser.add_argument("--answer", type=int, default=150, help="questions answered (the sample's first ones)")
    parser.add_argument("--policy", default="lexical")
    parser.add_argument("--expand-fraction", type=float, default=0.1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = load_model(args.checkpoint, progress=False)
    if model.chunk_scoped or not model.has_adapter:
        raise SystemExit(f"{args.checkpoint}: needs a decoder adapter that runs at every position (adapter_scope: sequence).")
    original = model.decoder_for

    @contextlib.contextmanager
    def swapped(compressed: bool, *args_, **kwargs):  # text-only calls get the adapter, compressed ones do not
        with original(not compressed, *args_, **kwargs) as decoder:
            yield decoder

    model.decoder_for = swapped  # type: ignore[method-assign]
    modes = tuple(m for m in parse_modes("extractive,refrag", [args.policy], [args.expand_fraction]) if m.policy)
    examples = load_qa(args.data, limit=args.limit, seed=0)  # the whole sample: its distractors are drawn from it
    answerer = _Answerer(model, examples, QAOptions(modes, passages=3, seed=0), None, None)
    records = [answerer.record(i, mode) for i in range(min(args.answer, len(examples))) for mode in modes]
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(args.out / "examples.jsonl", (asdict(r) for r in records))
    for mode in modes:
        rows = [r for r in records if r.mode == mode.name]
        print(f"{mode.name} (adapter {'on' if mode.kind == 'extractive' else 'off'}): answer-contained "
              f"{sum(r.contains for r in rows) / len(rows):.3f} over {len(rows)} questions")


if __name__ == "__main__":
    main()
