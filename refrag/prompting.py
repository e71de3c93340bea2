"""Prompt layout for RAG: template tokens around the context, context chunks compressed or expanded.

``full`` and ``refrag`` modes build the SAME layout; they differ only in which chunks are vectors (and in the
passage separators, which only sit between raw chunks). With every chunk expanded the decoder sees exactly the
plain-RAG token sequence (the parity test checks this).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jinja2 import TemplateError

from refrag.chunking import Passage
from refrag.config import CompressionOptions
from refrag.errors import InputError
from refrag.modeling import Layout, RefragModel, segments_layout

_CTX, _Q = "\x00CONTEXT\x00", "\x00QUESTION\x00"
INSTRUCTION = "Answer the question using the context. Reply with a short answer."
PLAIN_TEMPLATE = f"Context:\n{_CTX}\n\nQuestion: {_Q}\nAnswer:"
PASSAGE_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class PromptTemplate:
    """Token ids around the context: prefix, context, middle, question, suffix."""

    prefix_ids: tuple[int, ...]
    middle_text: str  # between context and question
    suffix_text: str  # after the question (e.g. the assistant turn header)
    separator_ids: tuple[int, ...]  # between passages

    @classmethod
    def for_tokenizer(cls, tokenizer) -> PromptTemplate:
        """Chat template when the tokenizer has one (instruct models), a plain Context/Question one otherwise."""
        if getattr(tokenizer, "chat_template", None):
            rendered = _render_chat(tokenizer, f"Context:\n{_CTX}\n\nQuestion: {_Q}")
            prefix, rest = rendered.split(_CTX)
            prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
        else:
            prefix, rest = PLAIN_TEMPLATE.split(_CTX)
            prefix_ids = tokenizer.encode(prefix, add_special_tokens=True)
        middle, suffix = rest.split(_Q)
        return cls(
            prefix_ids=tuple(prefix_ids),
            middle_text=middle,
            suffix_text=suffix,
            separator_ids=tuple(tokenizer.encode(PASSAGE_SEPARATOR, add_special_tokens=False)),
        )

    def question_ids(self, tokenizer, question: str) -> list[int]:
        """Tokens after the context: the middle text, the question and the suffix."""
        if not isinstance(question, str) or not question.strip():
            raise InputError("question is empty: ask something.")
        return tokenizer.encode(self.middle_text + question.strip() + self.suffix_text, add_special_tokens=False)


def _render_chat(tokenizer, content: str) -> str:
    """The instruction as the system turn (replacing any long default system prompt) when supported."""
    for messages in (
        [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": content}],
        [{"role": "user", "content": f"{INSTRUCTION}\n\n{content}"}],
    ):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError:  # this template has no system role: try the next form
            continue
    raise InputError("the tokenizer's chat template rejected a plain user message.")


def choose_expanded(
    num_chunks: int,
    options: CompressionOptions,
    *,
    chunk_encodings: torch.Tensor | None = None,
    question_encoding: torch.Tensor | None = None,
) -> set[int]:
    """Indices of chunks to keep as raw tokens: all in full mode, round(p * L) of them in refrag mode.

    Strategies without a learned policy: ``similarity`` (cosine between the question's and the chunks'
    encoder vectors, highest first), ``random`` (seeded), ``first``, ``last``.
    """
    if options.mode == "full":
        return set(range(num_chunks))
    n = round(options.expand_fraction * num_chunks)
    if n == 0:
        return set()
    if options.expand_strategy == "first":
        return set(range(n))
    if options.expand_strategy == "last":
        return set(range(num_chunks - n, num_chunks))
    if options.expand_strategy == "random":
        return set(random.Random(options.seed).sample(range(num_chunks), n))
    if chunk_encodings is None or question_encoding is None:
        raise InputError("similarity expansion needs chunk and question encodings.")
    scores = torch.nn.functional.cosine_similarity(
        chunk_encodings.float(), question_encoding.float().reshape(1, -1), dim=-1
    )  # [L]
    return set(scores.topk(n).indices.tolist())


def context_layout(
    model: RefragModel,
    template: PromptTemplate,
    question_ids: Sequence[int],
    passages: Sequence[Passage],
    chunk_vectors: torch.Tensor | None,
    expanded: set[int],
) -> Layout:
    """Layout: prefix, passages (chunks in order), question and suffix.

    A separator goes between two passages only where both neighbouring chunks are raw tokens: compressed
    chunks follow each other directly, as in training (contiguous text, one vector per chunk), and save a
    position per passage. With every chunk expanded this is exactly the plain-RAG prompt.
    chunk_vectors: [L, D] projected vectors for all chunks of all passages in order (None in full mode).
    """
    segments: list[Sequence[int] | torch.Tensor] = [template.prefix_ids]
    index = 0
    for p, passage in enumerate(passages):
        if p and index - 1 in expanded and index in expanded:
            segments.append(template.separator_ids)
        for chunk in passage.chunks:
            if index in expanded:
                segments.append(chunk.token_ids)
            else:
                assert chunk_vectors is not None, "compressed chunks need chunk vectors"
                segments.append(chunk_vectors[index : index + 1])
            index += 1
    segments.append(question_ids)
    return segments_layout(segments, model.decoder.config.hidden_size, model.dtype)
