"""Retrieval index: passages, retrieval vectors in a vector store, and precomputed chunk encodings."""

from refrag.index.chunkstore import PassageMeta
from refrag.index.index import BuildStats, Index, IndexOptions, SearchHit
from refrag.index.ingest import Document, iter_documents, wiki_corpus
from refrag.index.manifest import EncoderKey, IndexManifest
from refrag.index.retrieval import RetrievalEncoder
from refrag.index.store import FaissStore, LanceStore, StoreOptions, VectorStore

__all__ = ["BuildStats", "Document", "EncoderKey", "FaissStore", "Index", "IndexManifest", "IndexOptions",
           "LanceStore", "PassageMeta", "RetrievalEncoder", "SearchHit", "StoreOptions", "VectorStore",
           "iter_documents", "wiki_corpus"]
