"""Model resolution: a built-in offline name, a local folder, or a Hugging Face id -> a loadable path."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from refrag.errors import CheckpointError, ModelNotFoundError
from refrag.models.convert import cache_root, is_converted, is_installed, prepare
from refrag.models.zoo import BUILTINS, ZooEntry, find_entry

__all__ = ["BUILTINS", "ModelStatus", "ResolvedModel", "ZooEntry", "cache_root", "list_models", "pull", "resolve"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec resolved to something ``from_pretrained`` loads."""

    name: str  # the built-in's canonical name, the folder's name, or the hub id
    path: str  # a local folder, or a Hugging Face id for source="hub"
    kind: Literal["decoder", "encoder"] | None  # known for built-ins only
    source: Literal["builtin", "local", "hub"]


@dataclass(frozen=True)
class ModelStatus:
    """A built-in model and where it stands on this machine."""

    entry: ZooEntry
    installed: bool  # its packages are installed
    converted: bool  # ready to load (converted into the cache, or a ready folder in its package)


def resolve(spec: str, *, progress: bool = True) -> ResolvedModel:
    """Built-in name (converted once, cached), local folder (must hold config.json), or "org/name" hub id."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelNotFoundError("empty model name; " + _help())
    entry = find_entry(spec)
    if entry is not None:
        return ResolvedModel(entry.name, str(prepare(entry, progress=progress)), entry.kind, "builtin")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(
                f"{path} has no config.json: not a Hugging Face model folder (or a half-copied one). "
                "Point to the folder that holds config.json and the weights."
            )
        return ResolvedModel(path.name, str(path), None, "local")
    if _HUB_ID.fullmatch(spec) and not path.exists():
        return ResolvedModel(spec, spec, None, "hub")  # transformers downloads it when online
    what = "not a model folder" if path.exists() else "no such folder" if spec.startswith((".", "/", "~")) \
        else "unknown model"
    raise ModelNotFoundError(f"{what}: {spec!r}. " + _help())


def _help() -> str:
    """What a valid spec looks like, with the built-in names."""
    names = ", ".join(e.aliases[0] for e in BUILTINS)
    return f"Use a built-in name ({names}; see `refrag models list`), a local folder, or a Hugging Face id."


def list_models() -> list[ModelStatus]:
    """Every built-in model, whether its packages are installed and whether it is ready to load."""
    statuses = []
    for e in BUILTINS:
        installed = is_installed(e)
        statuses.append(ModelStatus(e, installed, installed if e.assembly == "folder" else is_converted(e)))
    return statuses


def pull(name: str, *, progress: bool = True) -> Path:
    """Assemble, check and convert a built-in model now; returns its folder."""
    entry = find_entry(name)
    if entry is None:
        raise ModelNotFoundError(f"{name!r} is not a built-in model. " + _help())
    return prepare(entry, progress=progress)
