"""The selective-expansion policy stage (the paper's Appendix A.1): GRPO on a frozen compressor.

- Trains: the policy network only (``refrag.learned_policy``); encoder, projector, decoder and its adapter stay
  as the ``--init`` checkpoint left them.
- Tasks (the reward): ``perplexity`` (the paper's): an example is s = L k context tokens and o continuation
  tokens, the reward minus the log-perplexity of the continuation with the selected chunks raw and the rest
  compressed; ``qa``: an example is a QA row (``refrag data qa``: question, passages, answer; training-allowed
  data only) in the RAG prompt, the reward minus the mean NLL of its answer (the teacher's or the gold one) with
  the selected chunks raw. The QA task's network is query-conditioned by default (it reads the question).
- Selections: G per example of T' = round(p L) chunks (pointer-masked sequential sampling); L may differ
  between QA examples (each is scored on its own).
- GRPO: advantages standardised per example's group; PPO's clipped ratio against the policy that sampled, the
  rollouts being reused for ``reuse`` consecutive optimizer steps (the PPO epochs; the reward forwards are the
  expensive part, so reuse is what makes a CPU step affordable).
- Loop: the shared one (checkpoints, logging); checkpoints fall on rollout boundaries (--steps / --save-every
  multiples of --reuse), where a resume is exact; a --max-minutes stop may fall inside a block, whose rollouts
  a resume then samples again with the current policy as the "old" one. Held-out score (``EVAL_NAMES``): the
  target's log-ppl with the greedy selection (key 1), a seeded random one at the same budget (key -1) and, for
  QA, the lexical policy's (key 0).
- One rollout batch per optimizer step: the step's examples are never split into micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, Literal, TypeVar

import numpy as np
import torch

from refrag.chunking import chunk_token_ids
from refrag.config import CompressionOptions, check_choice, check_fraction
from refrag.errors import InputError
from refrag.eval.perplexity import example_nll
from refrag.learned_policy import (
    PolicyNetConfig,
    PolicyNetwork,
    QueryInputs,
    clipped_objective,
    group_advantages,
    order_log_prob,
    query_inputs,
    sample_orders,
)
from refrag.modeling import RefragModel
from refrag.policy import choose_expanded, expansion_count
from refrag.prompting import PromptTemplate
from refrag.train.common import Recipe
from refrag.train.data import TokenCorpus, sample_window
from refrag.train.loop import TrainOptions, TrainResult, train
from refrag.train.objectives import Example, Score, example_layouts, score_examples, score_layouts
from refrag.train.qa_data import QAItem
from refrag.train.sft import SFTExample, SFTOptions, SFTTask, Target, sft_examples

RECIPE = Recipe(stage="policy", after=("cpt", "mixed", "policy"), paper_lr=1e-4)
Task = Literal["perplexity", "qa"]
EVAL_NAMES = {1: "learned (greedy)", -1: "random", 0: "lexical"}  # held-out score keys


@dataclass(frozen=True)
class PolicyOptions:
    """The policy stage's data and RL settings."""

    task: Task = "perplexity"
    query: bool | None = None  # a query-conditioned network (default: for the qa task; perplexity has no question)
    fraction: float = 0.25  # p: T' = round(p L) chunks raw per example
    context_chunks: int = 32  # L (s = L k), perplexity task
    continuation_tokens: int = 128  # o, perplexity task
    target: Target = "teacher"  # qa task: the row's teacher answer or its gold answer
    group: int = 4  # G selections per example
    reuse: int = 2  # optimizer steps per batch of rollouts (PPO epochs)
    clip: float = 0.2  # PPO ratio clip
    hidden: int = 256  # a new network's width (a policy checkpoint keeps its own)
    layers: int = 2
    lexical_prior: float = 0.0  # a new query-conditioned network starts ranking as `lexical` (learned_policy)
    seed: int = 0
    eval_examples: int = 16

    def __post_init__(self) -> None:
        check_choice(self.task, Task, "--task")
        check_fraction(self.fraction, "--expand-fraction", below_one=True)
        if self.task == "perplexity" and self.query:
            raise InputError("--query needs a question: use it with --task qa (continuations have none).")
        if self.context_chunks < 2 or self.continuation_tokens < 1:
            raise InputError("the policy needs >= 2 context chunks and a continuation (--continuation-tokens).")
        if self.group < 2:
            raise InputError(f"--group must be >= 2 (advantages are relative within a group; got {self.group}).")
        if self.reuse < 1 or not 0 < self.clip < 1:
            raise InputError("--reuse must be >= 1 and --clip in (0, 1).")
        if self.lexical_prior < 0 or (self.lexical_prior and not self.query_conditioned):
            raise InputError("--lexical-prior must be >= 0 and needs a query-conditioned policy (--task qa).")

    @property
    def query_conditioned(self) -> bool:
        return self.task == "qa" if self.query is None else self.query


