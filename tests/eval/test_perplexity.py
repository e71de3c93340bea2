"""Perplexity protocol: masking equals a hand computation; examples and method names."""

from __future__ import annotations

import math

import pytest
import torch

from refrag.errors import InputError
from refrag.eval.perplexity import (
    PerplexityOptions,
    evaluate_perplexity,
    extract_examples,
)
from refrag.modeling import start_token
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
    assert list(result.per_example) == ["no_context", "full", "truncated", "truncated2", "refrag4", "refrag8"]
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


def test_s_must_be_a_multiple_of_k():
    with pytest.raises(InputError, match="multiple"):
        PerplexityOptions(s=20, ks=(16,))


def test_adapter_scores_refrag_and_a_control_but_not_the_baselines(setup):
    model, opts, examples = setup
    plain = evaluate_perplexity(model, examples, opts, progress=False)
    adapted = add_random_lora(tiny_refrag("llama", k=4))
    result = evaluate_perplexity(adapted, examples, opts, progress=False)
    assert list(result.per_example)[-1] == "no_context_adapter"
    for method in ("no_context", "full", "truncated"):  # baselines: the original decoder
        assert result.per_example[method] == pytest.approx(plain.per_example[method], abs=1e-4)
    assert result.per_example["no_context_adapter"] != pytest.approx(plain.per_example["no_context"], abs=1e-3)
    assert result.per_example["refrag4"] != pytest.approx(plain.per_example["refrag4"], abs=1e-3)
