"""Is the policy or the reading the limit? How often a gold answer lies inside the chunks a policy keeps raw
(questions with the gold passage among distractors, passages rebuilt the way `refrag eval qa` builds them; only
the tokenizer is loaded).

A run of `refrag eval qa --out` (pass the --data / --passages / --limit / --seed it used): the recall of its mode's
kept chunks, and the mode's answer-contained rate where the answer is inside them and where it is not:

    python scripts/policy_recall.py run runs/qa-sft-answer refrag+lexical10% --data ../shared/data/nq_bigbench.jsonl \
        --passages 3 --limit 300 --seed 0

Policies directly (no model: encoding-free policies only), on a development sample that leaves out the questions
an evaluation reports (--exclude-limit / --exclude-seed: the `eval qa --limit / --seed` of the reported run):

    python scripts/policy_recall.py policies lexical,lexical-passage --fractions 0.1,0.25 \
        --data ../shared/data/nq_bigbench.jsonl --limit 400 --seed 1 --exclude-limit 300 --exclude-seed 0

An answer cut by a chunk boundary counts as inside when the kept chunks hold it whole (adjacent kept chunks are
joined first).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoTokenizer

from refrag.config import ChunkingOptions, CompressionOptions
from refrag.eval.metrics import contains_answer
from refrag.eval.qa import QAExample, gold_passages, load_qa
from refrag.generation import Request
from refrag.io import read_jsonl
from refrag.models import resolve
from refrag.policy import choose_expanded


def kept_text(request: Request, kept: set[int]) -> str:
    """The kept chunks' text, adjacent ones of one passage joined, separate runs apart."""
    parts, previous = [], None
    chunks = request.chunks
    for i, chunk in enumerate(chunks):
        if i in kept:
            joined = previous == i - 1 and chunks[previous].passage == chunk.passage
            parts.append(chunk.text if joined else " | " + chunk.text)
            previous = i
    return "".join(parts)


def requests(args, tokenizer) -> list[tuple[QAExample, Request]]:
    """Each question with its passages as `eval qa` drew them (distractors from every loaded row, so the draw
    matches); rows answered "unknown" (disfl-QA) and left-out questions are skipped afterwards."""
    examples = load_qa(args.data, limit=args.limit, seed=args.seed)
    left_out = ({e.question for e in load_qa(args.data, limit=args.exclude_limit, seed=args.exclude_seed)}
                if getattr(args, "exclude_limit", None) else set())
    return [(e, Request.from_texts(e.question, gold_passages(examples, i, args.passages, args.seed), tokenizer,
                                   ChunkingOptions(k=args.k)))
            for i, e in enumerate(examples) if e.question not in left_out and e.answers[0] != "unknown"]


def inside(example: QAExample, request: Request, kept: set[int]) -> bool:
    return contains_answer(kept_text(request, kept), example.answers) > 0


def run_recall(args, pairs) -> None:
    rows = read_jsonl(args.run / "examples.jsonl", "not a folder written by `refrag eval qa --out`")
    rows = {r["question"]: r for _, r in rows if r["mode"] == args.mode}
    if not rows:
        raise SystemExit(f"{args.run}/examples.jsonl has no rows of mode {args.mode!r}")
    hits, anywhere, correct = [], [], {True: [], False: []}
    for example, request in pairs:
        row = rows.get(example.question)
        if row is None:
            continue
        hit = inside(example, request, set(row["expanded_chunks"]))
        hits.append(hit)
        anywhere.append(inside(example, request, set(range(len(request.chunks)))))
        correct[hit].append(row["contains"])
    n = len(hits)
    print(f"{args.run}:{args.mode}: {n} questions; answer inside the passages {sum(anywhere) / n:.3f}, "
          f"inside the raw chunks {sum(hits) / n:.3f}")
    for hit, label in ((True, "inside"), (False, "not inside")):
        xs = correct[hit]
        print(f"contained when the answer is {label} the raw chunks: "
              f"{f'{sum(xs) / len(xs):.3f}' if xs else '-'} ({len(xs)} questions)")


def policy_recall(args, pairs) -> None:
    print(f"{args.data}: {len(pairs)} questions (seed {args.seed}, {args.passages} passages)")
    for policy in args.policies.split(","):
        for fraction in (float(f) for f in args.fractions.split(",")):
            options = CompressionOptions(mode="refrag", policy=policy, expand_fraction=fraction)
            hits = [inside(e, r, choose_expanded(r.chunks, options, question=e.question).expanded) for e, r in pairs]
            print(f"{policy} {fraction:g}: answer inside the raw chunks {sum(hits) / len(hits):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="a run of `refrag eval qa --out`")
    run.add_argument("run", type=Path)
    run.add_argument("mode")
    policies = sub.add_parser("policies", help="policies on a development sample")
    policies.add_argument("policies", help="comma-separated policy names (encoding-free)")
    policies.add_argument("--fractions", default="0.1,0.25")
    policies.add_argument("--exclude-limit", type=int, default=300)
    policies.add_argument("--exclude-seed", type=int, default=0)
    for p in (run, policies):
        p.add_argument("--data", required=True)
        p.add_argument("--passages", type=int, default=3)
        p.add_argument("--limit", type=int, default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--decoder", default="smollm2-135m")
        p.add_argument("--k", type=int, default=16)
    args = parser.parse_args()
    pairs = requests(args, AutoTokenizer.from_pretrained(resolve(args.decoder, progress=False).path))
    (run_recall if args.command == "run" else policy_recall)(args, pairs)


if __name__ == "__main__":
    main()