@dataclass
class _Rollouts:
    """G sampled selections per example with the sampling policy's log-probabilities and the advantages."""

    inputs: list[tuple[torch.Tensor, QueryInputs | None]]  # per example: encodings [L, E], the question's inputs
    orders: list[torch.Tensor]  # per example [G, T']
    old_log_prob: torch.Tensor  # [B, G]
    advantages: torch.Tensor  # [B, G]
    reward: float  # mean reward of the batch


X = TypeVar("X", bound=Hashable)  # one task's example
Reward = Callable[[RefragModel, Sequence[X]], list[float]]  # examples with their selection set -> rewards


class _GRPO(Generic[X]):
    """GRPO over any example type (with the task's ``examples`` / ``positions`` / ``evaluate``: an
    ``objectives.Task`` for the shared loop). A task (a dataclass with ``options``, ``reward`` and ``_cache``
    fields) says what an example is, how its chunks are read, how a selection is applied and what it is worth."""

    options: PolicyOptions
    reward: Reward
    _cache: dict[tuple, _Rollouts]

    def _inputs(self, model: RefragModel, examples: Sequence[X]) -> list[tuple[torch.Tensor, QueryInputs | None]]:
        raise NotImplementedError

    def _count(self, example: X) -> int:
        raise NotImplementedError

    def _select(self, example: X, chunks: Sequence[int]) -> X:
        raise NotImplementedError

    def _ints(self, example: X) -> tuple:
        """The example's token ids: a hash without Python's per-process string salt."""
        raise NotImplementedError

    def _rollouts(self, model: RefragModel, examples: Sequence[X]) -> _Rollouts:
        network, o = _network(model), self.options
        was_training = model.training
        model.eval()  # the frozen compressor scores without dropout (the text encoder has some)
        generator = torch.Generator().manual_seed(hash(tuple(map(self._ints, examples))) & 0x7FFF_FFFF)
        with torch.no_grad(), model.memoized_encodings():  # the G layouts of an example reuse its chunks' encodings
            inputs = self._inputs(model, examples)
            logits = [network.score(enc, query) for enc, query in inputs]  # per example [L]
            orders = [sample_orders(row, self._count(ex), o.group, generator) for row, ex in zip(logits, examples)]
            old = torch.cat([order_log_prob(row[None], rows[None]) for row, rows in zip(logits, orders)])  # [B, G]
            tried = [self._select(ex, sel) for ex, rows in zip(examples, orders) for sel in rows.tolist()]
            rewards = torch.tensor(self.reward(model, tried), device=old.device).view(len(examples), o.group)  # [B, G]
        model.train(was_training)
        return _Rollouts(inputs, orders, old, group_advantages(rewards), float(rewards.mean()))

    def loss(self, model: RefragModel, examples: Sequence[X]) -> torch.Tensor:
        key = tuple(examples)
        if key not in self._cache:
            self._cache.clear()  # a new rollout batch: the previous one is done
            self._cache[key] = self._rollouts(model, examples)
        r, network = self._cache[key], _network(model)
        new = torch.cat([order_log_prob(network.score(enc, query)[None], rows[None])
                         for (enc, query), rows in zip(r.inputs, r.orders)])  # [B, G]
        return clipped_objective(new, r.old_log_prob, r.advantages, self.options.clip)

    def _greedy(self, model: RefragModel, examples: Sequence[X]) -> list[X]:
        with torch.no_grad():
            network = _network(model)
            return [self._select(ex, network.score(enc, query).topk(self._count(ex)).indices.tolist())
                    for ex, (enc, query) in zip(examples, self._inputs(model, examples))]

    def _random(self, examples: Sequence[X], sizes: Sequence[int]) -> list[X]:
        rng = np.random.default_rng(self.options.seed)
        return [self._select(ex, rng.choice(L, self._count(ex), replace=False).tolist())
                for ex, L in zip(examples, sizes)]


