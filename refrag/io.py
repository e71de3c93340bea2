"""Crash-safe writes: a folder or file is built under a temporary name next to its target, then renamed.

A crash or kill mid-write leaves the previous version intact (and a ``.tmp-*`` sibling that the next write
removes). Used by checkpoints, indexes and the model cache alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _clean_stale(target: Path) -> None:
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()


def check_replaceable(target: str | os.PathLike[str], marker: str, what: str) -> None:
    """``target`` may be (re)written only if it is absent, an empty folder, or already a ``what`` (it holds
    ``marker``): refrag never replaces a user's own folder."""
    from refrag.errors import InputError

    target = Path(target)
    if target.exists() and not target.is_dir():
        raise InputError(f"{target} is a file, not a folder: choose another output path.")
    if target.is_dir() and not (target / marker).is_file() and (content := sorted(p.name for p in target.iterdir())):
        shown = ", ".join(content[:5]) + (f", ... ({len(content)} entries)" if len(content) > 5 else "")
        raise InputError(f"{target} is not a {what} and is not empty (it holds {shown}): refrag will not replace "
                         "it. Choose another output folder, or move those files away first.")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *, replaces: tuple[str, str] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``target`` in (almost) one rename.

    On an exception the temporary folder is removed and ``target`` is untouched. ``replaces`` = (marker file,
    what it is): an existing non-empty ``target`` without that marker is refused (``check_replaceable``).
    """
    if replaces is not None:
        check_replaceable(target, *replaces)
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.tmp-old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)  # the old version stays recoverable until the new one is in place
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 text to ``path`` via a temporary file and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_jsonl(path: str | os.PathLike[str], missing: str) -> list[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line; a missing file is an InputError saying ``missing``,
    a line that is not JSON one naming the file and line."""
    from refrag.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{missing}: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n} is not JSON ({e}).") from e
    return rows


def write_jsonl_atomic(path: str | os.PathLike[str], rows: Iterable[Any]) -> None:
    """Write one JSON object per line to ``path`` atomically."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
