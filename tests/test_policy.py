"""Selective expansion: the heuristic policies, the budget, and the one seam a learned policy plugs into."""

from dataclasses import replace
from typing import get_args

import pytest
import torch
from conftest import tiny_refrag

from refrag.chunking import Chunk
from refrag.config import ChunkingOptions, CompressionOptions, PolicyName, SamplingOptions
from refrag.errors import InputError
from refrag.generation import Request, generate
from refrag.policy import (
    Budget,
    ExpansionPolicy,
    LexicalPolicy,
    PassageLexicalPolicy,
    RandomPolicy,
    choose_expanded,
    chunk_nll,
    expansion_count,
    make_policy,
    select,
)

CHUNKS = [Chunk((i,), f"chunk {i}") for i in range(4)]


def _chosen(options, **kw):
    return choose_expanded(CHUNKS, options, **kw).expanded


def test_heuristic_choices():
    assert _chosen(CompressionOptions(mode="full")) == {0, 1, 2, 3}
    assert _chosen(CompressionOptions()) == set()
    assert _chosen(CompressionOptions(expand_fraction=0.5, policy="first")) == {0, 1}
    assert _chosen(CompressionOptions(expand_fraction=0.5, policy="last")) == {2, 3}
    assert _chosen(CompressionOptions(expand_fraction=0.5, policy="none")) == set()
    rnd = CompressionOptions(expand_fraction=0.5, policy="random", seed=1)
    assert _chosen(rnd) == _chosen(rnd) and len(_chosen(rnd)) == 2
    assert choose_expanded(CHUNKS, rnd).policy == "random" and choose_expanded(CHUNKS, CompressionOptions()).policy == "none"


def test_similarity_picks_the_chunk_closest_to_the_question():
    enc = torch.eye(4)
    model = type("M", (), {"encode_chunks": staticmethod(lambda texts: enc[2:3])})()
    assert _chosen(CompressionOptions(expand_fraction=0.25, policy="similarity"), encodings=enc, question="q",
                   model=model) == {2}
    with pytest.raises(InputError, match="model"):
        make_policy("similarity")
    with pytest.raises(InputError, match="encodings"):
        make_policy("similarity", model=model).scores(CHUNKS, None, "q")
    with pytest.raises(InputError, match="question"):
        make_policy("similarity", model=model).scores(CHUNKS, enc, None)


def test_lexical_passage_spends_the_budget_on_the_best_passage_first():
    """A distractor chunk with the question's rarest term beats every chunk of the answer's passage under chunk
    BM25; over whole passages the answer's passage wins, and its chunks are kept before the distractor's."""
    from refrag.chunking import make_passage

    tok = type("T", (), {"decode": staticmethod(lambda ids, skip_special_tokens=True: TEXTS[ids[0]])})()
    TEXTS = ["Marie Curie was a chemist.", "She won the Nobel prize in physics", "in 1903 and again later.",
             "A prize for poetry.", "Nothing else here."]
    passages = [make_passage([3, 4], tok, 1), make_passage([0, 1, 2], tok, 1)]  # the distractor comes first
    request = Request("When did Marie Curie win the Nobel prize?", tuple(passages))
    assert [c.passage for c in request.chunks] == [0, 0, 1, 1, 1]
    assert request.chunks[2] == passages[1].chunks[0]  # the number labels a chunk, it does not change it
    question = request.question
    only_chunks = LexicalPolicy().scores(request.chunks, None, question)
    scores = PassageLexicalPolicy().scores(request.chunks, None, question)
    assert _top(only_chunks, 3) != {2, 3, 4} and _top(scores, 3) == {2, 3, 4}
    assert min(scores[2:]) > max(scores[:2])  # the whole best passage first
    alone = [replace(c, passage=0) for c in request.chunks]  # one passage: lexical's order
    assert _order(PassageLexicalPolicy().scores(alone, None, question)) == _order(LexicalPolicy().scores(alone, None, question))
    with pytest.raises(InputError, match="question"):
        PassageLexicalPolicy().scores(request.chunks, None, None)


def _top(scores, n):
    return set(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n])


def _order(scores):
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def test_lexical_ranks_the_chunk_with_the_rare_question_terms_first():
    chunks = [Chunk((0,), "The city has a river."), Chunk((1,), "Paris is the capital of France."),
              Chunk((2,), "The river is long."), Chunk((3,), "Nothing here.")]
    scores = LexicalPolicy().scores(chunks, None, "What is the capital of France?")
    assert max(range(4), key=scores.__getitem__) == 1 and scores[3] == 0.0
    river = LexicalPolicy().scores(chunks, None, "Which river is in the capital?")
    assert river[1] > 0 and river[0] > 0 and river[3] == 0.0  # "the", "is", "in", "which" are stop words


def test_random_order_is_seeded_and_a_permutation():
    scores = RandomPolicy(3).scores([Chunk((i,), "") for i in range(10)], None, None)
    assert sorted(scores) == [-float(r) for r in range(9, -1, -1)] and scores == RandomPolicy(3).scores(
        [Chunk((i,), "") for i in range(10)], None, None) and scores != RandomPolicy(4).scores(
        [Chunk((i,), "") for i in range(10)], None, None)


