"""The one reader of versioned JSON manifests (checkpoints and indexes): folder, file, format and version checks.

Every manifest is ``{"format": NAME, "version": N, ...}`` in a folder; readers turn the rest into typed
dataclasses (``CheckpointManifest``, ``IndexManifest``). A newer version than this refrag knows is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refrag.errors import CheckpointError


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
