"""The learned expansion policy: pointer-masked sampling, its log-probability, GRPO's pieces, the network at the
policy seam, and its place in a checkpoint."""

import itertools
import json
import math

import pytest
import torch
from conftest import tiny_refrag

from refrag import checkpoint
from refrag.config import CompressionOptions
from refrag.errors import CheckpointError, InputError
from refrag.learned_policy import (
    PolicyNetConfig,
    PolicyNetwork,
    clipped_objective,
    group_advantages,
    order_log_prob,
    sample_orders,
)
from refrag.policy import Budget, choose_expanded, make_policy, select


def test_pointer_masking_never_picks_a_chunk_twice_and_picks_exactly_t():
    logits = torch.tensor([3.0, -1.0, 0.5, float("-inf"), 2.0, 0.0])
    orders = sample_orders(logits, 3, samples=500, generator=torch.Generator().manual_seed(0))
    assert orders.shape == (500, 3)
    assert all(len(set(row)) == 3 and 3 not in row for row in orders.tolist())  # distinct, never a masked chunk
    with pytest.raises(InputError):
        sample_orders(logits, 6, samples=1)  # only 5 real chunks


def test_order_log_prob_is_the_sequential_softmax_and_sums_to_one_over_all_orders():
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0]])
    orders = torch.tensor(list(itertools.permutations(range(4), 2)))[None]  # [1, 12, 2]
    lp = order_log_prob(logits, orders)  # [1, 12]
    assert float(lp.exp().sum()) == pytest.approx(1.0, abs=1e-6)
    p = logits[0].softmax(-1)
    first, second = 3, 0  # by hand: p(3) * p(0 | 3 taken)
    by_hand = math.log(p[first]) + math.log(p[second] / (1 - p[first]))
    index = [tuple(o) for o in orders[0].tolist()].index((first, second))
    assert float(lp[0, index]) == pytest.approx(by_hand, abs=1e-5)


def test_sampling_frequencies_follow_the_policy():
    logits = torch.tensor([1.0, 0.0, -1.0])
    picks = sample_orders(logits, 1, samples=20_000, generator=torch.Generator().manual_seed(1))[:, 0]
    freq = torch.bincount(picks, minlength=3).float() / len(picks)
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.015, rtol=0)


def test_grpo_advantage_is_normalised_per_group_and_the_ratio_is_clipped():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-10.0, -10.0, -9.0, -11.0]])
    adv = group_advantages(rewards)
    torch.testing.assert_close(adv.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.std(1, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    assert group_advantages(torch.ones(1, 4)).abs().max() == 0  # equal rewards: no signal
    old = torch.zeros(1, 2)
    a = torch.tensor([[1.0, -1.0]])
    assert float(clipped_objective(old, old, a)) == 0.0  # ratio 1: -mean(A)
    far = torch.tensor([[1.0, 1.0]])  # ratio e ~ 2.7 on both
    # positive advantage: the gain is capped at 1.2 A; negative advantage: the full ratio counts (min)
    assert float(clipped_objective(far, old, a)) == pytest.approx(-(1.2 - math.e) / 2, abs=1e-5)


def test_an_untrained_network_scores_every_chunk_alike_and_plugs_into_the_seam():
    model = tiny_refrag("llama", k=4)
    network = PolicyNetwork(PolicyNetConfig(input_dim=model.encoder.hidden_size, hidden=32, heads=4))
    encodings = torch.randn(2, 5, model.encoder.hidden_size)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    logits = network(encodings, mask)
    assert logits.shape == (2, 5) and torch.isinf(logits[1, 3:]).all() and (logits[0] == 0).all()
    with pytest.raises(InputError, match="no learned policy"):
        make_policy("learned", model=model)
    model.policy_network = network
    torch.nn.init.normal_(network.head.weight)
    chunks = [checkpoint_chunk(i) for i in range(5)]
    chosen = select(make_policy("learned", model=model), chunks, Budget(fraction=0.4), encodings=encodings[0])
    assert chosen == set(network(encodings[:1], mask[:1])[0].topk(2).indices.tolist())
    expansion = choose_expanded(chunks, CompressionOptions(policy="learned", expand_fraction=0.4),
                                encodings=encodings[0], model=model)
    assert expansion.expanded == chosen and expansion.policy == "learned"


def checkpoint_chunk(i: int):
    from refrag.chunking import Chunk

    return Chunk((i, i), f"chunk {i}")


def test_the_policy_ships_inside_the_checkpoint(tmp_path):
    model = tiny_refrag("llama", k=4)
    model.policy_network = PolicyNetwork(PolicyNetConfig(input_dim=model.encoder.hidden_size, hidden=32))
    torch.nn.init.normal_(model.policy_network.head.weight)
    path = checkpoint.save(model, tmp_path / "ckpt", save_decoder=True)
    assert (path / "policy" / "policy.safetensors").is_file()
    loaded = checkpoint.load(path, dtype="float32")
    enc, mask = torch.randn(1, 6, model.encoder.hidden_size), torch.ones(1, 6, dtype=torch.bool)
    torch.testing.assert_close(loaded.policy_network(enc, mask), model.policy_network(enc, mask))
    assert not any(p.requires_grad for p in loaded.policy_network.parameters())
    (path / "policy" / "policy.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="policy/policy.safetensors has 10 bytes"):  # its record, on load
        checkpoint.load(path, dtype="float32")
    manifest = json.loads((path / "refrag.json").read_text())
    (path / "refrag.json").write_text(json.dumps({**manifest, "files": {}}))  # as written before files were recorded
    with pytest.raises(CheckpointError, match="learned policy"):
        checkpoint.load(path, dtype="float32")


def test_the_network_reads_unit_scaled_encodings_and_older_files_keep_raw_ones(tmp_path):
    # the self-encoder's outputs have norms ~40: unscaled, they drowned the position embeddings (GRPO learned
    # no recency); scaled to unit length, the encoder's scale no longer matters
    from refrag.learned_policy import load_policy, save_policy

    network = PolicyNetwork(PolicyNetConfig(input_dim=8, hidden=16))
    torch.nn.init.normal_(network.head.weight)
    enc, mask = torch.randn(1, 5, 8), torch.ones(1, 5, dtype=torch.bool)
    torch.testing.assert_close(network(40 * enc, mask), network(enc, mask))
    save_policy(network, tmp_path / "new")
    assert json.loads((tmp_path / "new" / "policy.json").read_text())["unit_inputs"] is True
    torch.testing.assert_close(load_policy(tmp_path / "new")(40 * enc, mask), network(enc, mask))
    config = json.loads((tmp_path / "new" / "policy.json").read_text())
    del config["unit_inputs"]  # as written before the field existed: those networks were trained on raw encodings
    (tmp_path / "new" / "policy.json").write_text(json.dumps(config))
    old = load_policy(tmp_path / "new")
    assert old.config.unit_inputs is False
    assert not torch.allclose(old(40 * enc, mask), old(enc, mask))
