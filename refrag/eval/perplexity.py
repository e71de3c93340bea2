"""The paper's Table 1 protocol: log-perplexity of o output tokens after s context tokens, per method.

Every example is a window of s + o consecutive DECODER tokens from one document. Methods differ only in what
precedes the output tokens:

- ``no_context``: nothing but a start token (the tokenizer's BOS, else its EOS);
- ``full``: the s context tokens;
- ``truncated``: the last K = s / k context tokens (K = the decoder positions REFRAG_k uses; for a second k
  the method is named ``truncated{K}``);
- ``refrag{k}``: the s / k chunk embeddings of the context (``model.embed_chunks``), as in training;
- ``refrag{k}+{strategy}{P}`` (with ``expand`` > 0): the same with P% of the chunks as raw tokens in place
  (what mixed-input training teaches), chosen by ``strategy``: ``last`` (the chunks nearest the output) or
  ``random`` (seeded per example, the paper's RAND baseline). Its equal-positions baseline ``truncated{K}``
  (K = its decoder positions) is added too.

Log-ppl is the mean NLL (nats) of the SAME o output tokens for every method: the first output token is
predicted from the last preceding position. If the tokenizer has neither BOS nor EOS, no_context cannot
predict the first token, so the first output token is dropped from every method's score.
"context benefit recovered" = (no_context - method) / (no_context - full).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from tqdm import tqdm

from refrag.chunking import chunk_token_ids
from refrag.config import CompressionOptions
from refrag.errors import InputError
from refrag.modeling import IGNORE_INDEX, Layout, RefragModel, segments_layout, start_token
from refrag.prompting import choose_expanded

log = logging.getLogger(__name__)

# With a decoder adapter, the adapter alone (no context) is scored too: a control that separates what the
# compressed context brings from what the adapter learnt about text in general.
ADAPTER_CONTROL = "no_context_adapter"
# REFRAG (first k) reading the chunk vectors of ANOTHER example's context: what the vectors bring that is not
# about this example (their mere presence, generic text statistics). refrag{k} minus this is the context's own.
FOREIGN_CONTROL = "foreign_vectors"


@dataclass(frozen=True)
class PerplexityOptions:
    """Window sizes, methods and how many examples (the paper: s=2048, o in {512, 1024, 2048})."""

    s: int = 512  # context tokens
    o: int = 128  # output tokens scored
    ks: tuple[int, ...] = (16,)  # REFRAG compression rates to evaluate (one refrag{k} method each)
    limit: int = 200  # examples (at most one per document)
    seed: int = 0  # document order and window offsets
    batch_size: int = 4  # examples per decoder forward
    expand: float = 0.0  # p > 0 adds refrag{k}+{strategy}{P}: a fraction p of chunks kept as raw tokens
    expand_strategy: Literal["last", "random"] = "last"

    def __post_init__(self) -> None:
        if self.s <= 0 or self.o < 2:
            raise InputError(f"need s > 0 and o >= 2 (got s={self.s}, o={self.o}).")
        if not 0.0 <= self.expand < 1.0 or self.expand_strategy not in ("last", "random"):
            raise InputError(f"--expand must be in [0, 1) and --expand-strategy last or random "
                             f"(got {self.expand}, {self.expand_strategy!r}).")
        if not self.ks:
            raise InputError("give at least one compression rate (--k 16).")
        for k in self.ks:
            if k <= 0 or self.s % k:
                raise InputError(f"--s {self.s} must be a multiple of every --k (got k={k}).")
        if self.limit <= 0 or self.batch_size <= 0:
            raise InputError("--limit and the batch size must be positive.")

    def method_names(self) -> list[str]:
        """Method names in report order; the first k's truncated baseline is plain ``truncated``."""
        names = ["no_context", "full"]
        for i, k in enumerate(self.ks):
            names.append("truncated" if i == 0 else f"truncated{self.s // k}")
        names += [f"refrag{k}" for k in self.ks]
        for k in self.ks if self.expand else ():
            L, n = self.s // k, self.expanded_chunks(k)
            names += [f"refrag{k}+{self.expand_strategy}{round(100 * self.expand)}", f"truncated{L - n + n * k}"]
        return list(dict.fromkeys(names))

    def expanded_chunks(self, k: int) -> int:
        """How many of the s / k chunks stay raw tokens (at least one when expand > 0)."""
        return max(1, round(self.expand * self.s / k)) if self.expand else 0


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
            **({"expand": o.expand, "expand_strategy": o.expand_strategy} if o.expand else {}),
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


