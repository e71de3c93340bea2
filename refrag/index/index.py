"""Index: passages + retrieval vectors (vector store) + stored chunk encodings, in one crash-safe folder.

Layout of an index folder (every write goes to a temporary sibling that is renamed at the end, so a crash or
kill during ``build`` or ``add`` leaves the previous index intact)::

    index.json               versioned manifest (``IndexManifest``): what it is keyed to, store settings, shards
    shard-00000.safetensors  chunk encodings [M, E] bf16 + decoder token ids + offsets (memory-mapped)
    shard-00000.jsonl        passage metadata (text, source, line, offset, title)
    vectors.faiss | lance/   retrieval vectors, passage i has id i

The chunk encodings are keyed to the chunk encoder that made them (``EncoderKey``: its spec, a hash of its
weights, pooling, max tokens), to k and to the decoder tokenizer (token ids are stored): :meth:`Index.check_model`
refuses a mismatching model instead of feeding the decoder garbage.
"""

from __future__ import annotations

import bisect
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from refrag.chunking import Passage, make_passage, split_passages
from refrag.config import DEFAULT_RETRIEVAL_ENCODER, ChunkingOptions, check_top_k
from refrag.errors import CheckpointError, InputError
from refrag.index.chunkstore import REBUILD, PassageMeta, ShardReader, ShardWriter, content_id
from refrag.index.ingest import iter_documents
from refrag.index.manifest import INDEX, EncoderKey, IndexManifest, RetrievalInfo
from refrag.index.retrieval import RetrievalEncoder
from refrag.index.store import StoreOptions, VectorStore, create_store, open_store
from refrag.integrity import record, verify
from refrag.io import atomic_dir, write_json_atomic
from refrag.modeling import RefragModel
from refrag.refine import RefineOptions, compressor_fingerprint, refine_encodings

MANIFEST = INDEX.filename


@dataclass(frozen=True)
class IndexOptions:
    """How an index is built (saved in its manifest; ``add`` reuses the saved values)."""

    passage_tokens: int = 256  # max decoder tokens per passage
    retrieval_encoder: str = DEFAULT_RETRIEVAL_ENCODER  # sentence-transformers model for passage/query vectors
    store: StoreOptions = field(default_factory=StoreOptions)
    shard_passages: int = 8192  # passages per chunk-store shard
    batch_passages: int = 128  # passages encoded together
    refine: RefineOptions | None = None  # refine each passage's chunk encodings (refrag.refine); None: as encoded

    def __post_init__(self) -> None:
        if self.shard_passages <= 0 or self.batch_passages <= 0:
            raise InputError("shard_passages and batch_passages must be positive.")


@dataclass(frozen=True)
class BuildStats:
    """What one build or add wrote, and how long its parts took."""

    passages: int
    chunks: int
    total_s: float  # wall time of the whole build/add
    chunk_encode_s: float  # chunk encoder (RefragModel.encode_chunks)
    retrieval_encode_s: float  # retrieval encoder (sentence-transformers)
    skipped_duplicates: int = 0  # passages already in the index (same source file and text), not added again
    removed: int = 0  # passages taken out (``remove`` / ``update``)
    refine_s: float = 0.0  # refining the chunk encodings (IndexOptions.refine)

    @property
    def passages_per_s(self) -> float:
        return self.passages / max(self.total_s, 1e-9)

    @property
    def chunks_per_s(self) -> float:
        """Chunk-encoding throughput (chunks per second of chunk-encoder time)."""
        return self.chunks / max(self.chunk_encode_s, 1e-9)


@dataclass(frozen=True)
class SearchHit:
    id: int  # global passage number
    score: float  # cosine similarity of query and passage
    meta: PassageMeta


