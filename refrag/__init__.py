"""refrag: compressed-context RAG (REFRAG, arXiv 2509.01092)."""

from __future__ import annotations

__version__ = "0.1.0"
