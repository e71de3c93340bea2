"""Stage 4, answering from compressed context (SFT), by distillation from the full-context decoder.

- Trains: as CPT: the encoder (unless ``train_encoder`` is off), the projector and the decoder's LoRA adapter
  (which applies to compressed inputs only, so full mode stays the original decoder); starts from a cpt,
  mixed or sft checkpoint.
- Input: the RAG prompt generation builds (``prompting.rag_segments``: template, the row's passages, question,
  assistant turn), every chunk compressed except, for ``expand_share`` of the examples (seeded), the chunks the
  expansion policy keeps raw at ``expand_fraction``: what inference will do.
- Target: the answer tokens + EOS, loss on them only: the full-context decoder's own answer (``target="teacher"``,
  sequence-level distillation as PISCO, default) or the row's ``answer`` (``"gold"``); ``distill`` > 0 mixes in
  the token-level KL to the original decoder reading every chunk as text, on the same target (as CPT's).
- Examples: a seeded permutation of the training rows per epoch (a pure function of the step: exact resume).
- Held out: the last ``eval_examples`` rows of the file, never trained on: the target's log-ppl and token
  accuracy with every chunk compressed (key 0) and with the policy's expansion (key 1).
- ``read="text"``: the fair baseline (the paper's LLaMA_FT): the same rows and loss, every chunk read as text, a
  fresh decoder adapter that runs on text (the compressor is not used and does not train). Its adapter folder
  (``final/decoder_adapter``) is then a user adapter: ``refrag eval qa --modes full --decoder-adapter ...``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from refrag.chunking import Passage, split_passages
from refrag.config import ChunkingOptions, CompressionOptions, PolicyName, check_choice, check_fraction
from refrag.errors import InputError
from refrag.modeling import Layout, RefragModel, mean_nll
from refrag.policy import choose_expanded
from refrag.prompting import PromptTemplate
from refrag.train.common import Recipe, StageOptions, set_trainable
from refrag.train.loop import TrainOptions, TrainResult, train
from refrag.train.objectives import Score, kl_to_teacher, score_layouts
from refrag.train.qa_data import QAItem

RECIPE = Recipe(stage="sft", after=("cpt", "mixed", "sft"), paper_lr=2e-5)
TEXT_STAGE = "sft-text"  # the baseline's checkpoints: a text adapter, never the start of a compressor stage
Target = Literal["teacher", "gold"]
Read = Literal["compressed", "text"]
ENCODING_FREE_POLICIES = ("none", "first", "last", "random", "lexical")  # need no chunk encodings, no model


@dataclass(frozen=True)
class SFTOptions:
    target: Target = "teacher"
    distill: float = 0.0  # weight of the token-level KL to the full-context decoder
    policy: PolicyName = "lexical"
    expand_fraction: float = 0.1
    expand_share: float = 0.5  # share of the examples trained with the policy's expansion (the rest: none)
    max_target_tokens: int = 32
    eval_examples: int = 32
    train_encoder: bool = True
    read: Read = "compressed"  # text: the full-context fine-tuning baseline (module docstring)
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.target, Target, "--target")
        check_choice(self.read, Read, "--read")
        if self.read == "text" and self.distill:
            raise InputError("--read text trains the full-context decoder itself: --distill (a KL to it) must be 0.")
        if self.policy not in ENCODING_FREE_POLICIES:
            raise InputError(f"--policy {self.policy!r}: training chooses chunks without encodings; use one of "
                             f"{', '.join(ENCODING_FREE_POLICIES)}.")
        check_fraction(self.expand_fraction, "--expand-fraction", below_one=True)
        if not 0.0 <= self.expand_share <= 1.0 or not 0.0 <= self.distill <= 1.0:
            raise InputError("--expand-share and --distill must be in [0, 1].")
        if self.max_target_tokens < 1 or self.eval_examples < 1:
            raise InputError("--max-target-tokens and --eval-examples must be >= 1.")

    @property
    def reads_text(self) -> bool:
        """The text baseline: every chunk raw, the adapter on text."""
        return self.read == "text"


@dataclass(frozen=True)
class SFTExample:
    """One row ready for the decoder: passages cut into chunks, the target tokens, the chunks kept raw."""

    question: str
    passages: tuple[Passage, ...]
    target: tuple[int, ...]  # answer tokens + EOS
    expanded: frozenset[int] = frozenset()

    @property
    def context(self) -> tuple[int, ...]:
        """Every context token (the loop sorts micro-batches by length)."""
        return tuple(t for p in self.passages for t in p.token_ids)

    @property
    def chunks(self) -> list:
        return [c for p in self.passages for c in p.chunks]


@dataclass
class SFTTask:
    """The shared loop's task (``objectives.Task``) for SFT rows."""

    train_rows: list[SFTExample]
    val_rows: list[SFTExample]
    options: SFTOptions
    template: PromptTemplate
    stage: str = field(init=False)  # TEXT_STAGE for the text baseline, else RECIPE.stage
    _question_ids: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stage = TEXT_STAGE if self.text else RECIPE.stage

    @property
    def text(self) -> bool:
        return self.options.reads_text

    def examples(self, step: int, count: int) -> list[SFTExample]:
        n, out, orders = len(self.train_rows), [], {}
        for i in range(step * count, (step + 1) * count):
            epoch, at = divmod(i, n)
            if epoch not in orders:  # one seeded permutation per epoch
                orders[epoch] = np.random.default_rng((self.options.seed, epoch)).permutation(n)
            out.append(self.train_rows[int(orders[epoch][at])])
        rng = np.random.default_rng((self.options.seed, 1 << 30, step))
        return [self._expanded(ex) if rng.random() < self.options.expand_share else ex for ex in out]

    def _expanded(self, ex: SFTExample) -> SFTExample:
        selection = CompressionOptions(mode="refrag", policy=self.options.policy,
                                       expand_fraction=self.options.expand_fraction, seed=self.options.seed)
        chosen = choose_expanded(ex.chunks, selection, encodings=None, question=ex.question)
        return replace(ex, expanded=frozenset(chosen.expanded))

    def layouts(self, model: RefragModel, examples: Sequence[SFTExample], *, text: bool = False) -> list[Layout]:
        """Labelled layouts: the RAG prompt (chunks compressed but the expanded ones; ``text``: every chunk raw, the
        full-context teacher's input) + the target. Every compressed chunk of the batch is encoded in one call."""
        text = text or self.text
        expanded = [frozenset(range(len(ex.chunks))) if text else ex.expanded for ex in examples]
        contexts = model.contexts([[p.chunks for p in ex.passages] for ex in examples], expanded,
                                  self.template.separator_ids)
        return [model.scored_layout(self.template.around(context, self._question(model, ex.question)), ex.target)
                for ex, context in zip(examples, contexts)]

    def batched_layouts(self, model: RefragModel, rows: Sequence[SFTExample], batch_size: int) -> list[Layout]:
        """``layouts`` of many rows, ``batch_size`` rows per encoder call."""
        return [layout for i in range(0, len(rows), batch_size) for layout in self.layouts(model, rows[i : i + batch_size])]

    def _question(self, model: RefragModel, question: str) -> list[int]:
        if question not in self._question_ids:
            self._question_ids[question] = self.template.question_ids(model.tokenizer, question)
        return self._question_ids[question]

    def loss(self, model: RefragModel, examples: Sequence[SFTExample]) -> torch.Tensor:
        inputs = model.build_inputs(self.layouts(model, examples), adapter_on_text=self.text)
        logits, labels = model.label_logits(inputs)  # [B, K, V], [B, K]
        ce = mean_nll(logits, labels)
        if not self.options.distill:
            return ce
        teacher = self.layouts(model, examples, text=True)
        return (1 - self.options.distill) * ce + self.options.distill * kl_to_teacher(model, teacher, logits, labels)

    def positions(self, examples: Sequence[SFTExample]) -> int:
        return sum(len(ex.target) + (len(ex.context) if self.text else len(ex.chunks)) for ex in examples)

    @torch.no_grad()
    def evaluate(self, model: RefragModel, batch_size: int) -> dict[int, Score]:
        """Held-out target log-ppl / accuracy, every chunk compressed (0) and with the policy's expansion (1); the
        text baseline: every chunk as text (0)."""
        plain = self.val_rows
        sets = ((0, plain),) if self.text else ((0, plain), (1, [self._expanded(ex) for ex in plain]))
        return {key: score_layouts(model, self.batched_layouts(model, rows, batch_size), batch_size,
                                   adapter_on_text=self.text)
                for key, rows in sets}


