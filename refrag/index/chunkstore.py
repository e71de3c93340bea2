"""Shards of passages: decoder token ids + the L chunk encoder outputs of every passage, memory-mapped.

A shard is two immutable files written once:

- ``NAME.safetensors``: ``chunks`` [M, E] (bf16 encoder outputs, one row per k-token chunk, projection
  happens at query time so retrained projectors reuse them), ``tokens`` [T] int32 (decoder token ids of all
  passages, concatenated), per-passage offsets ``chunk_offsets`` / ``token_offsets`` / ``meta_offsets``
  [n + 1] int64, and ``content_ids`` [n] int64 (:func:`content_id`: what ``add`` compares to skip duplicates).
- ``NAME.jsonl``: one JSON line of metadata per passage (text, source, line, offset, title).

The manifest's entry of a shard (:class:`ShardEntry`) records both files' sizes and sha256. Readers compare
the sizes and the structure (offsets, shapes, k) on open, map the safetensors file and slice only the rows a
query needs; metadata lines are read by seeking.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from refrag.errors import CheckpointError
from refrag.integrity import FileRecord, record, verify

STORE_DTYPE = torch.bfloat16
REBUILD = "Rebuild the index (`refrag index build`), or restore its folder from a backup."


def content_id(path: str, text: str) -> int:
    """A passage's identity: the first 8 bytes of sha256(absolute source path, text), as an int64."""
    digest = hashlib.sha256(f"{path}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


@dataclass(frozen=True)
class ShardEntry:
    """A shard in index.json: its name, what it holds, and its two files as written."""

    name: str
    passages: int
    chunks: int
    files: dict[str, FileRecord] = field(default_factory=dict)  # empty in indexes written before refrag 0.9

    @property
    def file_names(self) -> tuple[str, str]:
        return f"{self.name}.safetensors", f"{self.name}.jsonl"


@dataclass(frozen=True)
class PassageMeta:
    """Where a passage came from."""

    text: str
    source: str  # file path as given to build / add (what answers cite)
    line: int  # 1-based line of a .jsonl file (0 for .txt / .md)
    offset: int  # character offset of the passage's start in its document's text (best effort)
    title: str
    path: str = ""  # the source resolved to an absolute path at ingest (what remove / update match); "" before 0.9

    @property
    def resolved(self) -> str:
        """The absolute source path (older indexes: ``source`` resolved against the current folder)."""
        return self.path or os.path.realpath(self.source)


class ShardWriter:
    """Collects passages in memory and writes one shard (the caller flushes every ``shard_size`` passages)."""

    def __init__(self) -> None:
        self.metas: list[PassageMeta] = []
        self.tokens: list[np.ndarray] = []
        self.chunks: list[torch.Tensor] = []
        self.ids: list[int] = []

    def __len__(self) -> int:
        return len(self.metas)

    def append(self, meta: PassageMeta, token_ids: tuple[int, ...], encoded: torch.Tensor, identity: int) -> None:
        """encoded: [L, E] encoder outputs of the passage's L chunks; identity: its :func:`content_id`."""
        self.metas.append(meta)
        self.tokens.append(np.asarray(token_ids, dtype=np.int32))
        self.chunks.append(encoded.detach().to("cpu", STORE_DTYPE))
        self.ids.append(identity)

    def write(self, folder: Path, name: str) -> ShardEntry:
        """Write ``name.safetensors`` and ``name.jsonl`` into ``folder``; returns the shard's manifest entry."""
        lines = [json.dumps(asdict(m), ensure_ascii=False).encode("utf-8") + b"\n" for m in self.metas]
        with open(folder / f"{name}.jsonl", "wb") as f:
            f.writelines(lines)
        tensors = {
            "chunks": torch.cat(self.chunks).contiguous(),  # [M, E]
            "tokens": torch.from_numpy(np.concatenate(self.tokens)),  # [T]
            "chunk_offsets": _offsets([len(c) for c in self.chunks]),  # [n + 1]
            "token_offsets": _offsets([len(t) for t in self.tokens]),  # [n + 1]
            "meta_offsets": _offsets([len(b) for b in lines]),  # [n + 1]
            "content_ids": torch.tensor(self.ids, dtype=torch.int64),  # [n]
        }
        save_file(tensors, str(folder / f"{name}.safetensors"))
        return ShardEntry(name, len(self.metas), int(tensors["chunks"].shape[0]),
                          record(folder, (f"{name}.safetensors", f"{name}.jsonl")))


def _offsets(sizes: list[int]) -> torch.Tensor:
    """[n] sizes -> [n + 1] int64 start offsets (the last is the total)."""
    return torch.from_numpy(np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64))


