"""What each stage trains on: examples (context + continuation tokens) turned into decoder layouts.

Reconstruction: the L chunk embeddings are the prefix, then x_1..x_{s-1} teacher-forced; loss on x_1..x_s.
Next-paragraph (CPT / mixed): prefix [e_1..e_L] (some chunks raw in mixed training), then x_{s+1..s+o-1};
loss on x_{s+1..s+o}. Loss is never on the context prefix itself. Optionally (``distill`` > 0, not in the
paper) part of that loss is the KL divergence from the original decoder reading the FULL context as tokens:
a dense target (a whole next-token distribution per position) for "behave as if the context were there".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from refrag.chunking import chunk_token_ids
from refrag.errors import InputError
from refrag.modeling import (
    IGNORE_INDEX,
    LabelOutputs,
    Layout,
    RefragModel,
    mean_nll,
    start_token,
    token_nll,
)
from refrag.train.data import sample_window


@dataclass(frozen=True)
class Example:
    """Context tokens (compressed into chunks) and the continuation to predict ([] for reconstruction)."""

    context: tuple[int, ...]  # s tokens, s = n * k
    continuation: tuple[int, ...]  # o tokens
    expanded: tuple[int, ...] = ()  # chunk indices fed as raw tokens (mixed-input training)

    @property
    def target(self) -> tuple[int, ...]:
        return self.continuation or self.context


def choose_random_expanded(num_chunks: int, fraction: float, rng: np.random.Generator) -> tuple[int, ...]:
    """Each chunk independently left uncompressed with probability ``fraction``, but never all of them: an
    all-text example has nothing compressed to learn from (and no gradient when the decoder is frozen)."""
    if fraction <= 0:
        return ()
    chosen = np.nonzero(rng.random(num_chunks) < fraction)[0]
    if len(chosen) == num_chunks:
        chosen = np.delete(chosen, rng.integers(num_chunks))
    return tuple(int(i) for i in chosen)


def teacher_layouts(model: RefragModel, examples: Sequence[Example]) -> list[Layout]:
    """The full-context text layouts of next-paragraph examples: [start] x_1..x_s x_{s+1}..x_{s+o-1}, labels on
    x_{s+1..s+o} (the same targets, in the same order, as ``example_layouts``)."""
    anchor = _anchor(model)
    layouts = []
    for ex in examples:
        if not ex.continuation:
            raise InputError("distillation needs a continuation: it applies to `cpt` and `mixed`, not `reconstruct`.")
        layouts.append(model.scored_layout([anchor, ex.context], ex.continuation))
    return layouts


def hidden_distance(student: LabelOutputs, teacher: LabelOutputs) -> torch.Tensor:
    """Mean over layers and target tokens of log(1 + ||h_student - h_teacher||^2 / ||h_teacher||^2), each layer's
    output (the last after the final norm) at the same targets, in the same order, of two
    ``label_outputs(..., hidden=True)``. The log keeps a few outliers from ruling the loss: with the shipped
    compressor the median token is at 0.004-0.064 in every layer, but a continuation token that grows a massive
    activation the teacher does not have sits at ~80-120 in layers 3-8 of 30 (docs/training.md, "Hidden-state
    distillation")."""
    s_rows, t_rows = student.labels != IGNORE_INDEX, teacher.labels != IGNORE_INDEX
    per_layer = []
    for hs, ht in zip(student.hidden, teacher.hidden, strict=True):
        s, t = hs[s_rows].float(), ht[t_rows].float()  # [N, D] each
        per_layer.append(torch.log1p((s - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-6)).mean())
    return torch.stack(per_layer).mean()


def teacher_outputs(model: RefragModel, teacher: Sequence[Layout], *, hidden: bool = False) -> LabelOutputs:
    """The original decoder's outputs on text-only ``teacher`` layouts (``teacher_layouts``), without gradient."""
    with torch.no_grad():
        return model.label_outputs(model.build_inputs(teacher), hidden=hidden)


def kl_to_teacher(model: RefragModel, teacher: Sequence[Layout], student: torch.Tensor,
                  student_labels: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) per target token. ``teacher``: text-only layouts with the same targets in the
    same order as the student's (so the original decoder reads them); ``student`` [B, K, V] / ``student_labels``
    [B, K] as returned by ``RefragModel.label_logits``."""
    return kl_between(LabelOutputs(student, student_labels), teacher_outputs(model, teacher))


def kl_between(student: LabelOutputs, teacher: LabelOutputs) -> torch.Tensor:
    """Mean KL(teacher || student) per target token, over the targets both have (the same rows, in order)."""
    return token_kl(student, teacher).mean()


def token_kl(student: LabelOutputs, teacher: LabelOutputs) -> torch.Tensor:
    """[N] KL(teacher || student) at each target both have (the same rows, in order: batch, then position)."""
    teacher_logp = teacher.logits[teacher.labels != IGNORE_INDEX].float().log_softmax(-1)  # [N, V]
    student_logp = student.logits[student.labels != IGNORE_INDEX].float().log_softmax(-1)  # [N, V]
    return torch.nn.functional.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)


def training_loss(model: RefragModel, examples: Sequence[Example], distill: float = 0.0,
                  distill_hidden: float = 0.0) -> torch.Tensor:
    """(1 - distill) * next-token cross-entropy + distill * KL from the full-context decoder, + distill_hidden *
    the distance of every layer's hidden states at the targets from that decoder's (``hidden_distance``)."""
    hidden = distill_hidden > 0
    student = model.label_outputs(model.build_inputs(example_layouts(model, examples)), hidden=hidden)
    loss = mean_nll(student.logits, student.labels)  # logits [B, K, V], labels [B, K]
    if not (distill or hidden):
        return loss
    teacher = teacher_outputs(model, teacher_layouts(model, examples), hidden=hidden)
    if distill:
        loss = (1 - distill) * loss + distill * kl_between(student, teacher)
    if hidden:
        loss = loss + distill_hidden * hidden_distance(student, teacher)
    return loss


def example_layouts(model: RefragModel, examples: Sequence[Example]) -> list[Layout]:
    """Examples -> labelled layouts: [start], the context's chunks (``context_segments``), the target.

    Every compressed chunk of the batch is encoded in one call.
    """
    chunked = [chunk_token_ids(ex.context, model.tokenizer, model.k) for ex in examples]
    contexts = model.contexts([[cs] for cs in chunked], [set(ex.expanded) for ex in examples])
    anchor = _anchor(model)
    return [model.scored_layout([anchor, *context], ex.target) for context, ex in zip(contexts, examples)]


def _anchor(model: RefragModel) -> list[int]:
    """The start token every layout begins with (never a chunk at position 0: the attention sink)."""
    return [] if (t := start_token(model.tokenizer)) is None else [t]


class Task(Protocol):
    """What the shared loop trains: a stage's examples as a pure function of (seed, step), its loss, and its
    held-out scores. ``StageTask`` (the compressor's stages) and ``train.policy.PolicyTask`` implement it."""

    stage: str

    def examples(self, step: int, count: int) -> list[Example]: ...

    def loss(self, model: RefragModel, examples: Sequence[Example]) -> torch.Tensor: ...

    def positions(self, examples: Sequence[Example]) -> int:
        """Decoder positions that carried a target or a chunk vector (the throughput the loop logs)."""
        ...

    def evaluate(self, model: RefragModel, batch_size: int) -> dict[int, Score]: ...


@dataclass
class StageTask:
    """The examples of one stage, as a pure function of (seed, step): resuming needs only the step.

    ``order`` lists the number of chunks of every example of the run (the curriculum); it is cycled if
    training runs longer. ``continuation_tokens`` is o (0 for reconstruction).
    """

    stage: str
    train_tokens: np.ndarray  # [N] packed training stream
    val_tokens: np.ndarray  # [M] held-out stream
    k: int
    order: list[int]
    continuation_tokens: int = 0
    expand_fraction: float = 0.0
    distill: float = 0.0  # weight of the KL from the full-context decoder (next-paragraph stages)
    distill_hidden: float = 0.0  # weight of the hidden-state distance from that decoder (``hidden_distance``)
    seed: int = 0
    eval_chunks: tuple[int, ...] = (1,)
    eval_per_type: int = 8

    def _example(self, tokens: np.ndarray, n: int, rng: np.random.Generator) -> Example:
        s, o = n * self.k, self.continuation_tokens
        window = sample_window(tokens, s + o, rng)
        return Example(
            context=tuple(window[:s]),
            continuation=tuple(window[s:]),
            expanded=choose_random_expanded(n, self.expand_fraction, rng),
        )

    def examples(self, step: int, count: int) -> list[Example]:
        """The ``count`` examples of optimizer step ``step`` (identical on every rank and every run)."""
        rng = np.random.default_rng((self.seed, step))
        return [
            self._example(self.train_tokens, self.order[(step * count + i) % len(self.order)], rng)
            for i in range(count)
        ]

    def eval_examples(self) -> dict[int, list[Example]]:
        """Fixed held-out examples per number of chunks, never expanded."""
        out = {}
        for n in self.eval_chunks:
            rng = np.random.default_rng((self.seed, 1 << 31, n))  # a stream no training step uses
            out[n] = [
                Example(ex.context, ex.continuation)
                for ex in (self._example(self.val_tokens, n, rng) for _ in range(self.eval_per_type))
            ]
        return out

    def loss(self, model: RefragModel, examples: Sequence[Example]) -> torch.Tensor:
        return training_loss(model, examples, self.distill, self.distill_hidden)

    def positions(self, examples: Sequence[Example]) -> int:
        return sum(len(ex.target) + len(ex.context) // self.k for ex in examples)

    def evaluate(self, model: RefragModel, batch_size: int) -> dict[int, Score]:
        return {n: score_examples(model, exs, batch_size) for n, exs in self.eval_examples().items()}


@dataclass(frozen=True)
class Score:
    """Mean next-token log-perplexity (nats per token) and top-1 token accuracy over the targets."""

    log_ppl: float
    accuracy: float
    tokens: int


@torch.no_grad()
def score_examples(model: RefragModel, examples: Sequence[Example], batch_size: int = 8) -> Score:
    """Token-weighted log-perplexity and accuracy of the examples' targets (context compressed)."""
    layouts = [x for i in range(0, len(examples), batch_size) for x in example_layouts(model, examples[i : i + batch_size])]
    return score_layouts(model, layouts, batch_size)


@torch.no_grad()
def score_layouts(model: RefragModel, layouts: Sequence[Layout], batch_size: int = 8, *,
                  adapter_on_text: bool = False) -> Score:
    """Token-weighted log-perplexity and top-1 accuracy over the labelled positions of ``layouts``
    (``adapter_on_text``: as ``RefragModel.build_inputs``)."""
    total_nll, correct, count = 0.0, 0, 0
    for start in range(0, len(layouts), batch_size):
        inputs = model.build_inputs(layouts[start : start + batch_size], adapter_on_text=adapter_on_text)
        logits, labels = model.label_logits(inputs)  # [B, K, V], [B, K]
        nll, mask = token_nll(logits, labels)  # [B, K]
        total_nll += float(nll.sum())
        correct += int(((logits.argmax(-1) == labels) & mask).sum())
        count += int(mask.sum())
    return Score(log_ppl=total_nll / max(count, 1), accuracy=correct / max(count, 1), tokens=count)
