"""The paper's Table 1 protocol: log-perplexity of o output tokens after s context tokens, per method.

Every example is a window of s + o consecutive DECODER tokens from one document. Methods differ only in what
precedes the output tokens:

- ``no_context``: nothing but a start token (the tokenizer's BOS, else its EOS);
- ``full``: the s context tokens;
- ``truncated``: the last K = s / k context tokens (K = the decoder positions REFRAG_k uses; for a second k
  the method is named ``truncated{K}``);
- ``refrag{k}``: the s / k chunk embeddings of the context (``model.embed_chunks``), as in training;
- ``refrag{k}-refined`` (with ``refine``): the same after the context's encodings are refined as an index
  refines a passage's (``refrag.refine``: the context alone, never the output, is what they are refined on);
- ``refrag{k}+{policy}{P}`` (for each fraction in ``expand`` and each of ``policies``): the same with P% of the
  chunks as raw tokens in place (what mixed-input training teaches), chosen by the policy (``refrag.policy``):
  ``last`` (the chunks nearest the output), ``first``, ``random`` (seeded per example, the paper's RAND),
  ``perplexity-desc`` / ``perplexity-asc`` (the chunks' own token perplexity under the decoder, the paper's
  Fig. 3). There is no question here, so the question-aware policies do not apply. Each fraction's
  equal-positions baseline ``truncated{K}`` (K = its decoder positions) is added too.

Log-ppl is the mean NLL (nats) of the SAME o output tokens for every method: the first output token is
predicted from the last preceding position. If the tokenizer has neither BOS nor EOS, no_context cannot
predict the first token, so the first output token is dropped from every method's score.
"context benefit recovered" = (no_context - method) / (no_context - full).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import get_args

import torch
from tqdm import tqdm

from refrag.chunking import chunk_token_ids
from refrag.config import PolicyName, check_choice, check_fraction
from refrag.errors import InputError
from refrag.eval.methods import ADAPTER_CONTROL, FOREIGN_CONTROL, Method
from refrag.modeling import Layout, RefragModel, Segment, start_token, token_nll
from refrag.policy import Budget, expansion_count, make_policy, select
from refrag.refine import RefineOptions, refine_encodings

log = logging.getLogger(__name__)
TEXT_POLICIES: tuple[PolicyName, ...] = tuple(
    p for p in get_args(PolicyName) if p not in ("none", "similarity", "lexical", "lexical-passage")
)  # the policies that need no question

@dataclass(frozen=True)
class PerplexityOptions:
    """Window sizes, methods and how many examples (the paper: s=2048, o in {512, 1024, 2048})."""

    s: int = 512  # context tokens
    o: int = 128  # output tokens scored
    ks: tuple[int, ...] = (16,)  # REFRAG compression rates to evaluate (one refrag{k} method each)
    limit: int = 200  # examples (at most one per document)
    seed: int = 0  # document order and window offsets
    batch_size: int = 4  # examples per decoder forward
    expand: tuple[float, ...] = ()  # each p > 0 adds refrag{k}+{policy}{P}: a fraction p of chunks kept raw
    policies: tuple[PolicyName, ...] = ("last",)  # how the raw chunks are chosen (one method per policy)
    refine: RefineOptions | None = None  # adds refrag{k}-refined: each context's encodings refined first

    def __post_init__(self) -> None:
        if self.s <= 0 or self.o < 2:
            raise InputError(f"need s > 0 and o >= 2 (got s={self.s}, o={self.o}).")
        for p in self.expand:
            check_fraction(p, "--expand", below_one=True)
        for policy in self.policies:
            check_choice(policy, PolicyName, "--policy")
            if policy not in TEXT_POLICIES:
                raise InputError(f"--policy {policy} needs a question; plain text can use "
                                 f"{', '.join(TEXT_POLICIES)}.")
        if not self.ks:
            raise InputError("give at least one compression rate (--k 16).")
        for k in self.ks:
            if k <= 0 or self.s % k:
                raise InputError(f"--s {self.s} must be a multiple of every --k (got k={k}).")
        if self.limit <= 0 or self.batch_size <= 0:
            raise InputError("--limit and the batch size must be positive.")

    def methods(self) -> list[Method]:
        """The methods in report order (one per name); the first k's truncated baseline is plain ``truncated``."""
        methods = [Method("no_context"), Method("full")]
        methods += [Method("truncated", positions=self.s // k, first=i == 0) for i, k in enumerate(self.ks)]
        methods += [Method("refrag", k=k) for k in self.ks]
        methods += [Method("refrag", k=k, refined=True) for k in self.ks if self.refine is not None]
        for k in self.ks:
            for p in (p for p in self.expand if p):
                L, n = self.s // k, self.expanded_chunks(k, p)
                methods += [Method("refrag", k=k, policy=policy, expanded=n, percent=round(100 * p))
                            for policy in self.policies]
                methods.append(Method("truncated", positions=L - n + n * k))
        unique: dict[str, Method] = {}
        for m in methods:
            if m.kind == "refrag" and m.name in unique:
                raise InputError(f"{m.name} twice: give each --expand fraction and --policy once.")
            unique.setdefault(m.name, m)  # truncated baselines may coincide
        return list(unique.values())

    def method_names(self) -> list[str]:
        return [m.name for m in self.methods()]

    def expanded_chunks(self, k: int, fraction: float) -> int:
        """How many of the s / k chunks stay raw tokens (``expansion_count``, as generation counts them)."""
        return expansion_count(self.s // k, fraction)


@dataclass(frozen=True)
class PerplexityExample:
    """s context + o output decoder tokens taken from one document."""

    doc: int  # index of the document in its source
    offset: int  # token offset of the window in the document
    context: tuple[int, ...]  # [s]
    output: tuple[int, ...]  # [o]


@dataclass
class PerplexityResult:
    """Mean log-ppl per method, per-example values, and the context benefit each method recovers."""

    options: PerplexityOptions
    per_example: dict[str, list[float]] = field(default_factory=dict)  # method -> [n] mean NLL per example
    examples: list[PerplexityExample] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.examples)

    @property
    def log_ppl(self) -> dict[str, float]:
        return {m: sum(v) / len(v) for m, v in self.per_example.items() if v}

    @property
    def recovered(self) -> dict[str, float]:
        """(no_context - method) / (no_context - full), for every method but those two."""
        lp = self.log_ppl
        gap = lp["no_context"] - lp["full"]
        return {
            m: (lp["no_context"] - v) / gap if gap else float("nan")
            for m, v in lp.items()
            if m not in ("no_context", "full")
        }

    def summary(self) -> dict:
        o = self.options
        return {
            "s": o.s,
            "o": o.o,
            "n": self.n,
            "ks": list(o.ks),
            "seed": o.seed,
            **({"expand": list(o.expand), "policies": list(o.policies)} if o.expand else {}),
            **({"refine": o.refine.to_json()} if o.refine else {}),
            "log_ppl": self.log_ppl,
            "recovered": self.recovered,
        }

    def rows(self) -> list[dict]:
        """One JSON-able row per example (what ``--out`` writes as JSONL)."""
        return [
            {"doc": ex.doc, "offset": ex.offset, **{m: v[i] for m, v in self.per_example.items()}}
            for i, ex in enumerate(self.examples)
        ]


def extract_examples(
    documents: Iterable[str], tokenizer, s: int, o: int, limit: int, seed: int = 0
) -> list[PerplexityExample]:
    """At most one s + o token window per document, documents in seeded random order, short ones skipped.

    All documents are read (their text, not their tokens), shuffled, then tokenized one by one until ``limit``
    examples exist, so memory stays bounded by the text size.
    """
    docs = list(documents)
    order = list(range(len(docs)))
    rng = random.Random(seed)
    rng.shuffle(order)
    out: list[PerplexityExample] = []
    for d in order:
        ids = tokenizer.encode(docs[d], add_special_tokens=False)
        if len(ids) < s + o:
            continue
        offset = rng.randrange(len(ids) - (s + o) + 1)
        out.append(
            PerplexityExample(
                d, offset, tuple(ids[offset : offset + s]), tuple(ids[offset + s : offset + s + o])
            )
        )
        if len(out) == limit:
            break
    if not out:
        raise InputError(
            f"no document has the {s + o} tokens an example needs; use longer documents or smaller --s/--o."
        )
    if len(out) < limit:
        log.warning("only %d documents are long enough for s=%d + o=%d (asked for %d)", len(out), s, o, limit)
    return out


def _prefixes(
    model: RefragModel,
    batch: Sequence[PerplexityExample],
    method: Method,
    options: PerplexityOptions,
    start: int | None,
) -> list[list[Segment]]:
    """The segments before the output tokens, for one method and a batch of examples.

    Every method starts with the start token (as training does), so no context ever sits at position 0.
    """
    head = [[start]] if start is not None else []
    if method.kind in ("no_context", ADAPTER_CONTROL):
        return [list(head) for _ in batch]
    if method.kind == "full":
        return [[*head, list(ex.context)] for ex in batch]
    if method.kind == "truncated":
        return [[*head, list(ex.context[-method.positions :])] for ex in batch]
    chunks = [chunk_token_ids(ex.context, model.tokenizer, method.k) for ex in batch]
    if method.refined:  # the whole context is one passage; nothing of the output is seen
        assert options.refine is not None
        encoded = refine_encodings(model, chunks, model.encode_chunks([c for cs in chunks for c in cs]),
                                   options.refine)  # [B * L, E]
        vectors = model.project(encoded).split([len(cs) for cs in chunks])
        return [[*head, v] for v in vectors]
    raw = [_expanded(model, cs, method, options.seed, ex.doc) for cs, ex in zip(chunks, batch)]
    return [[*head, *context] for context in model.contexts([[cs] for cs in chunks], raw)]


def _expanded(model: RefragModel, chunks, method: Method, seed: int, doc: int) -> set[int]:
    """The chunks of one example kept as raw tokens: the generation path's policy (``refrag.policy``), the
    random one seeded by (seed, document). Every chunk has k tokens, so a budget of n * k tokens is n chunks."""
    if not method.expanded or method.policy is None:
        return set()
    policy = make_policy(method.policy, seed=seed * 1_000_003 + doc, model=model)
    encodings = model.encode_chunks(chunks) if method.policy == "learned" else None  # [L, E]: what it reads
    return select(policy, chunks, Budget(tokens=method.expanded * method.k), encodings=encodings)


def example_nll(model: RefragModel, layouts: Sequence[Layout], *, adapter: bool = False) -> list[float]:
    """Mean NLL over each layout's labelled positions (one batched forward); ``adapter`` runs the decoder
    adapter even on text-only layouts."""
    inputs = model.build_inputs(layouts)
    if adapter:
        inputs = replace(inputs, compressed=True)
    nll, mask = token_nll(*model.label_logits(inputs))  # [B, K]
    return ((nll * mask).sum(1) / mask.sum(1)).tolist()


@torch.inference_mode()
def evaluate_perplexity(
    model: RefragModel,
    examples: Sequence[PerplexityExample],
    options: PerplexityOptions,
    *,
    progress: bool = True,
) -> PerplexityResult:
    """Log-perplexity of every example's output tokens under every method of ``options``."""
    start = start_token(model.tokenizer)
    # the adapter-without-context control; a chunk-scoped adapter never runs without vectors (it would equal no_context)
    methods = options.methods() + ([Method(ADAPTER_CONTROL)] if model.has_adapter and not model.chunk_scoped else [])
    methods += [Method(FOREIGN_CONTROL, k=options.ks[0])] if len(examples) > 1 else []
    result = PerplexityResult(options, {m.name: [] for m in methods}, list(examples))
    size = options.batch_size
    bar = tqdm(total=-(-len(examples) // size) * len(methods), desc="perplexity", unit="batch", disable=not progress)
    for first in range(0, len(examples), size):
        batch = examples[first : first + size]
        for method in methods:
            if method.kind == FOREIGN_CONTROL:  # the next example's context (cyclically), this example's output
                foreign = [replace(ex, context=examples[(first + i + 1) % len(examples)].context)
                           for i, ex in enumerate(batch)]
                prefixes = _prefixes(model, foreign, Method("refrag", k=method.k), options, start)
            else:
                prefixes = _prefixes(model, batch, method, options, start)
            layouts = [model.scored_layout(p, ex.output, skip_first=start is None) for p, ex in zip(prefixes, batch)]
            nll = example_nll(model, layouts, adapter=method.kind == ADAPTER_CONTROL)
            result.per_example[method.name].extend(nll)
            bar.update()
    bar.close()
    return result
