"""Shards of passages: decoder token ids + the L chunk encoder outputs of every passage, memory-mapped.

A shard is two immutable files written once:

- ``NAME.safetensors``: ``chunks`` [M, E] (bf16 encoder outputs, one row per k-token chunk, projection
  happens at query time so retrained projectors reuse them), ``tokens`` [T] int32 (decoder token ids of all
  passages, concatenated), and per-passage offsets ``chunk_offsets`` / ``token_offsets`` / ``meta_offsets``
  [n + 1] int64.
- ``NAME.jsonl``: one JSON line of metadata per passage (text, source, line, offset, title).

Readers map the safetensors file and slice only the rows a query needs; metadata lines are read by seeking.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from refrag.errors import CheckpointError

STORE_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class PassageMeta:
    """Where a passage came from."""

    text: str
    source: str  # file path
    line: int  # 1-based line of a .jsonl file (0 for .txt / .md)
    offset: int  # character offset of the passage's start in its document's text (best effort)
    title: str


class ShardWriter:
    """Collects passages in memory and writes one shard (the caller flushes every ``shard_size`` passages)."""

    def __init__(self) -> None:
        self.metas: list[PassageMeta] = []
        self.tokens: list[np.ndarray] = []
        self.chunks: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.metas)

    def append(self, meta: PassageMeta, token_ids: tuple[int, ...], encoded: torch.Tensor) -> None:
        """encoded: [L, E] encoder outputs of the passage's L chunks."""
        self.metas.append(meta)
        self.tokens.append(np.asarray(token_ids, dtype=np.int32))
        self.chunks.append(encoded.detach().to("cpu", STORE_DTYPE))

    def write(self, folder: Path, name: str) -> dict:
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
        }
        save_file(tensors, str(folder / f"{name}.safetensors"))
        return {"name": name, "passages": len(self.metas), "chunks": int(tensors["chunks"].shape[0])}


def _offsets(sizes: list[int]) -> torch.Tensor:
    """[n] sizes -> [n + 1] int64 start offsets (the last is the total)."""
    return torch.from_numpy(np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64))


class ShardReader:
    """Read-only, memory-mapped access to one shard."""

    def __init__(self, folder: Path, entry: dict) -> None:
        self.name = entry["name"]
        path = folder / f"{self.name}.safetensors"
        try:
            self._file = safe_open(str(path), framework="pt")
            self.chunk_offsets = self._file.get_tensor("chunk_offsets").numpy()  # [n + 1]
            self.token_offsets = self._file.get_tensor("token_offsets").numpy()  # [n + 1]
            self.meta_offsets = self._file.get_tensor("meta_offsets").numpy()  # [n + 1]
        except Exception as e:  # safetensors raises several types for missing / truncated files
            raise CheckpointError(f"{path} is missing or corrupt ({e}); rebuild the index.") from e
        if len(self.chunk_offsets) != entry["passages"] + 1:
            raise CheckpointError(f"{path} holds {len(self.chunk_offsets) - 1} passages, the manifest says "
                                  f"{entry['passages']}; rebuild the index.")
        self._meta_path = folder / f"{self.name}.jsonl"
        size = self._meta_path.stat().st_size if self._meta_path.is_file() else -1
        if size != int(self.meta_offsets[-1]):
            raise CheckpointError(f"{self._meta_path} is missing or truncated ({max(size, 0)} bytes, the shard indexes "
                                  f"{int(self.meta_offsets[-1])}); rebuild the index.")

    def __len__(self) -> int:
        return len(self.chunk_offsets) - 1

    def encoded(self, row: int) -> torch.Tensor:
        """[L, E] stored encoder outputs of passage ``row``."""
        return self._file.get_slice("chunks")[int(self.chunk_offsets[row]) : int(self.chunk_offsets[row + 1])]

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
            raise CheckpointError(f"{self._meta_path}: passage {row}'s record is corrupt ({e}); rebuild the index.") \
                from e
