"""Perplexity protocol: masking equals a hand computation; examples and method names."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from refrag.chunking import Chunk, chunk_token_ids
from refrag.errors import InputError
from refrag.eval.methods import Method
from refrag.eval.perplexity import (
    PerplexityOptions,
    _expanded,
    _prefixes,
    evaluate_perplexity,
    example_nll,
    extract_examples,
)
from refrag.modeling import start_token
from refrag.refine import RefineOptions, refine_encodings
from tests.conftest import TEXT, add_random_lora, tiny_refrag


def _hand_nll(model, prefix_ids: list[int], output: list[int], skip_first: bool = False) -> float:
    """Mean NLL of ``output`` after ``prefix_ids`` from the decoder's own full logits."""
    ids = torch.tensor([prefix_ids + output])
    logp = model.decoder(input_ids=ids).logits.float().log_softmax(-1)[0]  # [T, V]
    n = len(prefix_ids)
    terms = [-logp[n - 1 + j, output[j]].item() for j in range(len(output))]
    return sum(terms[1:] if skip_first else terms) / (len(terms) - skip_first)


@pytest.fixture(scope="module")
def setup():
    model = tiny_refrag("llama", k=4)
    docs = [TEXT[:200], TEXT, TEXT[100:], TEXT[::-1]]
    opts = PerplexityOptions(s=16, o=6, ks=(4, 8), limit=3, seed=1, batch_size=2)
    examples = extract_examples(docs, model.tokenizer, opts.s, opts.o, opts.limit, opts.seed)
    return model, opts, examples


def test_examples_are_windows_of_one_document(setup):
    model, _, examples = setup
    assert len(examples) == 3
    for ex in examples:
        assert len(ex.context) == 16 and len(ex.output) == 6
    assert len({ex.doc for ex in examples}) == 3
    again = extract_examples([TEXT[:200], TEXT, TEXT[100:], TEXT[::-1]], model.tokenizer, 16, 6, 3, seed=1)
    assert again == examples


def test_too_short_documents_are_an_error(setup):
    model, _, _ = setup
    with pytest.raises(InputError):
        extract_examples(["short"], model.tokenizer, 16, 6, 3)


def test_masking_equals_hand_computation(setup):
    model, opts, examples = setup
    result = evaluate_perplexity(model, examples, opts, progress=False)
    assert list(result.per_example) == ["no_context", "full", "truncated", "truncated2", "refrag4", "refrag8",
                                        "foreign_vectors"]
    bos = start_token(model.tokenizer)
    for i, ex in enumerate(examples):
        ctx, out = list(ex.context), list(ex.output)
        # every method starts with the start token, then its context
        assert result.per_example["full"][i] == pytest.approx(_hand_nll(model, [bos, *ctx], out), abs=1e-4)
        assert result.per_example["no_context"][i] == pytest.approx(_hand_nll(model, [bos], out), abs=1e-4)
        assert result.per_example["truncated"][i] == pytest.approx(_hand_nll(model, [bos, *ctx[-4:]], out), abs=1e-4)
        assert result.per_example["truncated2"][i] == pytest.approx(_hand_nll(model, [bos, *ctx[-2:]], out), abs=1e-4)
    summary = result.summary()
    assert summary["n"] == 3 and set(summary["recovered"]) == {
        "truncated",
        "truncated2",
        "refrag4",
        "refrag8",
        "foreign_vectors",
    }
    lp = result.log_ppl
    expect = (lp["no_context"] - lp["refrag4"]) / (lp["no_context"] - lp["full"])
    assert summary["recovered"]["refrag4"] == pytest.approx(expect)
    assert all(math.isfinite(v) for v in lp.values())


def test_refrag_is_batch_independent(setup):
    model, opts, examples = setup
    batched = evaluate_perplexity(model, examples, opts, progress=False).per_example["refrag4"]
    single = PerplexityOptions(s=16, o=6, ks=(4,), limit=3, batch_size=1)
    alone = evaluate_perplexity(model, examples, single, progress=False).per_example["refrag4"]
    assert batched == pytest.approx(alone, abs=1e-4)


def test_refined_method_reads_each_contexts_refined_encodings(setup):
    model, _, examples = setup
    opts = PerplexityOptions(s=16, o=6, ks=(4,), limit=3, batch_size=2, refine=RefineOptions(steps=2))
    result = evaluate_perplexity(model, examples, opts, progress=False)
    assert math.isfinite(result.summary()["recovered"]["refrag4-refined"])
    assert result.summary()["refine"] == opts.refine.to_json()
    assert result.per_example["refrag4-refined"] != pytest.approx(result.per_example["refrag4"], abs=1e-4)
    start = start_token(model.tokenizer)
    for ex, nll in zip(examples, result.per_example["refrag4-refined"]):
        chunks = chunk_token_ids(ex.context, model.tokenizer, 4)
        with torch.no_grad():
            vectors = model.project(refine_encodings(model, [chunks], model.encode_chunks(chunks), opts.refine))
        (alone,) = example_nll(model, [model.scored_layout([[start], vectors], ex.output)])
        assert nll == pytest.approx(alone, abs=1e-4)  # the context alone decides its vectors, never the output


def test_s_must_be_a_multiple_of_k():
    with pytest.raises(InputError, match="multiple"):
        PerplexityOptions(s=20, ks=(16,))


