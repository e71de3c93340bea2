"""Where in the continuation does REFRAG lose to truncation? Mean NLL per output position, bucketed, for the
perplexity protocol's methods (no context, full, truncated to the same positions, REFRAG_k) on held-out windows.

    python scripts/loss_by_position.py --model refrag/checkpoints/smollm2-135m-self-k16 \
        --data ../shared/data/wiki_paragraph_segmentation_en.txt --limit 64
"""

from __future__ import annotations

import argparse

import torch

from refrag import checkpoint
from refrag.eval.methods import Method
from refrag.eval.perplexity import PerplexityOptions, _prefixes, extract_examples
from refrag.modeling import start_token, token_nll
from refrag.train.data import iter_documents

BUCKETS = ((0, 1), (1, 4), (4, 16), (16, 32), (32, 64), (64, 128))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="refrag/checkpoints/smollm2-135m-self-k16")
    ap.add_argument("--data", default="../shared/data/wiki_paragraph_segmentation_en.txt")
    ap.add_argument("--s", type=int, default=512)
    ap.add_argument("--o", type=int, default=128)
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = checkpoint.load(args.model, dtype="bfloat16", answer_adapter=False).eval()
    options = PerplexityOptions(s=args.s, o=args.o, ks=(model.k,), limit=args.limit, seed=args.seed)
    methods = [Method("no_context"), Method("full"), Method("truncated", positions=args.s // model.k, first=True),
               Method("refrag", k=model.k)]
    examples = extract_examples(iter_documents(args.data, "text"), model.tokenizer, args.s, args.o, args.limit,
                                args.seed)
    start = start_token(model.tokenizer)
    sums = {m.name: torch.zeros(args.o) for m in methods}  # [o] summed NLL per output position
    with torch.inference_mode():
        for first in range(0, len(examples), 4):
            batch = examples[first : first + 4]
            for m in methods:
                layouts = [model.scored_layout(p, ex.output)
                           for p, ex in zip(_prefixes(model, batch, m, options, start), batch)]
                nll, _ = token_nll(*model.label_logits(model.build_inputs(layouts)))  # [B, K]
                sums[m.name] += nll[:, -args.o :].float().sum(0)
    n = len(examples)
    print(f"{n} windows, s={args.s} o={args.o}: mean NLL by output position; recovered = (none - m) / (none - full)")
    print(f"{'positions':<10}" + "".join(f"{m.name:>12}" for m in methods) + f"{'trunc rec':>11}{'refrag rec':>11}")
    for lo, hi in BUCKETS:
        if lo >= args.o:
            break
        v = {name: float(s[lo:hi].mean()) / n for name, s in sums.items()}
        gap = v["no_context"] - v["full"]
        rec = {name: (v["no_context"] - v[name]) / gap for name in ("truncated", f"refrag{model.k}")}
        label = str(lo) if hi - lo == 1 else f"{lo}-{min(hi, args.o) - 1}"
        print(f"{label:<10}" + "".join(f"{v[m.name]:>12.3f}" for m in methods)
              + "".join(f"{r:>11.3f}" for r in rec.values()))


if __name__ == "__main__":
    main()
