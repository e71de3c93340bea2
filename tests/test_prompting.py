"""Prompt layout: the chat template around the context, separators only between raw chunks."""

import pytest
import torch

from refrag.chunking import make_passage
from refrag.errors import InputError
from refrag.prompting import PromptTemplate, rag_layout


def _passages(model):
    return [make_passage(list(range(10 + 8 * i, 18 + 8 * i)), model.tokenizer, model.k) for i in range(3)]


def test_separators_only_between_raw_chunks(model):
    """Passage separators stay where both neighbours are raw tokens and go where either side is a vector."""
    template = PromptTemplate.for_tokenizer(model.tokenizer)
    passages = _passages(model)
    L = sum(len(p.chunks) for p in passages)  # 2 chunks per passage at k = 4
    q_ids = [7, 7]
    sep = len(template.separator_ids)

    def length(expanded):
        vectors = torch.zeros(L - len(expanded), model.hidden_size) if len(expanded) < L else None
        return rag_layout(model, template, q_ids, passages, vectors, expanded).length

    base = len(template.prefix_ids) + len(q_ids)
    assert length(set()) == base + L
    assert length(set(range(L))) == base + 4 * L + 2 * sep
    assert length({1, 2}) == base + (L - 2) + 8 + sep  # chunks 1|2 straddle the first boundary
    assert length({2, 3}) == base + (L - 2) + 8  # a whole raw passage between compressed ones: no separator


def test_all_expanded_layout_is_the_plain_rag_prompt(model):
    """Every chunk raw: the layout's tokens are prefix + passages joined by the separator + question."""
    template = PromptTemplate.for_tokenizer(model.tokenizer)
    passages = _passages(model)
    q_ids = template.question_ids(model.tokenizer, "Where?")
    layout = rag_layout(model, template, q_ids, passages, None, set(range(6)))
    sep = list(template.separator_ids)
    plain = list(template.prefix_ids) + list(passages[0].token_ids) + sep + list(passages[1].token_ids) + sep
    plain += list(passages[2].token_ids) + q_ids
    assert layout.token_ids.tolist() == plain and not layout.is_vector.any()


def test_compressed_chunks_take_the_vectors_in_order(model):
    template = PromptTemplate.for_tokenizer(model.tokenizer)
    vectors = torch.randn(5, model.hidden_size)
    layout = rag_layout(model, template, [7], _passages(model), vectors, {3})
    torch.testing.assert_close(layout.vectors, vectors)
    with pytest.raises(InputError, match="chunk vector"):
        rag_layout(model, template, [7], _passages(model), vectors[:4], {3})
    with pytest.raises(InputError, match="5 chunk vectors for 4"):
        rag_layout(model, template, [7], _passages(model), vectors, {2, 3})


def test_empty_question_is_refused(model):
    template = PromptTemplate.for_tokenizer(model.tokenizer)
    with pytest.raises(InputError, match="question is empty"):
        template.question_ids(model.tokenizer, "  ")
