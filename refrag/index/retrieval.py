"""The RETRIEVAL encoder (passage and query vectors for the vector store): any sentence-transformers model.

Distinct from the RefragModel's CHUNK encoder (whose outputs the chunk store keeps), though both default to
all-MiniLM-L6-v2. Vectors are L2-normalised float32, so inner product is cosine similarity.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from refrag.config import DEFAULT_RETRIEVAL_ENCODER


class RetrievalEncoder:
    """A sentence-transformers model resolved like any refrag model spec (built-in name, folder, HF id)."""

    def __init__(self, spec: str = DEFAULT_RETRIEVAL_ENCODER, *, dtype: str = "auto", progress: bool = False) -> None:
        from sentence_transformers import SentenceTransformer

        from refrag.models import resolve
        from refrag.precision import resolve_dtype

        self.spec = spec
        path = resolve(spec, progress=progress).path
        dtype = resolve_dtype(dtype)
        self.model = SentenceTransformer(path, device="cpu", model_kwargs={"dtype": getattr(torch, dtype)})
        self.dim = int(self.model.get_embedding_dimension())

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """``encode`` for questions, with a warning for any the encoder reads only in part (longer than its
        ``max_seq_length`` tokens: the rest does not count for retrieval)."""
        limit = self.model.max_seq_length
        for q in queries:
            n = len(self.model.tokenizer(q, add_special_tokens=True)["input_ids"])
            if n > limit:
                warnings.warn(f"the query has {n} tokens; the retrieval encoder {self.spec} reads its first {limit} "
                              f"(the rest is ignored for retrieval): {q[:60]!r}...", stacklevel=3)
        return self.encode(queries)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """texts -> [N, dim] float32 unit vectors."""
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            out = self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)
