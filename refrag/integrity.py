"""What the files of a checkpoint or an index were when written: size + sha256, recorded in the manifest.

On open, sizes are always compared (free: a ``stat`` per file) and checksums where they are cheap (a checkpoint
up to ``CHECKSUM_LIMIT`` bytes, hashed at ~1 GB/s); an index compares sizes on open and checksums in
``refrag index check`` (its chunk stores grow to many GB). A file that differs is a CheckpointError naming it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from refrag.errors import CheckpointError

CHECKSUM_LIMIT = 2 * 1024**3  # checkpoints larger than this are checked by size on load (full check: sha256 too)


@dataclass(frozen=True)
class FileRecord:
    """One file as it was written."""

    bytes: int
    sha256: str


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def record(folder: Path, names: Iterable[str]) -> dict[str, FileRecord]:
    """The records of ``names`` (paths relative to ``folder``, '/'-separated)."""
    return {name: FileRecord((folder / name).stat().st_size, sha256_of(folder / name)) for name in sorted(names)}


def record_tree(folder: Path, *, skip: Iterable[str] = ()) -> dict[str, FileRecord]:
    """The records of every file under ``folder`` but ``skip`` (the manifest itself)."""
    skipped = set(skip)
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return record(folder, [n for n in names if n not in skipped])


def problems(folder: Path, records: Mapping[str, FileRecord], *, checksums: bool) -> list[str]:
    """What differs from the records: a missing file, another size, another sha256 (``checksums``)."""
    found = []
    for name, rec in records.items():
        path = folder / name
        if not path.is_file():
            found.append(f"{path} is missing")
        elif (size := path.stat().st_size) != rec.bytes:
            found.append(f"{path} has {size:,} bytes, {rec.bytes:,} when it was written (truncated or replaced)")
        elif checksums and sha256_of(path) != rec.sha256:
            found.append(f"{path} is damaged: its sha256 differs from the one recorded when it was written")
    return found


def verify(folder: Path, records: Mapping[str, FileRecord], *, checksums: bool, remedy: str) -> None:
    """CheckpointError listing every file that differs from its record; ``remedy`` says what to do."""
    found = problems(folder, records, checksums=checksums)
    if found:
        raise CheckpointError("; ".join(found) + f". {remedy}")


def total_bytes(records: Mapping[str, FileRecord]) -> int:
    return sum(r.bytes for r in records.values())
