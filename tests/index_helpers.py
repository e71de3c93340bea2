"""Index test helpers and fixtures (imported by the index tests): tiny corpus, retrieval encoder, model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tokenizer, tiny_encoder, tiny_refrag

from refrag.index import Index, IndexOptions, RetrievalEncoder

DOCS = [
    ("Paris", "Paris is the capital of France. Rivers flow to the sea through Paris."),
    ("Fox", "The quick brown fox jumps over the lazy dog. The dog sleeps."),
    ("Numbers", "Numbers: 0 1 2 3 4 5 6 7 8 9. Numbers count things."),
    ("Mountains", "Mountains rise above the clouds. The sea lies below the mountains."),
]


def write_corpus(folder: Path) -> Path:
    """A folder with a .jsonl (title + text), a .txt and a nested .md file."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"title": title, "text": text}) + "\n" for title, text in DOCS[:2])
    (folder / "numbers.txt").write_text(DOCS[2][1], encoding="utf-8")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "mountains.md").write_text("# Mountains\n\n" + DOCS[3][1], encoding="utf-8")
    return folder


def save_retrieval_encoder(folder: Path) -> Path:
    """A random tiny BERT saved as a Hugging Face folder; sentence-transformers adds mean pooling."""
    if not (folder / "config.json").exists():
        tiny_encoder(len(make_tokenizer())).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def retrieval_spec(tmp_path_factory) -> str:
    return str(save_retrieval_encoder(tmp_path_factory.mktemp("retriever")))


@pytest.fixture(scope="session")
def retriever(retrieval_spec) -> RetrievalEncoder:
    return RetrievalEncoder(retrieval_spec, dtype="float32")


@pytest.fixture
def options(retrieval_spec) -> IndexOptions:
    return IndexOptions(passage_tokens=16, retrieval_encoder=retrieval_spec, batch_passages=3, shard_passages=4)


@pytest.fixture(scope="session")
def rmodel():
    return tiny_refrag("llama", k=4)


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")


def build(corpus: Path, tmp_path: Path, rmodel, options: IndexOptions) -> Index:
    return Index.build(corpus, tmp_path / "idx", rmodel, options, progress=False)