def sft_examples(model: RefragModel, items: Sequence[QAItem], options: SFTOptions) -> list[SFTExample]:
    """Rows -> examples: passages cut into the model's chunks, the chosen answer + EOS as the target."""
    tok, chunking = model.tokenizer, ChunkingOptions(k=model.k)
    eos = tok.eos_token_id
    out = []
    for it in items:
        answer = (it.teacher if options.target == "teacher" else it.answer).strip()
        if not answer:
            continue
        target = tok.encode(answer, add_special_tokens=False)[: options.max_target_tokens]
        passages = tuple(p for text in it.passages for p in split_passages(text, tok, chunking))
        out.append(SFTExample(it.question, passages, tuple(target + ([eos] if eos is not None else []))))
    return out


def train_sft(model: RefragModel, items: Sequence[QAItem], options: SFTOptions, train_options: TrainOptions,
              *, lora_rank: int = 32) -> TrainResult:
    """Mark what trains (the adapter of a cpt checkpoint trains further; the text baseline: a fresh adapter of a
    model without one, nothing of the compressor), hold out the last rows, run the loop."""
    if options.reads_text and model.has_adapter:
        raise InputError("--read text trains a new text adapter of the plain decoder: start it without --init.")
    if len(items) <= options.eval_examples:
        raise InputError(f"{len(items)} rows: need more than --eval-examples {options.eval_examples} (the last rows "
                         "are held out).")
    set_trainable(model, StageOptions(train_decoder="lora", train_encoder=options.train_encoder and not options.reads_text,
                                      lora_rank=lora_rank), bf16=train_options.bf16)
    if options.reads_text:
        model.projector.requires_grad_(False)
    examples = sft_examples(model, items, options)
    cut = len(examples) - options.eval_examples
    task = SFTTask(examples[:cut], examples[cut:], options, PromptTemplate.for_tokenizer(model.tokenizer))
    return train(model, task, replace(train_options, lr=train_options.lr or RECIPE.paper_lr))
