"""Where a compressor's reading of a window departs from the full-context decoder's: for next-paragraph windows
(s context tokens, o continuation tokens) of a text, the KL of the continuation's next-token distributions and,
per decoder layer, the relative distance ||h_refrag - h_full||^2 / ||h_full||^2 of the hidden states at the
continuation tokens (mean, median, max over tokens), as `refrag train cpt --distill-hidden` measures it.

    python scripts/hidden_gap.py --model refrag/checkpoints/smollm2-135m-self-k16 \
        --data ../shared/data/wiki_paragraph_segmentation_en.txt --windows 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from refrag.checkpoint import load
from refrag.modeling import IGNORE_INDEX
from refrag.train.objectives import (
    Example,
    example_layouts,
    hidden_distance,
    kl_between,
    teacher_layouts,
    teacher_outputs,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--s", type=int, default=512)
    parser.add_argument("--o", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load(args.model, dtype="float32", progress=False)
    text = Path(args.data).read_text(encoding="utf-8")[: 2_000_000]  # windows from the first 2M characters
    ids = np.array(model.tokenizer(text)["input_ids"])  # [N]
    starts = np.random.default_rng(args.seed).integers(0, len(ids) - args.s - args.o, args.windows)
    examples = [Example(tuple(ids[i : i + args.s].tolist()), tuple(ids[i + args.s : i + args.s + args.o].tolist()))
                for i in starts]
    with torch.no_grad():
        student = model.label_outputs(model.build_inputs(example_layouts(model, examples)), hidden=True)
        teacher = teacher_outputs(model, teacher_layouts(model, examples), hidden=True)
    print(f"{args.windows} windows, s={args.s}, o={args.o}: KL {float(kl_between(student, teacher)):.4f}, "
          f"hidden distance (--distill-hidden's) {float(hidden_distance(student, teacher)):.4f}")
    print("layer  mean    median  max   (squared relative distance over the continuation's tokens)")
    rows_s, rows_t = student.labels != IGNORE_INDEX, teacher.labels != IGNORE_INDEX
    # each row's input: the last context position, then the continuation's tokens but its last
    inputs = [name for ex in examples for name in ["<context end>"] + [model.tokenizer.decode([t]) for t in
                                                                        ex.continuation[:-1]]]
    worst: tuple[float, int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for layer, (hs, ht) in enumerate(zip(student.hidden, teacher.hidden, strict=True), start=1):
        s, t = hs[rows_s].float(), ht[rows_t].float()  # [N, D]
        r = (s - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-6)  # [N]
        print(f"{layer:5d}  {float(r.mean()):.4f}  {float(r.median()):.4f}  {float(r.max()):.2f}")
        if worst is None or float(r.max()) > worst[0]:
            worst = float(r.max()), layer, r, s.norm(dim=-1), t.norm(dim=-1)
    assert worst is not None
    _, layer, r, s_norm, t_norm = worst
    print(f"the farthest tokens, layer {layer} (input token: distance, hidden-state norm compressed / full):")
    for i in r.topk(min(8, len(r))).indices.tolist():
        print(f"  {inputs[i]!r}: {float(r[i]):.1f}, {float(s_norm[i]):.0f} / {float(t_norm[i]):.0f}")


if __name__ == "__main__":
    main()
