import pytest
from conftest import TEXT

from refrag.chunking import chunk_token_ids, split_passages
from refrag.config import ChunkingOptions
from refrag.errors import InputError


def test_passages_respect_budget_and_chunks_cover_tokens(tokenizer):
    opts = ChunkingOptions(k=4, passage_tokens=24)
    passages = split_passages(TEXT[:2000], tokenizer, opts)
    assert len(passages) > 3
    for p in passages:
        assert 0 < p.num_tokens <= 24
        assert [t for c in p.chunks for t in c.token_ids] == list(p.token_ids)
        assert all(len(c.token_ids) == 4 for c in p.chunks[:-1]) and 1 <= len(p.chunks[-1].token_ids) <= 4
        assert p.chunks[0].text == tokenizer.decode(p.chunks[0].token_ids, skip_special_tokens=True)


def test_passages_end_at_sentences_when_they_fit(tokenizer):
    text = "Paris is the capital of France. The quick brown fox jumps over the lazy dog. Rivers flow to the sea."
    passages = split_passages(text, tokenizer, ChunkingOptions(k=4, passage_tokens=64))
    assert len(passages) == 1 and passages[0].text == text


def test_long_sentence_is_hard_cut(tokenizer):
    text = "word " * 300
    passages = split_passages(text, tokenizer, ChunkingOptions(k=8, passage_tokens=32))
    assert all(p.num_tokens <= 32 for p in passages)
    assert sum(p.num_tokens for p in passages) == len(tokenizer.encode(text.strip(), add_special_tokens=False))


@pytest.mark.parametrize("bad", ["", "   \n  "])
def test_empty_text_is_rejected(tokenizer, bad):
    with pytest.raises(InputError, match="empty"):
        split_passages(bad, tokenizer)


def test_wrong_type_is_rejected(tokenizer):
    with pytest.raises(InputError, match="str"):
        split_passages(b"bytes", tokenizer)  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [0, -3])
def test_bad_k(tokenizer, k):
    with pytest.raises(InputError, match="k must be"):
        ChunkingOptions(k=k)
    with pytest.raises(InputError, match="k must be"):
        chunk_token_ids([1, 2, 3], tokenizer, k)