def test_adapter_scores_refrag_and_a_control_but_not_the_baselines(setup):
    model, opts, examples = setup
    plain = evaluate_perplexity(model, examples, opts, progress=False)
    adapted = add_random_lora(tiny_refrag("llama", k=4))
    result = evaluate_perplexity(adapted, examples, opts, progress=False)
    assert list(result.per_example)[-2:] == ["no_context_adapter", "foreign_vectors"]
    for method in ("no_context", "full", "truncated"):  # baselines: the original decoder
        assert result.per_example[method] == pytest.approx(plain.per_example[method], abs=1e-4)
    assert result.per_example["no_context_adapter"] != pytest.approx(plain.per_example["no_context"], abs=1e-3)
    assert result.per_example["refrag4"] != pytest.approx(plain.per_example["refrag4"], abs=1e-3)


def test_expansion_keeps_the_chosen_chunks_as_raw_tokens_and_adds_an_equal_positions_baseline(setup):
    model, _, examples = setup
    opts = PerplexityOptions(s=16, o=6, ks=(4,), limit=3, seed=1, batch_size=2, expand=(0.25,))
    assert opts.method_names() == ["no_context", "full", "truncated", "refrag4", "refrag4+last25", "truncated7"]
    start = start_token(model.tokenizer)
    expanded, plain_method = opts.methods()[4], opts.methods()[3]
    assert (expanded.name, expanded.expanded, plain_method.name) == ("refrag4+last25", 1, "refrag4")
    (prefix,) = _prefixes(model, examples[:1], expanded, opts, start)
    assert prefix[0] == [start] and [tuple(t.shape) for t in prefix[1:4]] == [(1, 64)] * 3
    assert list(prefix[4]) == list(examples[0].context[-4:])  # the chunk nearest the output, in place, as tokens
    (plain,) = _prefixes(model, examples[:1], plain_method, opts, start)
    torch.testing.assert_close(torch.cat(plain[1:4]), torch.cat(prefix[1:4]))  # same vectors for the others
    result = evaluate_perplexity(model, examples, opts, progress=False)
    assert set(result.per_example) == {*opts.method_names(), "foreign_vectors"}
    assert result.summary()["expand"] == [0.25]


def test_every_text_policy_at_every_fraction_with_one_truncated_baseline_per_fraction(setup):
    model, _, examples = setup
    opts = PerplexityOptions(s=16, o=6, ks=(4,), limit=3, batch_size=2, expand=(0.25, 0.5),
                             policies=("last", "perplexity-desc"))
    assert opts.method_names()[4:] == ["refrag4+last25", "refrag4+perplexity-desc25", "truncated7",
                                       "refrag4+last50", "refrag4+perplexity-desc50", "truncated10"]
    assert Method.from_name("refrag4+perplexity-desc25", 16, 4) == Method("refrag", k=4, policy="perplexity-desc",
                                                                          percent=25)
    result = evaluate_perplexity(model, examples, opts, progress=False)
    assert all(len(v) == 3 for v in result.per_example.values())
    with pytest.raises(InputError, match="question"):
        PerplexityOptions(expand=(0.1,), policies=("lexical",))


def test_the_learned_policy_reads_the_chunk_encodings(setup):
    from refrag.learned_policy import PolicyNetConfig, PolicyNetwork

    model, _, examples = setup
    model.policy_network = PolicyNetwork(PolicyNetConfig(input_dim=model.encoder.hidden_size, hidden=16))
    try:
        torch.nn.init.normal_(model.policy_network.head.weight)
        opts = PerplexityOptions(s=16, o=6, ks=(4,), limit=3, batch_size=2, expand=(0.25,),
                                 policies=("learned",))
        result = evaluate_perplexity(model, examples, opts, progress=False)
        assert len(result.per_example["refrag4+learned25"]) == 3
    finally:
        model.policy_network = None


def test_random_expansion_is_seeded_per_example():
    model = tiny_refrag("llama", k=4)
    chunks = [Chunk((1,) * 4, "")] * 32  # only their number matters to these policies
    rnd, last = Method("refrag", k=4, policy="random", expanded=4), Method("refrag", k=4, policy="last", expanded=4)
    picks = {d: _expanded(model, chunks, rnd, 0, d) for d in range(5)}
    assert all(len(p) == 4 and p <= set(range(32)) for p in picks.values()) and len(set(map(frozenset, picks.values()))) > 1
    assert _expanded(model, chunks, rnd, 0, 3) == picks[3] and _expanded(model, chunks, last, 0, 0) == {28, 29, 30, 31}
    with pytest.raises(InputError, match="expand"):
        PerplexityOptions(expand=(1.0,))


def test_foreign_vectors_control_reads_the_next_examples_context(setup):
    model, opts, examples = setup
    result = evaluate_perplexity(model, examples, opts, progress=False)  # batches of 2: [0, 1], [2]
    single = PerplexityOptions(s=16, o=6, ks=(4,), limit=1, batch_size=1)
    for i, ex in enumerate(examples):
        swapped = replace(ex, context=examples[(i + 1) % len(examples)].context)
        alone = evaluate_perplexity(model, [swapped], single, progress=False)
        assert "foreign_vectors" not in alone.per_example  # one example: nothing foreign to read
        assert result.per_example["foreign_vectors"][i] == pytest.approx(alone.per_example["refrag4"][0], abs=1e-4)
    assert result.per_example["foreign_vectors"] != pytest.approx(result.per_example["refrag4"], abs=1e-4)


@pytest.mark.parametrize("name", ["no_context", "full", "truncated", "truncated152", "refrag16", "refrag16+last25",
                                  "refrag8+random10", "refrag16-refined", "no_context_adapter",
                                  "foreign_vectors"])
def test_method_names_round_trip(name):
    method = Method.from_name(name, 512, 16)
    assert method is not None and method.name == name
    assert Method.from_name("refragX", 512, 16) is None
    assert Method.from_name("refrag16-refined+last25", 512, 16) is None  # refined contexts are all compressed
