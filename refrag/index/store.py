"""Vector stores for passage retrieval vectors, behind one small protocol.

Ids are implicit: the i-th vector added has id i (the passage's global number). Vectors are L2-normalised
by the retrieval encoder, so inner product is cosine similarity. Two backends:

- ``FaissStore`` (default): ``flat`` exact inner product; ``hnsw`` (graph, no training) or ``ivfpq``
  (trained coarse quantizer + product quantization, ~``pq_m`` bytes per vector) for large corpora.
- ``LanceStore`` (extra ``pip install lancedb``): an embedded, disk-based columnar store that scales past RAM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from refrag.errors import CheckpointError, InputError, MissingPackageError

Backend = Literal["faiss", "lancedb"]
FaissKind = Literal["flat", "hnsw", "ivfpq"]


@dataclass(frozen=True)
class StoreOptions:
    """Which vector store holds the retrieval vectors, and its settings (saved in the index manifest)."""

    backend: Backend = "faiss"
    kind: FaissKind = "flat"  # faiss only
    hnsw_m: int = 32  # hnsw: graph neighbours per node
    hnsw_ef_search: int = 64  # hnsw: candidates explored per query (recall vs latency)
    ivf_lists: int = 1024  # ivfpq: coarse clusters (needs >= 39 x lists training vectors)
    ivf_probe: int = 16  # ivfpq: clusters searched per query
    pq_m: int = 48  # ivfpq: bytes per vector (must divide the dimension)

    def __post_init__(self) -> None:
        if self.backend not in ("faiss", "lancedb"):
            raise InputError(f"store backend must be faiss or lancedb (got {self.backend!r}).")
        if self.kind not in ("flat", "hnsw", "ivfpq"):
            raise InputError(f"store kind must be flat, hnsw or ivfpq (got {self.kind!r}).")

    def to_json(self) -> dict:
        return asdict(self)


class VectorStore(Protocol):
    """What the index needs from a vector store."""

    FILES: tuple[str, ...]  # files ``save`` writes whose size and sha256 the manifest records

    def __len__(self) -> int: ...

    def add(self, vectors: np.ndarray) -> None:
        """Append [N, dim] float32 vectors; they get ids len(self) .. len(self) + N - 1."""

    def search(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """[Q, dim] queries -> ([Q, top_k] float32 scores, [Q, top_k] int64 ids), best first, -1 padded."""

    def save(self, folder: Path) -> None:
        """Persist into ``folder`` (a fresh temporary folder inside the index being written)."""

    def subset(self, keep: np.ndarray) -> VectorStore:
        """A new store of the vectors where ``keep`` [len(self)] bool is True, renumbered 0.. in order."""


def _check(vectors: np.ndarray, dim: int) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise InputError(f"vectors must be [N, {dim}] (got {tuple(vectors.shape)}).")
    return vectors


class FaissStore:
    """FAISS index (flat / HNSW / IVF-PQ), inner-product metric, saved with faiss.write_index (no pickle)."""

    FILE = "vectors.faiss"
    FILES = (FILE,)

    def __init__(self, dim: int, options: StoreOptions, index=None) -> None:
        import faiss

        self.dim, self.options = dim, options
        if index is None:
            if options.kind == "flat":
                index = faiss.IndexFlatIP(dim)
            elif options.kind == "hnsw":
                index = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            else:
                if dim % options.pq_m:
                    raise InputError(f"pq_m={options.pq_m} must divide the vector dimension {dim}.")
                quantizer = faiss.IndexFlatIP(dim)
                index = faiss.IndexIVFPQ(quantizer, dim, options.ivf_lists, options.pq_m, 8,
                                         faiss.METRIC_INNER_PRODUCT)
        if options.kind == "hnsw":
            index.hnsw.efSearch = options.hnsw_ef_search
        elif options.kind == "ivfpq":
            index.nprobe = options.ivf_probe
        self.index = index
        self._untrained: list[np.ndarray] = []
        self._train_size = max(39 * options.ivf_lists, 256)  # k-means: 39 points per list; PQ: 256 codes

    def __len__(self) -> int:
        return int(self.index.ntotal) + sum(len(v) for v in self._untrained)

    def add(self, vectors: np.ndarray) -> None:
        vectors = _check(vectors, self.dim)
        if self.index.is_trained:
            self.index.add(vectors)
            return
        self._untrained.append(vectors)  # IVF-PQ: held back until there are enough to train on
        if sum(len(v) for v in self._untrained) >= self._train_size:
            pending, self._untrained = np.concatenate(self._untrained), []
            self.index.train(pending)
            self.index.add(pending)

    def search(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.index.search(_check(queries, self.dim), top_k)
        return scores, ids.astype(np.int64)

    def subset(self, keep: np.ndarray) -> FaissStore:
        """Flat / HNSW: the kept vectors exactly. IVF-PQ: the trained quantizers are kept and the kept vectors are
        re-added from their decoded codes: a second quantization, so a vector may move to a neighbouring list or
        code (recall can drift a little with every remove / update; rebuild to start clean)."""
        import faiss

        if self._untrained:
            vectors = np.concatenate(self._untrained)
        else:
            if self.options.kind == "ivfpq":
                self.index.make_direct_map()
            vectors = self.index.reconstruct_n(0, self.index.ntotal)  # [N, dim]
        kept = vectors[keep]
        if self.options.kind == "ivfpq" and self.index.is_trained:
            index = faiss.clone_index(self.index)
            index.reset()
            index.add(kept)
            return FaissStore(self.dim, self.options, index)
        store = FaissStore(self.dim, self.options)
        store.add(kept)
        return store

    def save(self, folder: Path) -> None:
        import faiss

        if self._untrained:
            raise InputError(
                f"IVF-PQ with {self.options.ivf_lists} lists trains on >= {self._train_size} vectors but the corpus "
                f"has {len(self)}: use --store-kind flat or hnsw for small corpora, or fewer IVF lists."
            )
        faiss.write_index(self.index, str(folder / self.FILE))

    @classmethod
    def open(cls, folder: Path, dim: int, options: StoreOptions) -> FaissStore:
        import faiss

        path = folder / cls.FILE
        if not path.exists():
            raise CheckpointError(f"{path} is missing: the index is incomplete; rebuild it.")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:  # faiss reports a truncated or foreign file this way
            raise CheckpointError(f"{path} is truncated or not a FAISS index ({str(e).splitlines()[0]}); rebuild "
                                  "the index.") from e
        if index.d != dim:
            raise CheckpointError(f"{path} holds {index.d}-d vectors but the manifest says {dim}; rebuild it.")
        return cls(dim, options, index)


class LanceStore:
    """LanceDB table (id, vector) in ``folder/lance``; brute-force dot-product search, disk-resident."""

    DIR, TABLE = "lance", "vectors"
    FILES = ()  # a LanceDB table is many files that LanceDB versions and checks itself

    def __init__(self, dim: int, table=None) -> None:
        self.dim = dim
        self._pending: list[np.ndarray] = []  # vectors added since open, written on save
        self._table = table
        self._n = table.count_rows() if table is not None else 0

    @staticmethod
    def _lancedb():
        try:
            import lancedb
        except ImportError as e:
            raise MissingPackageError("the LanceDB vector store", "pip install 'refrag[lancedb]'") from e
        return lancedb

    def __len__(self) -> int:
        return self._n + sum(len(v) for v in self._pending)

    def add(self, vectors: np.ndarray) -> None:
        self._pending.append(_check(vectors, self.dim))

    def subset(self, keep: np.ndarray) -> LanceStore:
        rows = self._table.to_arrow().sort_by("id") if self._table is not None else None
        saved = np.asarray(rows.column("vector").to_pylist(), dtype=np.float32).reshape(-1, self.dim) \
            if rows is not None else np.zeros((0, self.dim), np.float32)
        store = LanceStore(self.dim)
        store.add(np.concatenate([saved, *self._pending])[keep])
        return store

    def search(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _check(queries, self.dim)
        if self._pending:
            raise InputError("LanceStore: save the store before searching vectors added in this session.")
        scores = np.full((len(queries), top_k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), top_k), -1, dtype=np.int64)
        for q, query in enumerate(queries):
            rows = (self._table.search(query).distance_type("dot").limit(top_k).select(["id"]).to_arrow())
            n = rows.num_rows
            ids[q, :n] = rows.column("id").to_numpy()
            scores[q, :n] = 1.0 - rows.column("_distance").to_numpy()  # lance "dot" distance is 1 - <q, v>
        return scores, ids

    def save(self, folder: Path) -> None:
        import pyarrow as pa

        lancedb = self._lancedb()
        db = lancedb.connect(str(folder / self.DIR))
        schema = pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), self.dim))])
        table = db.open_table(self.TABLE) if self.TABLE in db.list_tables().tables else db.create_table(
            self.TABLE, schema=schema)
        start = table.count_rows()
        for block in self._pending:
            ids = pa.array(np.arange(start, start + len(block), dtype=np.int64))
            vecs = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), self.dim)
            table.add(pa.Table.from_arrays([ids, vecs], schema=schema))
            start += len(block)
        self._pending, self._table, self._n = [], table, start

    @classmethod
    def open(cls, folder: Path, dim: int) -> LanceStore:
        lancedb = cls._lancedb()
        if not (folder / cls.DIR).is_dir():
            raise CheckpointError(f"{folder / cls.DIR} is missing: the index is incomplete; rebuild it.")
        return cls(dim, table=lancedb.connect(str(folder / cls.DIR)).open_table(cls.TABLE))


def create_store(options: StoreOptions, dim: int) -> VectorStore:
    """An empty store of the configured backend."""
    if options.backend == "lancedb":
        LanceStore._lancedb()
        return LanceStore(dim)
    return FaissStore(dim, options)


def open_store(folder: Path, options: StoreOptions, dim: int) -> VectorStore:
    """The store saved in an index folder."""
    if options.backend == "lancedb":
        return LanceStore.open(folder, dim)
    return FaissStore.open(folder, dim, options)
