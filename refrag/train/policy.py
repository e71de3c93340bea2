"""The selective-expansion policy stage (the paper's Appendix A.1): GRPO on a frozen compressor.

- Trains: the policy network only (``refrag.learned_policy``); encoder, projector, decoder and its adapter stay
  as the ``--init`` checkpoint left them.
- An example: s = L k context tokens and o continuation tokens. The policy samples G selections of
  T' = round(p L) chunks (pointer-masked sequential sampling); each selection's reward is minus the
  log-perplexity of the continuation with those chunks raw and the rest compressed (the paper's task).
- GRPO: advantages standardised per example's group; PPO's clipped ratio against the policy that sampled, the
  rollouts being reused for ``reuse`` consecutive optimizer steps (the PPO epochs; the reward forwards are the
  expensive part, so reuse is what makes a CPU step affordable).
- Loop: the shared one (checkpoints, logging); checkpoints fall on rollout boundaries (--steps / --save-every
  multiples of --reuse), where a resume is exact; a --max-minutes stop may fall inside a block, whose rollouts
  a resume then samples again with the current policy as the "old" one. Held-out score: the continuation's
  log-ppl with the greedy selection (key L), next to a random selection's at the same budget (key -L).
- One rollout batch per optimizer step: the step's examples are never split into micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from refrag.chunking import chunk_token_ids
from refrag.config import check_fraction
from refrag.errors import InputError
from refrag.eval.perplexity import example_nll
from refrag.learned_policy import (
    PolicyNetConfig,
    PolicyNetwork,
    clipped_objective,
    group_advantages,
    order_log_prob,
    sample_orders,
)
from refrag.modeling import RefragModel
from refrag.policy import expansion_count
from refrag.train.common import Recipe
from refrag.train.data import TokenCorpus, sample_window
from refrag.train.loop import TrainOptions, TrainResult, train
from refrag.train.objectives import Example, Score, example_layouts, score_examples

RECIPE = Recipe(stage="policy", after=("cpt", "mixed", "policy"), paper_lr=1e-4)


@dataclass(frozen=True)
class PolicyOptions:
    """The policy stage's data and RL settings."""

    fraction: float = 0.25  # p: T' = round(p L) chunks raw per example
    context_chunks: int = 32  # L (s = L k)
    continuation_tokens: int = 128  # o
    group: int = 4  # G selections per example
    reuse: int = 2  # optimizer steps per batch of rollouts (PPO epochs)
    clip: float = 0.2  # PPO ratio clip
    hidden: int = 256  # a new network's width (a policy checkpoint keeps its own)
    layers: int = 2
    seed: int = 0
    eval_examples: int = 16

    def __post_init__(self) -> None:
        check_fraction(self.fraction, "--expand-fraction", below_one=True)
        if self.context_chunks < 2 or self.continuation_tokens < 1:
            raise InputError("the policy needs >= 2 context chunks and a continuation (--continuation-tokens).")
        if self.group < 2:
            raise InputError(f"--group must be >= 2 (advantages are relative within a group; got {self.group}).")
        if self.reuse < 1 or not 0 < self.clip < 1:
            raise InputError("--reuse must be >= 1 and --clip in (0, 1).")


@dataclass
class _Rollouts:
    """G sampled selections per example with the sampling policy's log-probabilities and the advantages."""

    encodings: torch.Tensor  # [B, L, E]
    orders: torch.Tensor  # [B, G, T']
    old_log_prob: torch.Tensor  # [B, G]
    advantages: torch.Tensor  # [B, G]
    reward: float  # mean reward (minus log-ppl) of the batch


Reward = Callable[[RefragModel, Sequence[Example]], list[float]]  # examples with ``expanded`` set -> rewards


def continuation_reward(model: RefragModel, examples: Sequence[Example], batch_size: int = 8) -> list[float]:
    """The paper's reward: minus the mean NLL of each example's continuation with its ``expanded`` chunks raw."""
    out: list[float] = []
    for i in range(0, len(examples), batch_size):
        out += [-v for v in example_nll(model, example_layouts(model, examples[i : i + batch_size]))]
    return out


