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
- Replay (``replay`` > 0): that share of every batch is next-paragraph windows of training text (CPT's objective:
  ``replay_chunks`` compressed chunks, then ``replay_tokens`` to predict), so answering short questions cannot
  retune the vectors away from carrying the text (SFT alone made the perplexity protocol collapse twice:
  docs/training.md). Their held-out windows are scored too (key ``replay_chunks``), so a collapse shows in the log.
- Held out: the last ``eval_examples`` rows of the file, never trained on: the target's log-ppl and token
  accuracy with every chunk compressed (key 0) and with the policy's expansion (key 1).
- ``learn="adapter"``: the compressor (encoder, projector, its decoder adapter) stays frozen and a new answer
  adapter (``RefragModel.add_answer_adapter``) trains on the same mixed input: it runs beside the compressor's
  adapter on compressed inputs, at every position, so the chunk vectors cannot move (refrag mode's perplexity can,
  through the adapter at text positions: measure it); the checkpoint keeps it as ``answer_adapter/``.
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

from refrag.checkpoint import COMPRESSOR_STAGE
from refrag.chunking import Chunk, Passage, request_chunks, split_passages
from refrag.config import ChunkingOptions, CompressionOptions, PolicyName, check_choice, check_fraction
from refrag.errors import InputError
from refrag.modeling import Layout, RefragModel, mean_nll
from refrag.policy import choose_expanded
from refrag.prompting import PromptTemplate
from refrag.train.common import Recipe, StageOptions, set_trainable
from refrag.train.data import TokenCorpus
from refrag.train.loop import TrainOptions, TrainResult, train
from refrag.train.objectives import Example, Score, StageTask, kl_to_teacher, score_layouts, training_loss
from refrag.train.qa_data import QAItem

RECIPE = Recipe(stage="sft", after=("cpt", "mixed", "sft"), paper_lr=2e-5)
TEXT_STAGE = "sft-text"  # the baseline's checkpoints: a text adapter, never the start of a compressor stage
Target = Literal["teacher", "gold"]
Read = Literal["compressed", "text"]
Learn = Literal["compressor", "adapter"]
ENCODING_FREE_POLICIES = ("none", "first", "last", "random", "lexical", "lexical-passage")  # need no chunk encodings, no model


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
    learn: Learn = "compressor"  # adapter: a new answer adapter, the compressor frozen (module docstring)
    replay: float = 0.0  # share of each batch that is next-paragraph windows of training text (module docstring)
    replay_chunks: int = 16  # compressed context chunks of a replay window
    replay_tokens: int = 64  # continuation tokens it predicts
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.target, Target, "--target")
        check_choice(self.read, Read, "--read")
        check_choice(self.learn, Learn, "--learn")
        if self.learn == "adapter" and (self.reads_text or self.replay):
            raise InputError("--learn adapter keeps the compressor frozen: --read text (a text adapter of the plain "
                             "decoder) and --replay (the compressor's own objective) do not apply to it.")
        if self.read == "text" and self.distill:
            raise InputError("--read text trains the full-context decoder itself: --distill (a KL to it) must be 0.")
        if self.policy not in ENCODING_FREE_POLICIES:
            raise InputError(f"--policy {self.policy!r}: training chooses chunks without encodings; use one of "
                             f"{', '.join(ENCODING_FREE_POLICIES)}.")
        check_fraction(self.expand_fraction, "--expand-fraction", below_one=True)
        if not 0.0 <= self.expand_share <= 1.0 or not 0.0 <= self.distill <= 1.0:
            raise InputError("--expand-share and --distill must be in [0, 1].")
        if not 0.0 <= self.replay < 1.0:
            raise InputError(f"--replay is a share of each batch in [0, 1) (got {self.replay}).")
        if self.replay and self.reads_text:
            raise InputError("--replay keeps the compressor's text objective: it has no meaning with --read text.")
        if self.replay_chunks < 1 or self.replay_tokens < 1:
            raise InputError("replay windows need >= 1 chunk and >= 1 continuation token.")
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
    def chunks(self) -> list[Chunk]:
        return request_chunks(self.passages)


