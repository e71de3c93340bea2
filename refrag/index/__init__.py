"""Retrieval index: passages, retrieval vectors in a vector store, and precomputed chunk encodings."""

from refrag.index.chunkstore import PassageMeta
from refrag.index.index import BuildStats, Index, IndexOptions, SearchHit, model_key
from refrag.index.ingest import Document, iter_documents, wiki_corpus
from refrag.index.retrieval import RetrievalEncoder
from refrag.index.store import FaissStore, LanceStore, StoreOptions, VectorStore

__all__ = ["BuildStats", "Document", "FaissStore", "Index", "IndexOptions", "LanceStore", "PassageMeta",
           "RetrievalEncoder", "SearchHit", "StoreOptions", "VectorStore", "iter_documents", "model_key",
           "wiki_corpus"]