class ShardReader:
    """Read-only, memory-mapped access to one shard."""

    def __init__(self, folder: Path, entry: ShardEntry, k: int, chunk_dim: int) -> None:
        """Opens the shard after the cheap checks: file sizes against the manifest's records, offsets and
        shapes against each other and against the manifest (passages, chunks, chunk width, ceil(tokens / k)
        chunks per passage). CheckpointError naming the file otherwise."""
        self.entry = entry
        self.name = entry.name
        verify(folder, entry.files, checksums=False, remedy=REBUILD)
        path = folder / entry.file_names[0]
        try:
            self._file = safe_open(str(path), framework="pt")
            self.chunk_offsets = self._file.get_tensor("chunk_offsets").numpy()  # [n + 1]
            self.token_offsets = self._file.get_tensor("token_offsets").numpy()  # [n + 1]
            self.meta_offsets = self._file.get_tensor("meta_offsets").numpy()  # [n + 1]
            shapes = {name: tuple(self._file.get_slice(name).get_shape()) for name in ("chunks", "tokens")}
        except Exception as e:  # safetensors raises several types for missing / truncated files
            raise CheckpointError(f"{path} is missing or corrupt ({e}). {REBUILD}") from e
        n = len(self.chunk_offsets) - 1
        per_passage = np.diff(self.token_offsets)  # [n] tokens of each passage
        found = [
            f"{n} passages, the manifest says {entry.passages}" if n != entry.passages else "",
            f"{shapes['chunks'][0]} chunk rows, the manifest says {entry.chunks}" if shapes["chunks"][0] != entry.chunks
            else "",
            f"{shapes['chunks'][1:]} wide chunk rows, the index's encoder gives ({chunk_dim},)"
            if shapes["chunks"][1:] != (chunk_dim,) else "",
            "offsets that do not match its tensors" if len(self.token_offsets) != n + 1 or len(self.meta_offsets) != n + 1
            or self.chunk_offsets[-1] != shapes["chunks"][0] or self.token_offsets[-1] != shapes["tokens"][0] else "",
            f"passages whose chunk counts are not ceil(tokens / {k}) (k = {k} in the manifest)"
            if len(per_passage) == n and not np.array_equal(np.diff(self.chunk_offsets), -(-per_passage // k)) else "",
        ]
        if found := [f for f in found if f]:
            raise CheckpointError(f"{path} is inconsistent: {'; '.join(found)}. {REBUILD}")
        self._meta_path = folder / entry.file_names[1]
        size = self._meta_path.stat().st_size if self._meta_path.is_file() else -1
        if size != int(self.meta_offsets[-1]):
            raise CheckpointError(f"{self._meta_path} is missing or truncated ({max(size, 0)} bytes, the shard indexes "
                                  f"{int(self.meta_offsets[-1])}). {REBUILD}")

    def __len__(self) -> int:
        return len(self.chunk_offsets) - 1

    def encoded(self, row: int) -> torch.Tensor:
        """[L, E] stored encoder outputs of passage ``row``."""
        return self.chunk_rows(int(self.chunk_offsets[row]), int(self.chunk_offsets[row + 1]))

    def chunk_rows(self, start: int, end: int) -> torch.Tensor:
        """[end - start, E] stored chunk rows (of all passages, in order)."""
        return self._file.get_slice("chunks")[start:end]

    def token_ids(self, row: int) -> tuple[int, ...]:
        start, end = int(self.token_offsets[row]), int(self.token_offsets[row + 1])
        return tuple(self._file.get_slice("tokens")[start:end].tolist())

    def meta(self, row: int) -> PassageMeta:
        start, end = int(self.meta_offsets[row]), int(self.meta_offsets[row + 1])
        with open(self._meta_path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        try:
            return PassageMeta(**json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise CheckpointError(f"{self._meta_path}: passage {row}'s record is corrupt ({e}). {REBUILD}") from e

    def subset(self, keep: np.ndarray, folder: Path) -> ShardEntry:
        """Write the rows where ``keep`` [n] bool is True as a shard of the same name into ``folder`` (stored
        tokens, chunk vectors, metadata and identities copied: nothing is re-encoded)."""
        ids, writer = self.content_ids(), ShardWriter()
        for row in np.flatnonzero(keep):
            writer.append(self.meta(int(row)), self.token_ids(int(row)), self.encoded(int(row)), int(ids[row]))
        return writer.write(folder, self.name)

    def content_ids(self) -> np.ndarray:
        """[n] int64 :func:`content_id` of every passage (computed from the metadata for shards written before
        refrag stored them)."""
        if "content_ids" in self._file.keys():  # noqa: SIM118 (safe_open has no __contains__)
            return self._file.get_tensor("content_ids").numpy()
        return np.array([content_id(m.resolved, m.text) for m in map(self.meta, range(len(self)))], dtype=np.int64)