class Index:
    """A retrieval index whose passages carry their precomputed chunk encodings.

    Build with :meth:`build`, reopen with :meth:`open`, extend with :meth:`add`, query with :meth:`search`.
    """

    def __init__(self, path: Path, manifest: IndexManifest) -> None:
        self.path = path
        self._retriever: RetrievalEncoder | None = None
        self.stats: BuildStats | None = None  # set by build / add
        self._load(manifest)

    def _load(self, manifest: IndexManifest) -> None:
        """(Re)read shards and vector store as ``manifest`` describes them."""
        self.manifest = manifest
        path = self.path
        self.options = IndexOptions(
            passage_tokens=manifest.passage_tokens,
            retrieval_encoder=manifest.retrieval.encoder,
            store=StoreOptions(**manifest.retrieval.store),
            refine=_refine_options(manifest, path),
        )
        self.shards = [ShardReader(path, entry, manifest.model.k, manifest.chunk_dim) for entry in manifest.shards]
        self._starts = list(np.cumsum([0] + [len(s) for s in self.shards]))  # global id of each shard's row 0
        verify(path, manifest.store_files, checksums=False, remedy=REBUILD)
        self.store: VectorStore = open_store(path, self.options.store, manifest.retrieval.dim)
        if len(self.store) != len(self):
            raise CheckpointError(f"{path}: {len(self.store)} retrieval vectors for {len(self)} passages; rebuild.")

    # ---------------------------------------------------------------- build, open, add
    @classmethod
    def build(
        cls,
        paths: Sequence[str | Path] | str | Path,
        out: str | Path,
        model: RefragModel,
        options: IndexOptions = IndexOptions(),
        *,
        retriever: RetrievalEncoder | None = None,
        progress: bool = True,
    ) -> Index:
        """Index every passage of ``paths`` into the folder ``out`` (replaced atomically when it exists)."""
        out = Path(out)
        retriever = retriever or RetrievalEncoder(options.retrieval_encoder, dtype=model.config.dtype)  # bf16 is
        # 7x slower than fp32 on CPUs without AVX512-BF16 / AMX: the passages are encoded as the model runs
        manifest = IndexManifest(
            passage_tokens=options.passage_tokens,
            decoder=model.config.decoder,
            model=EncoderKey.of(model),
            chunk_dim=model.encoder.hidden_size,
            retrieval=RetrievalInfo(options.retrieval_encoder, retriever.dim, options.store.to_json()),
            decoder_adapter=model.config.decoder_adapter,
            refine=options.refine.to_json() if options.refine else None,
            refined_for=compressor_fingerprint(model) if options.refine else None,
        )
        store = create_store(options.store, retriever.dim)
        with atomic_dir(out, replaces=(MANIFEST, "refrag index")) as tmp:
            stats = _ingest(tmp, paths, model, retriever, store, manifest, options, progress, seen=set())
            _save_store(store, tmp, manifest)
            manifest.builds.append(asdict(stats))
            write_json_atomic(tmp / MANIFEST, manifest.to_json())
        index = cls.open(out)
        index._retriever, index.stats = retriever, stats
        return index

    @classmethod
    def open(cls, path: str | Path) -> Index:
        """Open an index folder written by :meth:`build` / :meth:`add`."""
        path = Path(path)
        return cls(path, IndexManifest.read(path))

    def add(
        self,
        paths: Sequence[str | Path] | str | Path,
        model: RefragModel,
        *,
        batch_passages: int = 128,
        progress: bool = True,
    ) -> BuildStats:
        """Append the passages of ``paths`` that are not in the index yet (same source file and text: skipped,
        counted in ``skipped_duplicates``). Existing shards are kept (hard-linked); the swap is atomic."""
        return self._rewrite(np.zeros(len(self), dtype=bool), paths, model, batch_passages, progress)

    def remove(self, sources: Sequence[str | Path] | str | Path, *, progress: bool = True) -> BuildStats:
        """Take out every passage that came from ``sources`` (files, or folders: every file under them);
        passages after them are renumbered. Nothing is re-encoded; the swap is atomic."""
        drop = self._rows_from(sources)
        if not drop.any():
            raise InputError(f"no passage of {self.path} comes from {_names(sources)}: nothing to remove "
                             f"(its sources include {', '.join(sorted(set(self._sources()))[:5])}).")
        if drop.all():
            raise InputError(f"every passage of {self.path} comes from {_names(sources)}: removing them would leave "
                             "an empty index. Delete the folder instead, or build a new index.")
        return self._rewrite(drop, None, None, 128, progress)

    def update(
        self,
        sources: Sequence[str | Path] | str | Path,
        model: RefragModel,
        *,
        batch_passages: int = 128,
        progress: bool = True,
    ) -> BuildStats:
        """Re-index ``sources`` as they are now: their old passages out, their current text in, one atomic swap
        (a file new to the index is simply added)."""
        return self._rewrite(self._rows_from(sources), sources, model, batch_passages, progress)

    def _rewrite(self, drop: np.ndarray, paths, model: RefragModel | None, batch_passages: int,
                 progress: bool) -> BuildStats:
        """The index without the passages where ``drop`` [len(self)] bool is True, plus the new passages of
        ``paths`` (encoded with ``model``), swapped in atomically: untouched shards are hard-linked, a shard
        that loses rows is rewritten from its stored rows. If anything fails, ``self`` is intact."""
        if model is not None:
            self.check_model(model)
        t0 = time.perf_counter()
        manifest = replace(self.manifest, shards=[], builds=list(self.manifest.builds))
        options = replace(self.options, batch_passages=batch_passages)
        with atomic_dir(self.path) as tmp:
            for shard, start in zip(self.shards, self._starts):
                keep = ~drop[start : start + len(shard)]
                if keep.all():
                    for name in shard.entry.file_names:
                        _link_or_copy(self.path / name, tmp / name)
                    manifest.shards.append(shard.entry)
                elif keep.any():
                    manifest.shards.append(shard.subset(keep, tmp))
            store = open_store(self.path, self.options.store, manifest.retrieval.dim)
            if drop.any():
                store = store.subset(~drop)
            elif (self.path / "lance").is_dir():
                shutil.copytree(self.path / "lance", tmp / "lance")
            seen = {int(i) for shard, start in zip(self.shards, self._starts)
                    for i in shard.content_ids()[~drop[start : start + len(shard)]]}
            if model is not None:
                self.load_retriever(model.config.dtype)  # the new passages are encoded in the model's dtype
            stats = (_ingest(tmp, paths, model, self.retriever, store, manifest, options, progress, seen=seen,
                             may_be_empty=bool(drop.any()))
                     if paths is not None and model is not None else BuildStats(0, 0, 0.0, 0.0, 0.0))
            stats = replace(stats, total_s=time.perf_counter() - t0, removed=int(drop.sum()))
            _save_store(store, tmp, manifest)
            manifest.builds.append(asdict(stats))
            write_json_atomic(tmp / MANIFEST, manifest.to_json())
        self._load(manifest)  # the swapped-in folder
        self.stats = stats
        return stats

    def _sources(self) -> list[str]:
        """[len(self)] the absolute source path of every passage, in id order."""
        return [shard.meta(row).resolved for shard in self.shards for row in range(len(shard))]

    def _rows_from(self, sources: Sequence[str | Path] | str | Path) -> np.ndarray:
        """[len(self)] bool: the passages whose source is one of ``sources`` or lies under one of them (paths
        compared resolved, so ./a.txt and /abs/a.txt are the same file)."""
        wanted = [os.path.realpath(s) for s in ([sources] if isinstance(sources, (str, Path)) else sources)]
        if not wanted:
            raise InputError("give at least one source file or folder.")

        def matches(real: str) -> bool:
            return any(real == w or real.startswith(w.rstrip(os.sep) + os.sep) for w in wanted)

        return np.array([matches(s) for s in self._sources()], dtype=bool)

    # ---------------------------------------------------------------- queries
    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def retriever(self) -> RetrievalEncoder:
        if self._retriever is None:
            self.use_retriever(RetrievalEncoder(self.options.retrieval_encoder))
        assert self._retriever is not None
        return self._retriever

    def load_retriever(self, dtype: str) -> RetrievalEncoder:
        """The retrieval encoder, loaded in ``dtype`` unless it is loaded already (bf16 is 7x slower than fp32
        on CPUs without AVX512-BF16 / AMX: ``refrag.precision``)."""
        if self._retriever is None:
            self.use_retriever(RetrievalEncoder(self.options.retrieval_encoder, dtype=dtype))
        return self.retriever

    def use_retriever(self, retriever: RetrievalEncoder) -> None:
        """The retrieval encoder for queries and new passages (e.g. in another dtype); it must give the index's
        vectors."""
        if retriever.dim != self.manifest.retrieval.dim:
            raise CheckpointError(f"{self.path}: retrieval encoder {self.options.retrieval_encoder} gives "
                                  f"{retriever.dim}-d vectors, the index holds {self.manifest.retrieval.dim}-d; "
                                  "rebuild the index.")
        self._retriever = retriever

    def search(self, query: str, top_k: int = 5) -> list[SearchHit]:
        """The ``top_k`` passages most similar to ``query`` (fewer when the index is smaller), best first."""
        return self.search_many([query], top_k)[0]

    def search_many(self, queries: Sequence[str], top_k: int = 5) -> list[list[SearchHit]]:
        """``search`` for several queries: one encoder call and one vector search for all of them."""
        for query in queries:
            if not isinstance(query, str) or not query.strip():
                raise InputError("the query is empty: give a question or some keywords.")
        check_top_k(top_k)
        scores, ids = self.store.search(self.retriever.encode_queries(list(queries)), min(top_k, len(self)))
        return [[SearchHit(int(i), float(s), self.meta(int(i))) for s, i in zip(row_s, row_i) if i >= 0]
                for row_s, row_i in zip(scores, ids)]

    def _locate(self, passage_id: int) -> tuple[ShardReader, int]:
        if not 0 <= passage_id < len(self):
            raise InputError(f"passage id {passage_id} is out of range (the index has {len(self)} passages).")
        s = bisect.bisect_right(self._starts, passage_id) - 1
        return self.shards[s], passage_id - int(self._starts[s])

    def meta(self, passage_id: int) -> PassageMeta:
        shard, row = self._locate(passage_id)
        return shard.meta(row)

    def passage(self, passage_id: int, tokenizer) -> Passage:
        """The stored passage, chunked exactly as at build time (decoder tokenizer must match the index)."""
        shard, row = self._locate(passage_id)
        return make_passage(shard.token_ids(row), tokenizer, self.k, text=shard.meta(row).text)

    def encoded(self, passage_id: int) -> torch.Tensor:
        """[L, E] stored chunk encoder outputs of a passage (bf16, memory-mapped)."""
        shard, row = self._locate(passage_id)
        return shard.encoded(row)

    @property
    def k(self) -> int:
        return self.manifest.model.k

    def check_model(self, model: RefragModel) -> None:
        """CheckpointError unless ``model`` has the chunk encoder, k and tokenizer this index was built with (and,
        for refined encodings, the same projector and decoder adapter: they were refined for that reader)."""
        diff = self.manifest.model.differences(EncoderKey.of(model))
        if diff:
            raise CheckpointError(
                f"{self.path} was built for another chunk encoder / k / tokenizer ({'; '.join(diff)}). "
                "Load the model the index was built with, or rebuild the index with this model "
                "(`refrag index build ... --model ...`)."
            )
        mine = self.manifest.refined_for
        if mine is not None and mine != (theirs := compressor_fingerprint(model)):
            raise CheckpointError(
                f"{self.path} holds chunk encodings refined for another compressor (decoder, projector or decoder "
                f"adapter; index {mine[:12]} vs model {theirs[:12]}). Load the checkpoint the index was built with, "
                "or rebuild it with this one."
            )


