"""The one reader of versioned JSON manifests (checkpoints and indexes): folder, file, format and version checks.

Every manifest is ``{"format": NAME, "version": N, ...}`` in a folder; readers turn the rest into typed
dataclasses (``CheckpointManifest``, ``IndexManifest``) with :func:`parse_typed`, which checks every field
against its annotation. A newer version than this refrag knows is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from refrag.errors import CheckpointError

T = TypeVar("T")


@dataclass(frozen=True)
class ManifestKind:
    """What a manifest belongs to, for checks and for error messages that say what to do."""

    filename: str  # e.g. "refrag.json"
    format: str  # the "format" field
    version: int  # the newest version this refrag writes and reads
    noun: str  # "refrag checkpoint", "refrag index"
    remedy: str  # what to do when the manifest is missing or corrupt

    def header(self) -> dict[str, Any]:
        """The fields every manifest of this kind starts with."""
        return {"format": self.format, "version": self.version}


def read_manifest(folder: Path, kind: ManifestKind) -> dict[str, Any]:
    """The manifest of ``folder`` as a dict, after the checks every manifest shares; CheckpointError otherwise."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; a {kind.noun} is a folder with {kind.filename}.")
    try:
        manifest = json.loads((folder / kind.filename).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder} has no {kind.filename}: not a {kind.noun} ({kind.remedy}).") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder}/{kind.filename} is corrupt ({e}); {kind.remedy}.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != kind.format:
        raise CheckpointError(f"{folder}/{kind.filename} is not a {kind.noun} manifest.")
    version = manifest.get("version", 0)
    if not isinstance(version, int) or version > kind.version:
        raise CheckpointError(f"{folder} was written by a newer refrag (format {version}); upgrade refrag.")
    return manifest


def parse_typed(cls: type[T], raw: Any, where: str, remedy: str) -> T:
    """``raw`` (parsed JSON) as the dataclass ``cls``, every field checked against its annotation (int, float,
    str, bool, Literal, ``X | None``, ``list[X]``, ``dict[str, X]``, nested dataclasses, Any); keys it does not
    know are ignored, missing ones take their defaults. A wrong type, a missing required field or a value the
    dataclass refuses is a CheckpointError naming the field, then ``remedy`` (a sentence):
    ``where: field config.k: expected int, got '16'. Restore ...``."""
    return _typed(cls, raw, "", where, remedy)


def _fail(where: str, field: str, message: str, remedy: str) -> CheckpointError:
    return CheckpointError(f"{where}: field {field or '(top level)'}: {message}. {remedy}")


def _typed(hint: Any, value: Any, field: str, where: str, remedy: str) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            raise _fail(where, field, f"expected an object, got {value!r}", remedy)
        hints = get_type_hints(hint)
        kwargs = {}
        for f in dataclasses.fields(hint):
            name = f"{field}.{f.name}" if field else f.name
            if f.name in value:
                kwargs[f.name] = _typed(hints[f.name], value[f.name], name, where, remedy)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _fail(where, name, "missing", remedy)
        try:
            return hint(**kwargs)
        except (ValueError, TypeError) as e:  # InputError is a ValueError: a value the dataclass refuses
            raise _fail(where, field, str(e), remedy) from e
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise _fail(where, field, f"expected one of {', '.join(map(repr, args))}, got {value!r}", remedy)
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms[:-1]:
            with contextlib.suppress(CheckpointError):
                return _typed(arm, value, field, where, remedy)
        return _typed(arms[-1], value, field, where, remedy)
    if origin is list:
        if not isinstance(value, list):
            raise _fail(where, field, f"expected a list, got {value!r}", remedy)
        return [_typed(args[0], v, f"{field}[{i}]", where, remedy) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(where, field, f"expected an object, got {value!r}", remedy)
        return {k: _typed(args[1], v, f"{field}.{k}", where, remedy) for k, v in value.items()}
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool)}.get(hint)
    if ok is None:
        raise TypeError(f"parse_typed cannot check {hint!r} ({where}: {field})")  # a refrag bug, not a bad file
    if not ok(value):
        raise _fail(where, field, f"expected {hint.__name__}, got {value!r}", remedy)
    return float(value) if hint is float else value
