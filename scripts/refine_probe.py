"""Probe: is the chunk ENCODER the limit of the compressed path, or the decoder's reading of vectors?

Each window's chunk vectors, as the encoder + projector give them, are refined by a few Adam steps on a loss (the
decoder and its adapter frozen; the projector's normalisation kept: v = unit(u) x RMS x gain); the perplexity
protocol's windows then score the continuation with the encoder's vectors and with the refined ones, paired.
Losses (--objective): ``recon``, each chunk's own 1 x k reconstruction; ``next``, KL on the next chunk from the
decoder reading the chunk as text; ``window``, all of a window's vectors jointly, KL on the chunk after its first i
chunks from the decoder reading them as text. None sees the scored output. Results: docs/training.md ("What
limits the compressed path").

    python scripts/refine_probe.py --model refrag/checkpoints/smollm2-135m-self-k16 \
        --data ../shared/data/wiki_paragraph_segmentation_en.txt --limit 16 --steps 0,10,30 --objective window \
        --out runs/refine-window
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from refrag import checkpoint
from refrag.chunking import chunk_token_ids
from refrag.eval.perplexity import example_nll, extract_examples
from refrag.io import write_json_atomic
from refrag.modeling import mean_nll, start_token
from refrag.train.data import iter_documents


def unit(u: torch.Tensor) -> torch.Tensor:
    return u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + 1e-6)


def reconstruction(model, head, vectors, chunks, *, grad: bool) -> tuple[torch.Tensor, float]:
    """Mean NLL (and token accuracy) of each chunk's tokens read back from its own vector."""
    layouts = [model.scored_layout([head, vectors[i : i + 1]], c.token_ids) for i, c in enumerate(chunks)]
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, labels = model.label_logits(model.build_inputs(layouts))  # [N, K, V], [N, K]
        loss = mean_nll(logits, labels)
    mask = labels != -100
    acc = float((logits.argmax(-1)[mask] == labels[mask]).float().mean())
    return loss, acc


