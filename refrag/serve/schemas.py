"""OpenAI wire format (the subset RAG clients send) plus refrag's own request fields.

Unknown OpenAI fields (``frequency_penalty``, ``user``, ...) are accepted and ignored, so existing clients work
unchanged; refrag's fields come as extra body fields (the ``openai`` client's ``extra_body=``): ``mode``,
``top_k``, ``policy``, ``expand_fraction``, ``expand_tokens`` and ``passages`` (context given directly instead of
retrieved). Responses are OpenAI's, with a ``refrag`` object added: sources, timings, decoder positions.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from refrag.config import Mode, PolicyName


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The message's text (list content: its text parts joined)."""
        if isinstance(self.content, list):
            return " ".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class RefragFields(BaseModel):
    """refrag's extra request fields (all optional)."""

    mode: Mode = "refrag"
    top_k: int = Field(5, ge=1, le=100)
    policy: PolicyName | None = None  # None: the server's default (lexical)
    expand_fraction: float | None = Field(None, ge=0.0, lt=1.0)
    expand_tokens: int | None = Field(None, ge=0)
    passages: list[str] | None = Field(None, min_length=1, max_length=100)
    min_score: float | None = None  # relevance filtering of retrieved passages (refrag.relevance)
    relative_score: float | None = Field(None, gt=0.0, le=1.0)
    dedup: float | None = Field(None, gt=0.0, le=1.0)

    @field_validator("passages")
    @classmethod
    def _non_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not any(p.strip() for p in v):
            raise ValueError("passages are all empty")
        return v


class CompletionFields(RefragFields):
    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatRequest(CompletionFields):
    messages: list[Message] = Field(min_length=1)

    def question(self) -> str:
        """The last user message is the question (earlier turns and the system prompt are not part of RAG)."""
        users = [m.text() for m in self.messages if m.role == "user"]
        return users[-1] if users else ""


class CompletionRequest(CompletionFields):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("give one prompt per request")
        return v

    def question(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class SearchRequest(BaseModel):
    query: str = Field(min_length=1)
    top_k: int = Field(5, ge=1, le=100)