@dataclass
class PolicyTask:
    """GRPO examples and loss for the shared loop (``objectives.Task``)."""

    train_tokens: np.ndarray
    val_tokens: np.ndarray
    k: int
    options: PolicyOptions
    reward: Reward = continuation_reward
    stage: str = "policy"
    _cache: dict[tuple[Example, ...], _Rollouts] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return expansion_count(self.options.context_chunks, self.options.fraction)

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

    def _rollouts(self, model: RefragModel, examples: Sequence[Example]) -> _Rollouts:
        network, o = _network(model), self.options
        was_training = model.training
        model.eval()  # the frozen compressor scores without dropout (the text encoder has some)
        encodings = self._encode(model, examples)
        generator = torch.Generator().manual_seed(hash(tuple(examples)) & 0x7FFF_FFFF)  # ints only: no hash salt
        with torch.no_grad():
            logits = _logits(network, encodings)  # [B, L]
            orders = torch.stack([sample_orders(row, self.count, o.group, generator) for row in logits])  # [B, G, T']
            old = order_log_prob(logits, orders)
            tried = [replace(ex, expanded=tuple(sorted(sel))) for ex, rows in zip(examples, orders.tolist())
                     for sel in rows]
            rewards = torch.tensor(self.reward(model, tried), device=logits.device).view(len(examples), o.group)  # [B, G]
        model.train(was_training)
        return _Rollouts(encodings, orders, old, group_advantages(rewards), float(rewards.mean()))

    def loss(self, model: RefragModel, examples: Sequence[Example]) -> torch.Tensor:
        key = tuple(examples)
        if key not in self._cache:
            self._cache.clear()  # a new rollout batch: the previous one is done
            self._cache[key] = self._rollouts(model, examples)
        r = self._cache[key]
        logits = _logits(_network(model), r.encodings)
        return clipped_objective(order_log_prob(logits, r.orders), r.old_log_prob, r.advantages, self.options.clip)

    def positions(self, examples: Sequence[Example]) -> int:
        """Decoder positions scored for the rewards (G forwards per example)."""
        L, T = self.options.context_chunks, self.count
        return self.options.group * len(examples) * (L - T + T * self.k + self.options.continuation_tokens)

    def held_out(self) -> list[Example]:
        rng = np.random.default_rng((self.options.seed, 1 << 31))  # a stream no training step uses
        return self._windows(self.val_tokens, self.options.eval_examples, rng)

    def evaluate(self, model: RefragModel, batch_size: int) -> dict[int, Score]:
        """Held-out continuation log-ppl with the greedy selection (key L) and with a seeded random one (key -L,
        the RAND baseline at the same budget)."""
        examples = self.held_out()
        encodings = self._encode(model, examples)
        with torch.no_grad():
            logits = _logits(_network(model), encodings)
        greedy = [replace(ex, expanded=tuple(sorted(row.topk(self.count).indices.tolist())))
                  for ex, row in zip(examples, logits)]
        rng = np.random.default_rng(self.options.seed)
        L = self.options.context_chunks
        rand = [replace(ex, expanded=tuple(sorted(rng.choice(L, self.count, replace=False).tolist()))) for ex in examples]
        return {L: score_examples(model, greedy, batch_size), -L: score_examples(model, rand, batch_size)}


def _logits(network: PolicyNetwork, encodings: torch.Tensor) -> torch.Tensor:
    """[B, L, E] -> [B, L] in fp32 (outside the loop's bf16 autocast: sampling and ratios need the precision)."""
    mask = torch.ones(encodings.shape[:2], dtype=torch.bool, device=encodings.device)
    with torch.autocast(device_type=encodings.device.type, enabled=False):
        return network(encodings.float(), mask)


def _network(model: RefragModel) -> PolicyNetwork:
    if not isinstance(model.policy_network, PolicyNetwork):
        raise InputError("the model has no policy network to train.")
    return model.policy_network


def prepare(model: RefragModel, options: PolicyOptions) -> None:
    """Freeze the compressor; give the model a fresh policy network unless its checkpoint has one (it trains
    further)."""
    model.requires_grad_(False)
    if model.policy_network is None:
        config = PolicyNetConfig(input_dim=model.encoder.hidden_size, hidden=options.hidden, layers=options.layers)
        torch.manual_seed(options.seed)
        model.policy_network = PolicyNetwork(config).to(model.device)
    model.policy_network.requires_grad_(True)


def train_policy(model: RefragModel, corpus: TokenCorpus, options: PolicyOptions,
                 train_options: TrainOptions) -> TrainResult:
    prepare(model, options)
    for name, value in (("--steps", train_options.steps), ("--save-every", train_options.save_every),
                        ("--stop-after", train_options.stop_after or 0)):
        if value % options.reuse:  # checkpoints at rollout boundaries: a resume then continues exactly
            raise InputError(f"{name} {value} must be a multiple of --reuse {options.reuse}.")
    task = PolicyTask(corpus.train, corpus.val, model.k, options)
    train_options = replace(train_options, lr=train_options.lr or RECIPE.paper_lr,
                            micro_batch_size=train_options.batch_size)  # one rollout batch per step
    return train(model, task, train_options)