def scored_layout(
    prefix: Sequence[Sequence[int] | torch.Tensor],
    output: Sequence[int],
    model: RefragModel,
    skip_first: bool,
) -> Layout:
    """prefix segments + output[:-1], labels on the output tokens (the first one predicted by the prefix's end)."""
    layout = segments_layout([*prefix, list(output[:-1])], model.decoder.config.hidden_size, model.dtype)
    n_prefix = layout.length - (len(output) - 1)
    targets = torch.tensor(list(output))
    labels = torch.full((layout.length,), IGNORE_INDEX, dtype=torch.long)
    if n_prefix == 0:  # nothing predicts output[0]
        if not skip_first:
            raise InputError(
                "an empty prefix cannot predict the first output token; score with skip_first=True."
            )
        labels[:] = targets[1:]
    else:
        labels[n_prefix - 1 :] = targets  # the prefix's last position predicts output[0]
        if skip_first:
            labels[n_prefix - 1] = IGNORE_INDEX
    layout.labels = labels
    return layout


def _prefixes(
    model: RefragModel,
    batch: Sequence[PerplexityExample],
    method: str,
    options: PerplexityOptions,
    start: int | None,
) -> list[list]:
    """The segments before the output tokens, for one method and a batch of examples.

    Every method starts with the start token (as training does), so no context ever sits at position 0.
    """
    head = [[start]] if start is not None else []
    if method in ("no_context", ADAPTER_CONTROL):
        return [list(head) for _ in batch]
    if method == "full":
        return [[*head, list(ex.context)] for ex in batch]
    if method.startswith("truncated"):
        K = options.s // options.ks[0] if method == "truncated" else int(method[len("truncated") :])
        return [[*head, list(ex.context[-K:])] for ex in batch]
    match = re.fullmatch(r"refrag(\d+)(?:\+(last|random)\d+)?", method)
    assert match, method
    k, strategy = int(match[1]), match[2]
    L = options.s // k
    n = options.expanded_chunks(k) if strategy else 0
    raw = [_expanded(L, n, strategy, options.seed, ex.doc) for ex in batch]
    chunks = [chunk_token_ids(ex.context, model.tokenizer, k) for ex in batch]
    texts = [c.text for cs, r in zip(chunks, raw) for j, c in enumerate(cs) if j not in r]
    vectors = iter(model.embed_chunks(texts).split(1)) if texts else iter(())  # [1, D] each, in order
    return [[*head, *(list(c.token_ids) if j in r else next(vectors) for j, c in enumerate(cs))]
            for cs, r in zip(chunks, raw)]


def _expanded(num_chunks: int, n: int, strategy: str | None, seed: int, doc: int) -> set[int]:
    """The n chunks of one example kept as raw tokens: ``choose_expanded`` (what generation uses), with the
    random strategy seeded by (seed, document)."""
    if not n:
        return set()
    options = CompressionOptions(expand_fraction=n / num_chunks, expand_strategy=strategy,  # type: ignore[arg-type]
                                 seed=seed * 1_000_003 + doc)
    return choose_expanded(num_chunks, options)


def example_nll(model: RefragModel, layouts: Sequence[Layout], *, adapter: bool = False) -> list[float]:
    """Mean NLL over each layout's labelled positions (one batched forward); ``adapter`` runs the decoder
    adapter even on text-only layouts."""
    inputs = model.build_inputs(layouts)
    if adapter:
        inputs = replace(inputs, compressed=True)
    logits, labels = model.label_logits(inputs)  # [B, K, V], [B, K]
    nll = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # [B, K]
    mask = labels != IGNORE_INDEX
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
    methods = options.method_names() + ([ADAPTER_CONTROL] if model.has_adapter else [])
    methods += [FOREIGN_CONTROL] if len(examples) > 1 else []
    result = PerplexityResult(options, {m: [] for m in methods}, list(examples))
    size = options.batch_size
    bar = tqdm(total=-(-len(examples) // size) * len(methods), desc="perplexity", unit="batch", disable=not progress)
    for first in range(0, len(examples), size):
        batch = examples[first : first + size]
        for method in methods:
            if method == FOREIGN_CONTROL:  # the next example's context (cyclically), this example's output
                foreign = [replace(ex, context=examples[(first + i + 1) % len(examples)].context)
                           for i, ex in enumerate(batch)]
                prefixes = _prefixes(model, foreign, f"refrag{options.ks[0]}", options, start)
            else:
                prefixes = _prefixes(model, batch, method, options, start)
            layouts = [
                scored_layout(p, ex.output, model, skip_first=start is None) for p, ex in zip(prefixes, batch)
            ]
            result.per_example[method].extend(example_nll(model, layouts, adapter=method == ADAPTER_CONTROL))
            bar.update()
    bar.close()
    return result
