"""index.json as typed dataclasses: what the stored chunk encodings are keyed to, the retrieval settings, the
shards and the build history. Read through the shared versioned-manifest reader (:mod:`refrag.manifest`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from refrag.config import DEFAULT_DECODER
from refrag.index.chunkstore import REBUILD, ShardEntry
from refrag.integrity import FileRecord
from refrag.manifest import ManifestKind, parse_typed, read_manifest
from refrag.modeling import RefragModel

INDEX = ManifestKind("index.json", "refrag-index", 1, "refrag index", "build one with `refrag index build`")


@dataclass(frozen=True)
class EncoderKey:
    """What stored chunk encodings depend on: the chunk encoder's weights and settings, k, the tokenizer."""

    k: int
    chunk_encoder: str  # its spec (a checkpoint's encoder/ folder when it was fine-tuned)
    chunk_encoder_sha256: str
    pooling: str
    encoder_max_tokens: int
    tokenizer_sha256: str

    @classmethod
    def of(cls, model: RefragModel) -> EncoderKey:
        vocab = json.dumps(sorted(model.tokenizer.get_vocab().items()), ensure_ascii=False).encode()
        return cls(model.k, model.config.encoder, model.encoder.fingerprint(), model.config.pooling,
                   model.config.encoder_max_tokens, hashlib.sha256(vocab).hexdigest())

    def differences(self, other: EncoderKey) -> list[str]:
        """'field: index X vs model Y' for every field that differs (``self`` is the index's)."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{key}: index {mine[key]!r} vs model {theirs[key]!r}" for key in mine if mine[key] != theirs[key]]


@dataclass(frozen=True)
class RetrievalInfo:
    encoder: str  # sentence-transformers model of the passage / query vectors
    dim: int
    store: dict[str, Any]  # StoreOptions.to_json()


@dataclass
class IndexManifest:
    """The whole index.json (``shards`` and ``builds`` grow with every ``add``)."""

    passage_tokens: int
    decoder: str  # default decoder for `refrag ask` (only its tokenizer is keyed)
    model: EncoderKey
    chunk_dim: int
    retrieval: RetrievalInfo
    chunk_dtype: str = "bfloat16"
    shards: list[ShardEntry] = field(default_factory=list)
    builds: list[dict[str, Any]] = field(default_factory=list)  # BuildStats of the build and of every add
    store_files: dict[str, FileRecord] = field(default_factory=dict)  # the vector store's files as written
    decoder_adapter: str | None = None  # the user's decoder adapter the index was built with (default for `ask`)
    refine: dict[str, Any] | None = None  # RefineOptions.to_json() when the encodings were refined (refrag.refine)
    refined_for: str | None = None  # then: the compressor they were refined for (refine.compressor_fingerprint)

    def to_json(self) -> dict[str, Any]:
        return {**INDEX.header(), **asdict(self)}

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: Path) -> IndexManifest:
        raw = {"decoder": DEFAULT_DECODER, **raw}  # indexes written before the decoder was recorded
        return parse_typed(cls, raw, f"{where}/{INDEX.filename}", REBUILD)

    @classmethod
    def read(cls, path: Path) -> IndexManifest:
        return cls.from_json(read_manifest(path, INDEX), path)