def next_chunk(model, head, vectors, pairs, teacher) -> torch.Tensor:
    """Mean KL(teacher || student) on the next chunk's tokens: the student reads [start] e_a..e_b, the teacher
    (the original decoder) [start] chunks a..b as text; ``pairs``: (a, b, the next chunk's tokens)."""
    layouts = [model.scored_layout([head, vectors[a:b]], nxt) for a, b, nxt in pairs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, labels = model.label_logits(model.build_inputs(layouts))  # [P, K, V]
        student = logits[labels != -100].float().log_softmax(-1)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def teacher_logp(model, head, chunks, pairs) -> torch.Tensor:
    layouts = [model.scored_layout([head, [t for c in chunks[a:b] for t in c.token_ids]], nxt) for a, b, nxt in pairs]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, labels = model.label_logits(model.build_inputs(layouts))
        return logits[labels != -100].float().log_softmax(-1)  # [N, V]


def refine(model, head, v0: torch.Tensor, chunks, steps: int, lr: float, objective: str,
           pairs=(), teacher=None) -> torch.Tensor:
    """Adam on u, with v = unit(u) * scale (the projector's output norm), from the encoder's vectors."""
    scale = (model.projector.gain * model.projector.target_rms).detach().float()  # [D]
    u = (v0.float() / scale).clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)
    for _ in range(steps):
        v = unit(u) * scale
        loss = torch.zeros(())
        if objective in ("recon", "both"):
            loss = loss + reconstruction(model, head, v, chunks, grad=True)[0]
        if objective in ("next", "both", "window"):
            loss = loss + next_chunk(model, head, v, pairs, teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (unit(u) * scale).detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="refrag/checkpoints/smollm2-135m-self-k16")
    ap.add_argument("--data", default="../shared/data/wiki_paragraph_segmentation_en.txt")
    ap.add_argument("--s", type=int, default=512)
    ap.add_argument("--o", type=int, default=128)
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", default="0,10,30", help="refinement steps to score, comma-separated (0: encoder)")
    ap.add_argument("--lr", type=float, default=0.05, help="Adam lr on the unit-RMS direction")
    ap.add_argument("--objective", choices=("recon", "next", "both", "window"), default="recon",
                    help="refinement loss: the chunk's own reconstruction (index-time: the chunk alone); next: KL "
                         "on the next chunk of the same window from the decoder reading the chunk as text (the "
                         "last chunk has none: its successor is the scored output); both: their sum; window: "
                         "all of a window's vectors JOINTLY, KL on the next chunk after its first i chunks "
                         "(i in --cuts) from the decoder reading them as text: not index-time, a ceiling of "
                         "what vectors of this context could give the decoder")
    ap.add_argument("--cuts", default="4,8,16,24,31", help="--objective window: prefixes of i chunks")
    ap.add_argument("--batch", type=int, default=2, help="windows refined together")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = checkpoint.load(args.model, dtype="float32", answer_adapter=False)
    model.eval().requires_grad_(False)
    start = start_token(model.tokenizer)
    head = [start]
    steps = sorted({int(s) for s in args.steps.split(",")})
    cuts = [int(i) for i in args.cuts.split(",")]
    docs = iter_documents(args.data, "text")
    examples = extract_examples(docs, model.tokenizer, args.s, args.o, args.limit, args.seed)
    rows: dict[str, list[float]] = {"no_context": [], "full": [], "truncated": []}
    rows |= {f"refrag@{s}": [] for s in steps}
    recon: dict[int, list[tuple[float, float]]] = {s: [] for s in steps}
    t0 = time.perf_counter()
    for first in range(0, len(examples), args.batch):
        batch = examples[first : first + args.batch]
        per = [chunk_token_ids(ex.context, model.tokenizer, model.k) for ex in batch]
        flat = [c for cs in per for c in cs]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            v0 = model.embed_chunks(flat).float()  # [N, D]
            for name, prefix in (("no_context", lambda ex: [head]), ("full", lambda ex: [head, list(ex.context)]),
                                 ("truncated", lambda ex: [head, list(ex.context[-args.s // model.k :])])):
                rows[name] += example_nll(model, [model.scored_layout(prefix(ex), ex.output) for ex in batch])
        pairs, row = [], 0  # (first, end, the next chunk's tokens): vectors flat[first:end] predict it
        for cs in per:
            if args.objective == "window":
                pairs += [(row, row + i, cs[i].token_ids) for i in cuts if i < len(cs)]
            else:
                pairs += [(row + i, row + i + 1, cs[i + 1].token_ids) for i in range(len(cs) - 1)]
            row += len(cs)
        teacher = teacher_logp(model, head, flat, pairs) if args.objective != "recon" else None
        done, v = 0, v0
        for s in steps:
            v = v if s == done else refine(model, head, v, flat, s - done, args.lr, args.objective,
                                                         pairs, teacher)
            done = s
            loss, acc = reconstruction(model, head, v, flat, grad=False)
            recon[s].append((float(loss), acc))
            layouts, row = [], 0
            for ex, cs in zip(batch, per):
                layouts.append(model.scored_layout([head, v[row : row + len(cs)].to(model.dtype)], ex.output))
                row += len(cs)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                rows[f"refrag@{s}"] += example_nll(model, layouts)
        print(f"{first + len(batch)}/{len(examples)} windows, {time.perf_counter() - t0:.0f} s; "
              + "  ".join(f"@{s}: rec {recon[s][-1][0]:.3f}/{recon[s][-1][1]:.3f} "
                          f"cont {sum(rows[f'refrag@{s}']) / len(rows[f'refrag@{s}']):.4f}" for s in steps), flush=True)
    lp = {m: sum(v) / len(v) for m, v in rows.items()}
    gap = lp["no_context"] - lp["full"]
    summary = {"n": len(examples), "lr": args.lr, "objective": args.objective, "log_ppl": lp,
               "recovered": {m: (lp["no_context"] - v) / gap for m, v in lp.items()},
               "reconstruction": {s: {"log_ppl": sum(a for a, _ in r) / len(r), "accuracy": sum(b for _, b in r) / len(r)}
                                  for s, r in recon.items()}}
    for s in steps[1:]:
        d = [a - b for a, b in zip(rows[f"refrag@{s}"], rows[f"refrag@{steps[0]}"])]
        mean = sum(d) / len(d)
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1))
        summary[f"delta@{s}"] = {"mean": mean, "ci95": [mean - 1.96 * sd / math.sqrt(len(d)), mean + 1.96 * sd / math.sqrt(len(d))]}
    print(summary)
    if args.out:
        write_json_atomic(args.out / "summary.json", summary)


if __name__ == "__main__":
    main()