@dataclass
class SFTTask:
    """The shared loop's task (``objectives.Task``) for SFT rows (and, with ``replay``, next-paragraph windows)."""

    train_rows: list[SFTExample]
    val_rows: list[SFTExample]
    options: SFTOptions
    template: PromptTemplate
    replay: StageTask | None = None  # the replay windows' source (``replay_task``); None: no replay
    stage: str = field(init=False)  # TEXT_STAGE for the text baseline, else RECIPE.stage
    _question_ids: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stage = TEXT_STAGE if self.text else RECIPE.stage

    @property
    def text(self) -> bool:
        return self.options.reads_text

    def examples(self, step: int, count: int) -> list[SFTExample | Example]:
        """The step's rows (each epoch a seeded permutation), then its replay windows: a pure function of the step."""
        windows = round(self.options.replay * count) if self.replay is not None else 0
        rows = count - windows
        n, out, orders = len(self.train_rows), [], {}
        for i in range(step * rows, (step + 1) * rows):
            epoch, at = divmod(i, n)
            if epoch not in orders:  # one seeded permutation per epoch
                orders[epoch] = np.random.default_rng((self.options.seed, epoch)).permutation(n)
            out.append(self.train_rows[int(orders[epoch][at])])
        rng = np.random.default_rng((self.options.seed, 1 << 30, step))
        out = [self._expanded(ex) if rng.random() < self.options.expand_share else ex for ex in out]
        return out + (self.replay.examples(step, windows) if windows else [])

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

    def loss(self, model: RefragModel, examples: Sequence[SFTExample | Example]) -> torch.Tensor:
        """The mean over the micro-batch: answer loss for its rows, next-paragraph loss for its replay windows."""
        rows = [ex for ex in examples if isinstance(ex, SFTExample)]
        windows = [ex for ex in examples if not isinstance(ex, SFTExample)]
        parts = [(len(rows), self._answer_loss(model, rows))] if rows else []
        if windows:
            parts.append((len(windows), training_loss(model, windows, self.options.distill)))
        return sum(n * loss for n, loss in parts) / len(examples)

    def _answer_loss(self, model: RefragModel, examples: Sequence[SFTExample]) -> torch.Tensor:
        inputs = model.build_inputs(self.layouts(model, examples), adapter_on_text=self.text)
        logits, labels = model.label_logits(inputs)  # [B, K, V], [B, K]
        ce = mean_nll(logits, labels)
        if not self.options.distill:
            return ce
        teacher = self.layouts(model, examples, text=True)
        return (1 - self.options.distill) * ce + self.options.distill * kl_to_teacher(model, teacher, logits, labels)

    def positions(self, examples: Sequence[SFTExample | Example]) -> int:
        rows = [ex for ex in examples if isinstance(ex, SFTExample)]
        windows = [ex for ex in examples if not isinstance(ex, SFTExample)]
        return (sum(len(ex.target) + (len(ex.context) if self.text else len(ex.chunks)) for ex in rows)
                + (self.replay.positions(windows) if windows else 0))

    @torch.no_grad()
    def evaluate(self, model: RefragModel, batch_size: int) -> dict[int, Score]:
        """Held-out target log-ppl / accuracy, every chunk compressed (0) and with the policy's expansion (1); the
        text baseline: every chunk as text (0); with replay, its held-out windows' continuation (``replay_chunks``)."""
        plain = self.val_rows
        sets = ((0, plain),) if self.text else ((0, plain), (1, [self._expanded(ex) for ex in plain]))
        scores = {key: score_layouts(model, self.batched_layouts(model, rows, batch_size), batch_size,
                                     adapter_on_text=self.text)
                  for key, rows in sets}
        return scores | (self.replay.evaluate(model, batch_size) if self.replay is not None else {})


def replay_task(corpus: TokenCorpus, k: int, options: SFTOptions) -> StageTask:
    """Next-paragraph windows (CPT's examples) for SFT's replay, and their held-out windows (16 of them)."""
    return StageTask(stage=RECIPE.stage, train_tokens=corpus.train, val_tokens=corpus.val, k=k,
                     order=[options.replay_chunks], continuation_tokens=options.replay_tokens,
                     distill=options.distill, seed=options.seed, eval_chunks=(options.replay_chunks,),
                     eval_per_type=16)


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
              *, lora_rank: int = 32, replay_corpus: TokenCorpus | None = None) -> TrainResult:
    """Mark what trains (the adapter of a cpt checkpoint trains further; ``learn="adapter"``: a fresh answer
    adapter beside it, nothing of the compressor; the text baseline: a fresh adapter of a model without one),
    hold out the last rows, run the loop. ``replay_corpus``: the training text of ``options.replay``'s windows
    (needed when it is > 0)."""
    if options.replay and replay_corpus is None:
        raise InputError("--replay needs training text for its windows (--replay-data).")
    if options.reads_text and model.has_adapter:
        raise InputError("--read text trains a new text adapter of the plain decoder: start it without --init.")
    if len(items) <= options.eval_examples:
        raise InputError(f"{len(items)} rows: need more than --eval-examples {options.eval_examples} (the last rows "
                         "are held out).")
    adapter_only = options.learn == "adapter"
    new_rank = None if model.has_adapter or adapter_only else lora_rank  # a compressor's adapter keeps its rank
    set_trainable(model, StageOptions(train_decoder="frozen" if adapter_only else "lora", lora_rank=new_rank,
                                      train_encoder=options.train_encoder and not (options.reads_text or adapter_only)),
                  bf16=train_options.bf16)
    if options.reads_text or adapter_only:
        model.projector.requires_grad_(False)
    if adapter_only:
        model.add_answer_adapter(lora_rank)
        extra = model.config.extra  # the compressor's stage stays on record: later stages continue from it
        if "stage" in extra:
            model.config = replace(model.config, extra={**extra, COMPRESSOR_STAGE: extra["stage"]})
    examples = sft_examples(model, items, options)
    cut = len(examples) - options.eval_examples
    replay = replay_task(replay_corpus, model.k, options) if options.replay and replay_corpus is not None else None
    task = SFTTask(examples[:cut], examples[cut:], options, PromptTemplate.for_tokenizer(model.tokenizer), replay)
    return train(model, task, replace(train_options, lr=train_options.lr or RECIPE.paper_lr))
