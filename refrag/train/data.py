"""Training text as one packed token stream, and seeded windows drawn from it.

Sources: local ``.txt`` files (paragraphs kept together, documents are whole files), ``.jsonl`` files (one
document per line, field ``text``), folders of those, and Hugging Face datasets (``hf:NAME[:CONFIG]``,
streamed, needs ``pip install datasets`` and network). Documents are tokenised with the DECODER tokenizer
and packed end to end (EOS between documents), so short documents never stop training: a window may span a
document boundary. The last ``val_fraction`` of each source's tokens is held out for evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refrag.errors import InputError, MissingPackageError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)


@dataclass(frozen=True)
class DataOptions:
    """Where training text comes from and how much of it is read."""

    sources: tuple[str, ...]  # files, folders or hf:NAME[:CONFIG]
    max_tokens_per_source: int = 2_000_000  # read at most this many tokens from each source
    val_fraction: float = 0.01  # tail of each source held out for evaluation
    text_field: str = "text"  # field of jsonl / HF records

    def __post_init__(self) -> None:
        if not self.sources:
            raise InputError("give at least one training source (--data FILE|FOLDER|hf:NAME).")
        if not 0.0 <= self.val_fraction < 0.5:
            raise InputError(f"val_fraction must be in [0, 0.5) (got {self.val_fraction}).")
        if self.max_tokens_per_source < 1024:
            raise InputError("max_tokens_per_source must be >= 1024.")


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Yield documents (strings) from one source; a txt file yields its paragraphs in order."""
    if source.startswith("hf:"):
        yield from _hf_documents(source[3:], text_field)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
        if not files:
            raise InputError(f"{path} holds no .txt/.md/.jsonl files.")
        for f in files:
            yield from iter_documents(str(f), text_field)
        return
    if not path.is_file():
        raise InputError(f"training source {source!r} is neither a file, a folder, nor hf:NAME.")
    if path.suffix in JSONL_SUFFIXES:
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line).get(text_field)
                except (json.JSONDecodeError, AttributeError) as e:
                    raise InputError(f"{path}:{line_no} is not a JSON object ({e}).") from e
                if isinstance(text, str) and text.strip():
                    yield text
        return
    with path.open(encoding="utf-8") as f:  # a txt file is one document, read paragraph by paragraph
        para: list[str] = []
        for line in f:
            if line.strip():
                para.append(line.rstrip("\n"))
            elif para:
                yield "\n".join(para) + "\n\n"
                para = []
        if para:
            yield "\n".join(para)


def _hf_documents(spec: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise MissingPackageError("Hugging Face training data", "pip install datasets") from e
    name, _, config = spec.partition(":")
    for record in datasets.load_dataset(name, config or None, split="train", streaming=True):
        text = record.get(text_field)
        if isinstance(text, str) and text.strip():
            yield text + "\n\n"


def tokenize_source(source: str, tokenizer, max_tokens: int, text_field: str = "text") -> np.ndarray:
    """Token ids of one source, documents packed end to end (EOS after jsonl/HF documents)."""
    eos = tokenizer.eos_token_id
    is_txt = Path(source).suffix in TEXT_SUFFIXES
    out: list[int] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            out.extend(ids)
            if not is_txt and eos is not None:
                out.append(eos)
        batch.clear()

    for doc in iter_documents(source, text_field):
        batch.append(doc)
        if len(batch) == 256:
            flush()
            if len(out) >= max_tokens:
                break
    if batch and len(out) < max_tokens:
        flush()
    if not out:
        raise InputError(f"training source {source!r} holds no text.")
    return np.asarray(out[:max_tokens], dtype=np.int64)


@dataclass
class TokenCorpus:
    """Packed training and held-out token streams (1-D int64 arrays)."""

    train: np.ndarray
    val: np.ndarray

    @classmethod
    def build(cls, options: DataOptions, tokenizer) -> TokenCorpus:
        train, val = [], []
        for src in options.sources:
            ids = tokenize_source(src, tokenizer, options.max_tokens_per_source, options.text_field)
            cut = len(ids) - int(len(ids) * options.val_fraction)
            train.append(ids[:cut])
            val.append(ids[cut:])
        return cls(train=np.concatenate(train), val=np.concatenate(val))


def sample_window(tokens: np.ndarray, length: int, rng: np.random.Generator) -> list[int]:
    """``length`` consecutive tokens at a random offset drawn from ``rng``."""
    if length > len(tokens):
        raise InputError(
            f"an example needs {length} tokens but the corpus has only {len(tokens)}; "
            "add data or lower --max-chunks."
        )
    start = int(rng.integers(0, len(tokens) - length + 1))
    return tokens[start : start + length].tolist()


def read_sources(spec: Sequence[str]) -> tuple[str, ...]:
    """Comma-separated CLI source lists -> a tuple of sources."""
    return tuple(s.strip() for item in spec for s in item.split(",") if s.strip())