def negative_nll(model: RefragModel, examples: Sequence[X], layouts: Callable[[RefragModel, Sequence[X]], list],
                 batch_size: int = 8) -> list[float]:
    """Minus the mean NLL of each example's labelled tokens in ``layouts`` (``batch_size`` per forward)."""
    out: list[float] = []
    for i in range(0, len(examples), batch_size):
        out += [-v for v in example_nll(model, layouts(model, examples[i : i + batch_size]))]
    return out


def continuation_reward(model: RefragModel, examples: Sequence[Example]) -> list[float]:
    """The paper's reward: minus the mean NLL of each example's continuation with its ``expanded`` chunks raw."""
    return negative_nll(model, examples, example_layouts)


@dataclass
class PolicyTask(_GRPO[Example]):
    """The paper's task: windows of the training text, reward = minus the continuation's log-ppl."""

    train_tokens: np.ndarray
    val_tokens: np.ndarray
    k: int
    options: PolicyOptions
    reward: Reward = continuation_reward
    stage: str = "policy"
    _cache: dict[tuple, _Rollouts] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return expansion_count(self.options.context_chunks, self.options.fraction)

    def _count(self, example: Example) -> int:
        return self.count

    def _select(self, example: Example, chunks: Sequence[int]) -> Example:
        return replace(example, expanded=tuple(sorted(chunks)))

    def _ints(self, example: Example) -> tuple:
        return example.context, example.continuation

    def _windows(self, tokens: np.ndarray, n: int, rng: np.random.Generator) -> list[Example]:
        s, o = self.options.context_chunks * self.k, self.options.continuation_tokens
        windows = [sample_window(tokens, s + o, rng) for _ in range(n)]
        return [Example(tuple(w[:s]), tuple(w[s:])) for w in windows]

    def examples(self, step: int, count: int) -> list[Example]:
        """The same examples for the ``reuse`` steps of one rollout batch (a pure function of the step)."""
        return self._windows(self.train_tokens, count, np.random.default_rng((self.options.seed, step // self.options.reuse)))

    def _encode(self, model: RefragModel, examples: Sequence[Example]) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([model.encode_chunks(chunk_token_ids(ex.context, model.tokenizer, self.k))
                                for ex in examples]).float()  # [B, L, E]

    def _inputs(self, model, examples):
        return [(enc, None) for enc in self._encode(model, examples)]

    def positions(self, examples: Sequence[Example]) -> int:
        """Decoder positions scored for the rewards (G forwards per example)."""
        L, T = self.options.context_chunks, self.count
        return self.options.group * len(examples) * (L - T + T * self.k + self.options.continuation_tokens)

    def held_out(self) -> list[Example]:
        rng = np.random.default_rng((self.options.seed, 1 << 31))  # a stream no training step uses
        return self._windows(self.val_tokens, self.options.eval_examples, rng)

    def evaluate(self, model: RefragModel, batch_size: int) -> dict[int, Score]:
        """Held-out continuation log-ppl with the greedy selection (1) and with a seeded random one (-1)."""
        examples = self.held_out()
        rand = self._random(examples, [self.options.context_chunks] * len(examples))
        return {1: score_examples(model, self._greedy(model, examples), batch_size),
                -1: score_examples(model, rand, batch_size)}


@dataclass
class QAPolicyTask(_GRPO[SFTExample]):
    """QA rows in the RAG prompt (the SFT stage's reader builds the inputs), reward = minus the answer's mean NLL
    with the selected chunks raw (``answer_reward`` unless another is given); held out: the reader's last rows."""

    reader: SFTTask  # train / held-out rows and their layouts (an SFTTask that expands nothing itself)
    options: PolicyOptions
    reward: Reward | None = None
    stage: str = "policy"
    _cache: dict[tuple, _Rollouts] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reward = self.reward or self.answer_reward

    def _count(self, example: SFTExample) -> int:
        return expansion_count(len(example.chunks), self.options.fraction)

    def _select(self, example: SFTExample, chunks: Sequence[int]) -> SFTExample:
        return replace(example, expanded=frozenset(chunks))

    def _ints(self, example: SFTExample) -> tuple:
        return example.context, example.target

    def examples(self, step: int, count: int) -> list[SFTExample]:
        """The reader's seeded epochs, one batch per ``reuse`` steps."""
        return self.reader.examples(step // self.options.reuse, count)

    def _inputs(self, model, examples):
        query = _network(model).config.query
        out = []
        for ex in examples:
            enc = model.encode_chunks(ex.chunks).float()  # [L, E]
            out.append((enc, query_inputs(model.encode_chunks, ex.chunks, enc, ex.question) if query else None))
        return out

    def answer_reward(self, model: RefragModel, examples: Sequence[SFTExample]) -> list[float]:
        return negative_nll(model, examples, self.reader.layouts)

    def positions(self, examples: Sequence[SFTExample]) -> int:
        k = max((len(c.token_ids) for ex in examples for c in ex.chunks), default=1)
        return self.options.group * sum(len(ex.chunks) + self._count(ex) * (k - 1) + len(ex.target) for ex in examples)

    def evaluate(self, model: RefragModel, batch_size: int) -> dict[int, Score]:
        """Held-out answer log-ppl with the greedy (1), a random (-1) and the lexical (0) selection."""
        rows = self.reader.val_rows
        lexical = CompressionOptions(mode="refrag", policy="lexical", expand_fraction=self.options.fraction)
        sets = {1: self._greedy(model, rows), -1: self._random(rows, [len(ex.chunks) for ex in rows]),
                0: [self._select(ex, sorted(choose_expanded(ex.chunks, lexical, question=ex.question).expanded))
                    for ex in rows]}
        return {key: score_layouts(model, self.reader.batched_layouts(model, chosen, batch_size), batch_size)
                for key, chosen in sets.items()}


def _network(model: RefragModel) -> PolicyNetwork:
    if not isinstance(model.policy_network, PolicyNetwork):
        raise InputError("the model has no policy network to train.")
    return model.policy_network


def prepare(model: RefragModel, options: PolicyOptions) -> None:
    """Freeze the compressor; give the model a fresh policy network unless its checkpoint has one (it trains
    further, and must be of the kind asked for)."""
    model.requires_grad_(False)
    if model.policy_network is None:
        config = PolicyNetConfig(input_dim=model.encoder.hidden_size, hidden=options.hidden, layers=options.layers,
                                 query=options.query_conditioned, lexical_prior=options.lexical_prior)
        torch.manual_seed(options.seed)
        model.policy_network = PolicyNetwork(config).to(model.device)
    elif model.policy_network.config.query != options.query_conditioned:
        has = "query-conditioned" if model.policy_network.config.query else "question-blind"
        raise InputError(f"the --init checkpoint's policy is {has}: train it with the settings it was made with "
                         "(--query / --no-query, --task), or start from a checkpoint without a policy.")
    elif options.lexical_prior and model.policy_network.config.lexical_prior != options.lexical_prior:
        raise InputError("--lexical-prior sets where a NEW network starts; the --init checkpoint already has a "
                         "policy: drop the option, or start from a checkpoint without a policy.")
    model.policy_network.requires_grad_(True)


def _check_reuse(options: PolicyOptions, train_options: TrainOptions) -> TrainOptions:
    for name, value in (("--steps", train_options.steps), ("--save-every", train_options.save_every),
                        ("--stop-after", train_options.stop_after or 0)):
        if value % options.reuse:  # checkpoints at rollout boundaries: a resume then continues exactly
            raise InputError(f"{name} {value} must be a multiple of --reuse {options.reuse}.")
    return replace(train_options, lr=train_options.lr or RECIPE.paper_lr,
                   micro_batch_size=train_options.batch_size)  # one rollout batch per step


def train_policy(model: RefragModel, corpus: TokenCorpus, options: PolicyOptions,
                 train_options: TrainOptions) -> TrainResult:
    """The paper's task on a text corpus."""
    prepare(model, options)
    task = PolicyTask(corpus.train, corpus.val, model.k, options)
    return train(model, task, _check_reuse(options, train_options))


def train_qa_policy(model: RefragModel, items: Sequence[QAItem], options: PolicyOptions,
                    train_options: TrainOptions) -> TrainResult:
    """The QA task on ``refrag data qa`` rows (the last ``eval_examples`` held out)."""
    sft = SFTOptions(target=options.target, expand_share=0.0, eval_examples=options.eval_examples, seed=options.seed)
    examples = [ex for ex in sft_examples(model, items, sft) if len(ex.chunks) >= 2]  # a choice needs 2 chunks
    if len(examples) <= options.eval_examples:
        raise InputError(f"{len(examples)} usable rows of {len(items)} (an answer and >= 2 chunks of passages): need "
                         f"more than --eval-examples {options.eval_examples} (the last rows are held out).")
    prepare(model, options)
    cut = len(examples) - options.eval_examples
    reader = SFTTask(examples[:cut], examples[cut:], sft, PromptTemplate.for_tokenizer(model.tokenizer))
    return train(model, QAPolicyTask(reader, options), _check_reuse(options, train_options))
