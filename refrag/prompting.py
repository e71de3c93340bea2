"""Prompt layout for RAG: template tokens around the context, context chunks compressed or expanded.

Which chunks are expanded is :mod:`refrag.policy`; how chunks and vectors interleave is
``modeling.context_segments``. This module only knows the prompt: chat template, question, separators.

``full`` and ``refrag`` modes build the SAME layout; they differ only in which chunks are vectors (and in the
passage separators, which only sit between raw chunks). With every chunk expanded the decoder sees exactly the
plain-RAG token sequence (the parity test checks this).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jinja2 import TemplateError

from refrag.chunking import Passage
from refrag.config import check_question
from refrag.errors import InputError
from refrag.modeling import Layout, RefragModel, Segment, context_segments

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

    def around(self, context: Sequence[Segment], question_ids: Sequence[int]) -> list[Segment]:
        """The prompt's segments in order: prefix, the context, the question (with the middle and suffix)."""
        return [self.prefix_ids, *context, question_ids]

    def question_ids(self, tokenizer, question: str) -> list[int]:
        """Tokens after the context: the middle text, the question and the suffix."""
        check_question(question)
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


def rag_segments(
    template: PromptTemplate,
    question_ids: Sequence[int],
    passages: Sequence[Passage],
    vectors: torch.Tensor | None,
    expanded: set[int],
) -> list[Segment]:
    """The prompt's segments: prefix, passages (``context_segments``: chunks in order, separators between raw
    passages), question and suffix. vectors: [V, D] projected vectors of the compressed chunks, in order (None in
    full mode). With every chunk expanded this is exactly the plain-RAG prompt."""
    context = context_segments([p.chunks for p in passages], expanded, vectors, template.separator_ids)
    return template.around(context, question_ids)


def rag_layout(
    model: RefragModel,
    template: PromptTemplate,
    question_ids: Sequence[int],
    passages: Sequence[Passage],
    vectors: torch.Tensor | None,
    expanded: set[int],
) -> Layout:
    """``rag_segments`` as an inference layout in the model's space."""
    return model.layout(rag_segments(template, question_ids, passages, vectors, expanded))