def _refine_options(manifest: IndexManifest, path: Path) -> RefineOptions | None:
    """The manifest's refinement options (None: unrefined); a damaged entry is a CheckpointError."""
    if manifest.refine is None:
        return None
    try:
        return RefineOptions(**manifest.refine)
    except (TypeError, InputError) as e:
        raise CheckpointError(f"{path}/{MANIFEST}: its refine entry {manifest.refine!r} is not valid ({e}). "
                              f"{REBUILD}") from e


def _names(sources: Sequence[str | Path] | str | Path) -> str:
    return ", ".join(map(str, [sources] if isinstance(sources, (str, Path)) else sources))


def _next_shard_name(manifest: IndexManifest) -> str:
    """One past the highest shard number (names stay unique when ``remove`` dropped shards in the middle)."""
    return f"shard-{1 + max((int(e.name.rsplit('-', 1)[1]) for e in manifest.shards), default=-1):05d}"


def _save_store(store: VectorStore, folder: Path, manifest: IndexManifest) -> None:
    """Write the vector store and record its files in the manifest."""
    store.save(folder)
    manifest.store_files = record(folder, store.FILES)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _ingest(
    folder: Path,
    paths,
    model: RefragModel,
    retriever: RetrievalEncoder,
    store: VectorStore,
    manifest: IndexManifest,
    options: IndexOptions,
    progress: bool,
    *,
    seen: set[int],
    may_be_empty: bool = False,
) -> BuildStats:
    """Split, encode and write the passages of ``paths`` into ``folder``; appends shards to ``manifest``.
    A passage whose :func:`content_id` is in ``seen`` (already indexed, or earlier in this input) is skipped.
    ``may_be_empty``: no text is not an error (``update`` of a file that was emptied)."""
    t0 = time.perf_counter()
    chunking = ChunkingOptions(k=model.k, passage_tokens=options.passage_tokens)
    timers = {"chunk": 0.0, "retrieval": 0.0, "refine": 0.0}
    counts = {"passages": 0, "chunks": 0, "skipped": 0}
    writer = ShardWriter()
    batch: list[tuple[PassageMeta, Passage, int]] = []

    def flush_batch() -> None:
        nonlocal writer
        t = time.perf_counter()
        encoded = model.encode_chunks([c for _, p, _ in batch for c in p.chunks])  # [sum L, E]
        timers["chunk"] += time.perf_counter() - t
        if options.refine is not None:
            t = time.perf_counter()
            encoded = refine_encodings(model, [p.chunks for _, p, _ in batch], encoded, options.refine)
            timers["refine"] += time.perf_counter() - t
        t = time.perf_counter()
        store.add(retriever.encode([m.text for m, _, _ in batch]))  # [B, dim]
        timers["retrieval"] += time.perf_counter() - t
        start = 0
        for meta, p, identity in batch:
            writer.append(meta, p.token_ids, encoded[start : start + len(p.chunks)], identity)
            start += len(p.chunks)
        counts["passages"] += len(batch)
        counts["chunks"] += start
        bar.update(len(batch))
        batch.clear()
        if len(writer) >= options.shard_passages:
            flush_shard()

    def flush_shard() -> None:
        nonlocal writer
        manifest.shards.append(writer.write(folder, _next_shard_name(manifest)))
        writer = ShardWriter()

    with torch.inference_mode(), tqdm(desc="indexing", unit="passage", disable=not progress) as bar:
        for doc in iter_documents(paths):
            cursor = 0
            for p in split_passages(doc.text, model.tokenizer, chunking):
                found = doc.text.find(p.text[:40], cursor)
                cursor = found if found >= 0 else cursor
                path = os.path.realpath(doc.source)
                identity = content_id(path, p.text)
                if identity in seen:
                    counts["skipped"] += 1
                    continue
                seen.add(identity)
                batch.append((PassageMeta(p.text, doc.source, doc.line, cursor, doc.title, path), p, identity))
                if len(batch) >= options.batch_passages:
                    flush_batch()
        if batch:
            flush_batch()
        if len(writer):
            flush_shard()
    if counts["passages"] == 0 and not counts["skipped"] and not may_be_empty:
        raise InputError(f"no text found in {paths}: the corpus is empty.")
    return BuildStats(counts["passages"], counts["chunks"], time.perf_counter() - t0,
                      timers["chunk"], timers["retrieval"], counts["skipped"], refine_s=timers["refine"])
