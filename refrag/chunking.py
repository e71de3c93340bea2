"""Text -> passages (<= passage_tokens decoder tokens) -> k-token chunks, all in DECODER token space.

A chunk keeps its decoder token ids (what the decoder reads when the chunk is expanded) and its text (what
the encoder reads when it is compressed): the two tokenizers differ, so chunking happens once, here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from refrag.config import ChunkingOptions
from refrag.errors import InputError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer chunking needs."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class Chunk:
    """k (or fewer, for a passage's last chunk) consecutive decoder tokens."""

    token_ids: tuple[int, ...]
    text: str
    # which passage of its request it belongs to (numbered by request_chunks; 0 on its own): a label, not part of
    # its identity (equal tokens and text are the same chunk, e.g. for memoized encodings)
    passage: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Passage:
    """A retrieval unit: <= passage_tokens decoder tokens, cut into chunks in order."""

    text: str
    token_ids: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def request_chunks(passages: Sequence[Passage]) -> list[Chunk]:
    """Every chunk of every passage, in order, each numbered with its passage (the L chunks a policy chooses
    from: a passage-aware policy reads the numbers)."""
    return [replace(c, passage=j) for j, p in enumerate(passages) for c in p.chunks]


def chunk_token_ids(token_ids: Sequence[int], tokenizer: Tokenizer, k: int) -> tuple[Chunk, ...]:
    """Cut decoder token ids into consecutive chunks of k tokens (the last may be shorter)."""
    if k <= 0:
        raise InputError(f"k must be a positive integer (got {k}).")
    ids = tuple(int(i) for i in token_ids)
    return tuple(
        Chunk(token_ids=ids[i : i + k], text=tokenizer.decode(ids[i : i + k], skip_special_tokens=True))
        for i in range(0, len(ids), k)
    )


def make_passage(token_ids: Sequence[int], tokenizer: Tokenizer, k: int, text: str | None = None) -> Passage:
    """A passage from decoder token ids (text is decoded when not given)."""
    ids = tuple(int(i) for i in token_ids)
    if not ids:
        raise InputError("a passage needs at least one token; got empty text.")
    return Passage(
        text=text if text is not None else tokenizer.decode(ids, skip_special_tokens=True),
        token_ids=ids,
        chunks=chunk_token_ids(ids, tokenizer, k),
    )


def split_passages(text: str, tokenizer: Tokenizer, options: ChunkingOptions = ChunkingOptions()) -> list[Passage]:
    """Split text into passages of at most ``options.passage_tokens`` decoder tokens.

    Sentences are packed greedily so passages end at sentence or paragraph boundaries; a sentence longer than
    the budget is cut at the token limit. Each passage is re-tokenized as a whole so its token ids are exactly
    what the decoder sees when the passage is given as plain text.
    """
    if not isinstance(text, str):
        raise InputError(f"text must be a str (got {type(text).__name__}).")
    if not text.strip():
        raise InputError("context is empty: give at least one non-blank passage.")
    limit = options.passage_tokens
    pieces: list[str] = []
    current: list[str] = []
    current_len = 0
    for sentence in (s.strip() for s in _SENTENCE_END.split(text)):
        if not sentence:
            continue
        n = len(tokenizer.encode(" " + sentence, add_special_tokens=False))
        if current and current_len + n > limit:
            pieces.append(" ".join(current))
            current, current_len = [], 0
        current.append(sentence)
        current_len += n
    if current:
        pieces.append(" ".join(current))

    passages: list[Passage] = []
    for piece in pieces:
        ids = tokenizer.encode(piece, add_special_tokens=False)
        for start in range(0, len(ids), limit):  # hard cut: a sentence (or re-tokenization) over budget
            window = ids[start : start + limit]
            text_part = piece if len(ids) <= limit else None
            passages.append(make_passage(window, tokenizer, options.k, text=text_part))
    return passages
