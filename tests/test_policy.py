"""Selective expansion: the heuristic policies, the budget, and the one seam a learned policy plugs into."""

from typing import get_args

import pytest
import torch
from conftest import tiny_refrag

from refrag.chunking import Chunk
from refrag.config import CompressionOptions, ExpandStrategy, SamplingOptions
from refrag.errors import InputError
from refrag.generate import Request, generate
from refrag.policy import ExpansionPolicy, choose_expanded, expansion_count, make_policy

CHUNKS = [Chunk((i,), f"chunk {i}") for i in range(4)]


def test_heuristic_choices():
    enc = torch.eye(4)
    assert choose_expanded(CHUNKS, CompressionOptions(mode="full")) == {0, 1, 2, 3}
    assert choose_expanded(CHUNKS, CompressionOptions()) == set()
    assert choose_expanded(CHUNKS, CompressionOptions(expand_fraction=0.5, expand_strategy="first")) == {0, 1}
    assert choose_expanded(CHUNKS, CompressionOptions(expand_fraction=0.5, expand_strategy="last")) == {2, 3}
    sim = CompressionOptions(expand_fraction=0.25)
    assert choose_expanded(CHUNKS, sim, encodings=enc, question="q", encode=lambda texts: enc[2:3]) == {2}
    rnd = CompressionOptions(expand_fraction=0.5, expand_strategy="random", seed=1)
    assert choose_expanded(CHUNKS, rnd) == choose_expanded(CHUNKS, rnd) and len(choose_expanded(CHUNKS, rnd)) == 2


def test_similarity_needs_encodings_and_the_encoder():
    with pytest.raises(InputError, match="encoder"):
        make_policy("similarity")
    with pytest.raises(InputError, match="encodings"):
        make_policy("similarity", encode=lambda t: torch.zeros(1, 4)).select(CHUNKS, None, "q", 1)


def test_every_strategy_has_a_policy_and_the_budget_is_round_p_l():
    for name in get_args(ExpandStrategy):
        policy = make_policy(name, encode=lambda texts: torch.ones(len(texts), 4))
        assert len(policy.select(CHUNKS, torch.randn(4, 4), "q", 3)) == 3
    assert [expansion_count(10, p) for p in (0.0, 0.14, 0.25, 1.0)] == [0, 1, 2, 10]


class EverySecond:
    """A policy defined outside refrag: anything with ``select`` fits the seam."""

    def select(self, chunks, encodings, question, count):
        return set(range(0, len(chunks), 2)[:count])


def test_a_custom_policy_fits_the_seam():
    policy: ExpansionPolicy = EverySecond()
    assert policy.select(CHUNKS, None, None, 2) == {0, 2}


def test_generation_expands_what_the_policy_chose():
    model = tiny_refrag("llama")
    request = Request.from_texts("What is it?", ["Paris is the capital of France. " * 3], model.tokenizer)
    last = generate(model, [request], compression=CompressionOptions(expand_fraction=0.5, expand_strategy="last"),
                    sampling=SamplingOptions(max_new_tokens=1))[0]
    L = len(request.chunks)
    assert last.expanded_chunks == tuple(range(L - round(0.5 * L), L))
