"""Vector stores behind the VectorStore protocol: FAISS (flat / HNSW / IVF-PQ) and LanceDB."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from index_helpers import corpus, options, retrieval_spec, rmodel  # noqa: F401

from refrag.errors import CheckpointError, InputError
from refrag.index import FaissStore, Index, IndexOptions, LanceStore, StoreOptions

needs_lancedb = pytest.mark.skipif(
    importlib.util.find_spec("lancedb") is None, reason="lancedb not installed (pip install 'refrag[lancedb]')"
)


def unit_vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_faiss_finds_each_vector_and_survives_save(kind, tmp_path):
    opts = StoreOptions(kind=kind, ivf_lists=4, ivf_probe=4, pq_m=8)
    vectors = unit_vectors(400)
    store = FaissStore(16, opts)
    store.add(vectors[:200])
    store.add(vectors[200:])
    store.save(tmp_path)
    reopened = FaissStore.open(tmp_path, 16, opts)
    assert len(reopened) == 400
    scores, ids = reopened.search(vectors[::40], 3)
    assert ids.shape == scores.shape == (10, 3)
    assert (ids[:, 0] == np.arange(0, 400, 40)).mean() >= (1.0 if kind == "flat" else 0.8)
    assert np.all(np.diff(scores, axis=1) <= 1e-5)  # best first


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_a_subset_keeps_the_chosen_vectors_renumbered(kind, tmp_path):
    opts = StoreOptions(kind=kind, ivf_lists=4, ivf_probe=4, pq_m=8)
    vectors = unit_vectors(400)
    store = FaissStore(16, opts)
    store.add(vectors)
    keep = np.arange(400) % 3 != 0
    subset = store.subset(keep)
    assert len(subset) == keep.sum() and len(store) == 400  # the original is left as it was
    _, ids = subset.search(vectors[keep][::25], 1)
    assert (ids[:, 0] == np.arange(0, keep.sum(), 25)).mean() >= (1.0 if kind == "flat" else 0.8)
    subset.save(tmp_path)
    assert len(FaissStore.open(tmp_path, 16, opts)) == keep.sum()


def test_faiss_boundary_errors(tmp_path):
    with pytest.raises(InputError, match=r"\[N, 16\]"):
        FaissStore(16, StoreOptions()).add(np.zeros((3, 8), np.float32))
    ivfpq = FaissStore(16, StoreOptions(kind="ivfpq", ivf_lists=64, pq_m=8))
    ivfpq.add(unit_vectors(10))  # held back until there are enough vectors to train on
    with pytest.raises(InputError, match="IVF-PQ.*trains on"):
        ivfpq.save(tmp_path)
    with pytest.raises(CheckpointError, match="missing"):
        FaissStore.open(tmp_path, 16, StoreOptions())
    with pytest.raises(InputError, match="backend"):
        StoreOptions(backend="qdrant")  # type: ignore[arg-type]


@needs_lancedb
def test_lance_store_roundtrip(tmp_path):
    vectors = unit_vectors(50)
    store = LanceStore(16)
    store.add(vectors[:30])
    store.save(tmp_path)
    store.add(vectors[30:])  # appended to the same table on the next save
    store.save(tmp_path)
    reopened = LanceStore.open(tmp_path, 16)
    assert len(reopened) == 50
    scores, ids = reopened.search(vectors[[0, 31, 49]], 2)
    assert ids[:, 0].tolist() == [0, 31, 49]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)  # inner product of unit vectors


@needs_lancedb
def test_index_on_lancedb_build_add_search(corpus, tmp_path, rmodel, options):
    lance = IndexOptions(options.passage_tokens, options.retrieval_encoder, StoreOptions(backend="lancedb"),
                         options.shard_passages, options.batch_passages)
    index = Index.build(corpus, tmp_path / "idx", rmodel, lance, progress=False)
    assert (tmp_path / "idx" / "lance").is_dir() and not (tmp_path / "idx" / "vectors.faiss").exists()
    n = len(index)
    extra = tmp_path / "extra.txt"
    extra.write_text("Question answer context passage chunk token vector.", "utf-8")
    index.add([extra], rmodel, progress=False)
    reopened = Index.open(tmp_path / "idx")
    assert len(reopened) > n
    for pid in (0, n):
        assert reopened.search(reopened.meta(pid).text, 2)[0].id == pid


@needs_lancedb
def test_lance_subset(tmp_path):
    vectors = unit_vectors(20)
    store = LanceStore(16)
    store.add(vectors)
    store.save(tmp_path / "a")
    subset = LanceStore.open(tmp_path / "a", 16).subset(np.arange(20) >= 5)
    subset.save(tmp_path / "b")
    _, ids = LanceStore.open(tmp_path / "b", 16).search(vectors[[5, 19]], 1)
    assert ids[:, 0].tolist() == [0, 14]