def test_every_policy_name_is_built_and_gives_one_score_per_chunk():
    model = tiny_refrag("llama", k=4)
    chunks = Request.from_texts("q", ["Paris is the capital of France. " * 2], model.tokenizer).chunks
    enc = model.encode_chunks(chunks)
    from refrag.learned_policy import PolicyNetConfig, PolicyNetwork

    model.policy_network = PolicyNetwork(PolicyNetConfig(input_dim=model.encoder.hidden_size, hidden=16))
    for name in get_args(PolicyName):
        if name == "none":
            continue
        policy = make_policy(name, model=model)
        assert len(policy.scores(chunks, enc, "What is the capital?")) == len(chunks), name


def test_chunk_nll_reads_each_chunk_alone_with_the_original_decoder():
    model = tiny_refrag("llama", k=4)
    chunks = Request.from_texts("q", ["Paris is the capital of France, and Lyon is not. Rome is old. Bern is small and quiet."], model.tokenizer,
                               ChunkingOptions(k=4)).chunks
    together = chunk_nll(model, chunks, batch_size=64)
    assert together == pytest.approx([chunk_nll(model, [c])[0] for c in chunks], abs=1e-4)  # batch-independent
    assert all(v > 0 for v in together)
    one = Budget(tokens=len(chunks[0].token_ids))  # one full chunk
    desc = select(make_policy("perplexity-desc", model=model), chunks, one)
    asc = select(make_policy("perplexity-asc", model=model), chunks, one)
    full = [i for i, c in enumerate(chunks) if len(c.token_ids) == len(chunks[0].token_ids)]
    assert len(full) > 2 and desc == {max(full, key=together.__getitem__)} and asc == {min(full, key=together.__getitem__)}


def test_the_fraction_budget_is_round_p_l_and_the_token_budget_is_never_exceeded():
    assert [expansion_count(10, p) for p in (0.0, 0.01, 0.14, 0.25, 1.0)] == [0, 1, 1, 3, 10]  # half up, >= 1
    uneven = [Chunk(tuple(range(n)), "") for n in (16, 16, 5, 16, 3)]
    scores = [5.0, 4.0, 3.0, 2.0, 1.0]
    for tokens in range(60):
        picked = Budget(tokens=tokens).spend(uneven, scores)
        assert sum(len(uneven[i].token_ids) for i in picked) <= tokens
    assert Budget(tokens=20).spend(uneven, scores) == {0, 4}  # 16 fits, the next 16 does not, 5 does not, 3 does
    assert Budget(tokens=37).spend(uneven, scores) == {0, 1, 2}
    assert Budget(fraction=0.4).spend(uneven, scores) == {0, 1}
    with pytest.raises(InputError, match="not both"):
        CompressionOptions(expand_fraction=0.1, expand_tokens=32)
    with pytest.raises(InputError, match="expand_tokens"):
        CompressionOptions(expand_tokens=-1)


class EverySecond:
    """A policy defined outside refrag: anything with ``scores`` fits the seam."""

    def scores(self, chunks, encodings, question):
        return [1.0 if i % 2 == 0 else 0.0 for i in range(len(chunks))]


def test_a_custom_policy_fits_the_seam():
    policy: ExpansionPolicy = EverySecond()
    assert select(policy, CHUNKS, Budget(fraction=0.5)) == {0, 2}
    model = tiny_refrag("llama")
    request = Request.from_texts("What is it?", ["Paris is the capital of France. " * 3], model.tokenizer)
    answer = generate(model, [request], compression=CompressionOptions(expand_fraction=0.5), policy=policy,
                      sampling=SamplingOptions(max_new_tokens=1))[0]
    L = len(request.chunks)
    assert answer.expanded_chunks == tuple(range(0, L, 2))[: expansion_count(L, 0.5)] and answer.policy == "EverySecond"


def test_generation_expands_what_the_policy_chose_and_times_it():
    model = tiny_refrag("llama")
    request = Request.from_texts("What is it?", ["Paris is the capital of France. " * 3], model.tokenizer)
    last = generate(model, [request], compression=CompressionOptions(expand_fraction=0.5, policy="last"),
                    sampling=SamplingOptions(max_new_tokens=1))[0]
    L = len(request.chunks)
    assert last.expanded_chunks == tuple(range(L - expansion_count(L, 0.5), L)) and last.policy == "last"
    assert 0 < last.timings.policy_s < last.timings.ttft_s
    budget = generate(model, [request], compression=CompressionOptions(expand_tokens=2 * model.k, policy="lexical"),
                      sampling=SamplingOptions(max_new_tokens=1))[0]
    assert sum(len(request.chunks[i].token_ids) for i in budget.expanded_chunks) <= 2 * model.k
    assert budget.decoder_positions <= last.decoder_positions + 2 * model.k
