"""refrag: compressed-context RAG (REFRAG, arXiv 2509.01092).

The public API is imported lazily so ``import refrag`` (and the CLI's --help) does not load torch.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# OpenMP threads that sleep instead of spinning when they wait: with another process on one of the cores, torch's
# default (spinning) made a 512-token full-context TTFT 3.4x slower; passive waiting degrades like one thread
# and costs ~0-10% on an idle machine (docs/index.md, "Shared cores"). Read when torch loads OpenMP, so it applies
# when refrag is imported before torch (the CLI always is); a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from refrag.noise import silence_known_noise  # after the environment is set, before torch loads

silence_known_noise()

_EXPORTS = {
    "ChunkingOptions": "refrag.config",
    "CompressionOptions": "refrag.config",
    "SamplingOptions": "refrag.config",
    "RefragConfig": "refrag.config",
    "RefragError": "refrag.errors",
    "InputError": "refrag.errors",
    "CheckpointError": "refrag.errors",
    "ModelNotFoundError": "refrag.errors",
    "MissingPackageError": "refrag.errors",
    "Passage": "refrag.chunking",
    "split_passages": "refrag.chunking",
    "RefragModel": "refrag.modeling",
    "Request": "refrag.generation",
    "Answer": "refrag.generation",
    "generate": "refrag.generation",
    "load_model": "refrag.checkpoint",
    "Index": "refrag.index",
    "Pipeline": "refrag.pipeline",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (built from the lazy export table)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'refrag' has no attribute {name!r}")
