"""`refrag train policy`: GRPO through the shared loop, on a synthetic task whose right chunks are known."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from refrag import checkpoint
from refrag.chunking import chunk_token_ids
from refrag.errors import InputError
from refrag.train.loop import TrainOptions, train
from refrag.train.policy import PolicyOptions, PolicyTask, prepare
from tests.conftest import tiny_refrag

MARK = 7  # the token the synthetic reward looks for


def marker_reward(model, examples):
    """Share of the context's marker tokens that sit in expanded chunks (the right chunks are the marked ones)."""
    out = []
    for ex in examples:
        chunks = chunk_token_ids(ex.context, model.tokenizer, model.k)
        marks = [sum(t == MARK for t in c.token_ids) for c in chunks]
        out.append(sum(marks[i] for i in ex.expanded) / max(sum(marks), 1))
    return out


def stream(n: int, seed: int) -> np.ndarray:
    """Random tokens with runs of 6 markers (one run per ~64 tokens: a run covers one or two chunks of 4)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 60, n)
    for start in np.nonzero(rng.random(n) < 1 / 64)[0]:
        tokens[start : start + 6] = MARK
    return tokens


def test_grpo_learns_to_expand_the_marked_chunks(tmp_path):
    torch.manual_seed(0)
    model = tiny_refrag("llama", k=4)
    options = PolicyOptions(fraction=0.25, context_chunks=8, continuation_tokens=4, group=8, reuse=2, hidden=32,
                            layers=1, eval_examples=8)
    prepare(model, options)
    task = PolicyTask(stream(20_000, 0), stream(2_000, 1), model.k, options, reward=marker_reward)
    held_out = task._windows(task.val_tokens, 64, np.random.default_rng(5))

    def reward_of(scores) -> float:  # the mean reward of the top-T' chunks by these scores
        chosen = [replace(ex, expanded=tuple(row.topk(task.count).indices.tolist())) for ex, row in zip(held_out, scores)]
        return float(np.mean(marker_reward(model, chosen)))

    def greedy() -> float:
        enc = task._encode(model, held_out)
        with torch.no_grad():
            return reward_of(model.policy_network(enc, torch.ones(enc.shape[:2], dtype=torch.bool)))

    marks = torch.tensor([[float(sum(t == MARK for t in c.token_ids)) for c in chunk_token_ids(ex.context, model.tokenizer, 4)]
                          for ex in held_out])
    oracle, before = reward_of(marks + 1e-3 * torch.rand_like(marks)), greedy()
    result = train(model, task, TrainOptions(tmp_path / "run", steps=30, batch_size=16, micro_batch_size=16,
                                             lr=3e-3, bf16=False, eval_every=0, save_every=10, progress=False))
    after = greedy()
    assert before < 0.6 * oracle and after > 0.9 * oracle, (before, after, oracle)
    assert set(result.eval) == {8, -8}  # held-out log-ppl with the greedy and with a random selection
    manifest = checkpoint.CheckpointManifest.read(result.final_dir)
    assert manifest.stage == "policy" and manifest.policy == "policy" and (result.final_dir / "policy").is_dir()


def test_rollouts_are_reused_for_the_ppo_epochs_and_examples_depend_only_on_the_step():
    model = tiny_refrag("llama", k=4)
    options = PolicyOptions(context_chunks=4, continuation_tokens=3, group=2, reuse=3, hidden=16, layers=1)
    prepare(model, options)
    task = PolicyTask(stream(2_000, 0), stream(500, 1), model.k, options, reward=marker_reward)
    assert task.examples(0, 2) == task.examples(2, 2) != task.examples(3, 2)
    optimizer = torch.optim.SGD(model.policy_network.parameters(), lr=1.0)
    torch.nn.init.normal_(model.policy_network.head.weight)  # a non-uniform policy, so a step moves the ratio
    first = task._rollouts(model, task.examples(0, 2))
    task._cache = {tuple(task.examples(0, 2)): first}
    task.loss(model, task.examples(0, 2)).backward()
    optimizer.step()
    task.loss(model, task.examples(1, 2))
    assert task._cache[tuple(task.examples(1, 2))] is first  # the same rollouts: ratio against the sampler
    from refrag.learned_policy import order_log_prob
    from refrag.train.policy import _logits

    moved = order_log_prob(_logits(model.policy_network, first.encodings), first.orders)
    assert not torch.allclose(moved, first.old_log_prob)  # the second PPO epoch sees a ratio != 1
    assert all(p.requires_grad == n.startswith("policy_network.") for n, p in model.named_parameters())


def test_bad_policy_options_are_clear():
    with pytest.raises(InputError, match="expand-fraction"):
        PolicyOptions(fraction=-0.1)
    with pytest.raises(InputError, match="group"):
        PolicyOptions(group=1)
