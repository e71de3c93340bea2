"""``refrag index check``: verify an index end to end and say everything that is wrong, not just the first thing.

Opening an index (``Index.open``) makes the cheap checks (file sizes, offsets, shapes, counts) and stops at the
first problem. This reads every byte: the sha256 of every file against the manifest's records, every stored
chunk vector finite, every metadata line parseable, the vector store's count against the passages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refrag.errors import CheckpointError, RefragError
from refrag.index.chunkstore import ShardReader
from refrag.index.manifest import IndexManifest
from refrag.index.store import StoreOptions, open_store
from refrag.integrity import problems

BLOCK_ROWS = 65536  # chunk rows read at a time for the finiteness scan ([BLOCK_ROWS, E] bf16: ~50 MB at E = 384)


@dataclass
class IndexReport:
    """What ``check_index`` found: ``problems`` is empty for a sound index; ``warnings`` are what could not be
    checked."""

    path: Path
    passages: int = 0
    chunks: int = 0
    files_checked: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_index(path: str | Path, *, progress: bool = True) -> IndexReport:
    """Every check there is; never raises for a damaged index (the report lists what is wrong)."""
    report = IndexReport(Path(path))
    try:
        manifest = IndexManifest.read(report.path)
    except CheckpointError as e:
        report.problems.append(str(e))
        return report
    records = [*((report.path, e.files) for e in manifest.shards), (report.path, manifest.store_files)]
    for folder, files in records:
        report.problems += problems(folder, files, checksums=True)
        report.files_checked += len(files)
    if any(not e.files for e in manifest.shards):
        report.warnings.append("some shards have no recorded checksums (written before refrag recorded them): "
                               "their structure was checked, not their bytes; rebuild the index to record them")
    for entry in tqdm(manifest.shards, desc="checking", unit="shard", disable=not progress):
        try:
            shard = ShardReader(report.path, entry, manifest.model.k, manifest.chunk_dim)
        except CheckpointError as e:
            report.problems.append(str(e))
            continue
        report.passages += len(shard)
        report.chunks += entry.chunks
        report.problems += _scan(shard)
    try:
        store = open_store(report.path, StoreOptions(**manifest.retrieval.store), manifest.retrieval.dim)
        if len(store) != sum(e.passages for e in manifest.shards):
            report.problems.append(f"the vector store holds {len(store)} vectors for "
                                   f"{sum(e.passages for e in manifest.shards)} passages")
    except RefragError as e:  # also a missing optional package (lancedb)
        report.problems.append(str(e))
    return report


def _scan(shard: ShardReader) -> list[str]:
    """Non-finite chunk vectors and unreadable metadata lines of one shard."""
    found = []
    rows = shard.entry.chunks
    bad = 0
    for start in range(0, rows, BLOCK_ROWS):
        block = shard.chunk_rows(start, min(start + BLOCK_ROWS, rows))  # [b, E]
        bad += int((~torch.isfinite(block.float())).any(dim=-1).sum())
    if bad:
        found.append(f"{shard.name}.safetensors: {bad} of {rows} chunk vectors are not finite (NaN or inf)")
    for row in range(len(shard)):
        try:
            shard.meta(row)
        except CheckpointError as e:
            found.append(str(e))
            break  # one line is enough to say the file is damaged
    return found
