"""FAISS store: exact flat search, approximate HNSW / IVF-PQ, persistence and error handling."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from kbrouter.config import StoreConfig
from kbrouter.errors import IndexError_
from kbrouter.kb.stores import create_store, open_store
from kbrouter.kb.stores.faiss_store import FaissStore, default_nlist

DIM = 64


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """4000 unit vectors in 40 clusters, and 50 queries near random members."""
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((40, DIM))
    data = _unit(centres[rng.integers(0, 40, 4000)] + 0.35 * rng.standard_normal((4000, DIM)))
    queries = _unit(data[rng.integers(0, 4000, 50)] + 0.1 * rng.standard_normal((50, DIM)))
    return data, queries


def _exact(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ data.T), axis=1, kind="stable")[:, :k]


def _recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, truth, strict=True)]))


def test_flat_matches_brute_force(clustered: tuple[np.ndarray, np.ndarray]) -> None:
    """Flat search returns the exact neighbours and inner-product scores."""
    data, queries = clustered
    store = FaissStore(StoreConfig(index="flat"), DIM)
    store.add(data[:1500])
    store.add(data[1500:])  # ids continue across add calls
    assert len(store) == 4000
    scores, ids = store.search(queries, 10)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (50, 10)
    truth = _exact(data, queries, 10)
    assert _recall(ids, truth) == 1.0
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ data.T, ids, 1), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


@pytest.mark.parametrize("kind,min_recall", [("hnsw", 0.95), ("ivfpq", 0.6)])
def test_approximate_indexes_have_good_recall(
    clustered: tuple[np.ndarray, np.ndarray], kind: str, min_recall: float
) -> None:
    """HNSW and IVF-PQ find most true top-10 neighbours on clustered data."""
    data, queries = clustered
    cfg = StoreConfig(index=kind, pq_m=16, ivf_nprobe=8)
    store = FaissStore(cfg, DIM)
    store.add(data)
    assert store.kind == kind
    _, ids = store.search(queries, 10)
    assert _recall(ids, _exact(data, queries, 10)) >= min_recall
    assert set(ids.ravel()) <= set(range(len(data)))


def test_ivfpq_small_store_falls_back_to_exact(clustered: tuple[np.ndarray, np.ndarray]) -> None:
    """Too few vectors to train PQ codebooks: the store stays exact and says so via .kind."""
    data, queries = clustered
    store = FaissStore(StoreConfig(index="ivfpq", pq_m=8), DIM)
    store.add(data[:100])
    assert len(store) == 100
    assert store.kind == "flat"
    _, ids = store.search(queries, 5)
    assert _recall(ids, _exact(data[:100], queries, 5)) == 1.0


def test_ivfpq_nlist_is_capped(
    clustered: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    """An ivf_nlist too large for the data is reduced so each list gets >= 39 training points."""
    data, _ = clustered
    assert default_nlist(4000) == min(round(4 * np.sqrt(4000)), 4000 // 39)
    assert default_nlist(0) == 1 and default_nlist(300) == 7
    store = FaissStore(StoreConfig(index="ivfpq", pq_m=8, ivf_nlist=1000), DIM)
    store.add(data)
    with caplog.at_level("WARNING"):
        assert store.kind == "ivfpq"
    assert "ivf_nlist=1000" in caplog.text
    assert store._index.nlist <= len(data) // 39


def test_pq_m_must_divide_dim() -> None:
    """pq_m that does not divide the dimension is refused with the nearest divisors."""
    with pytest.raises(IndexError_, match=r"pq_m=48 must divide the vector dimension 100"):
        FaissStore(StoreConfig(index="ivfpq", pq_m=48), 100)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_round_trip(
    clustered: tuple[np.ndarray, np.ndarray], tmp_path: Path, kind: str
) -> None:
    """A saved store loads back (via the factory) and answers identically."""
    data, queries = clustered
    cfg = StoreConfig(index=kind, pq_m=8)
    store = create_store(cfg, DIM, tmp_path / "build")
    store.add(data)
    before = store.search(queries, 10)
    store.save(tmp_path / "build")
    (tmp_path / "build").rename(tmp_path / "final")
    loaded = open_store(cfg, DIM, tmp_path / "final")
    assert isinstance(loaded, FaissStore) and len(loaded) == len(data)
    after = loaded.search(queries, 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], atol=1e-6)


def test_load_errors(clustered: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    """Missing, corrupt, wrong-dimension and wrong-type indexes raise IndexError_."""
    data, _ = clustered
    with pytest.raises(IndexError_, match="no FAISS index"):
        FaissStore.load(tmp_path / "nothing", StoreConfig())
    store = FaissStore(StoreConfig(), DIM)
    store.add(data[:10])
    store.save(tmp_path / "ok")
    with pytest.raises(IndexError_, match="dimension 64, the encoder gives 384"):
        FaissStore.load(tmp_path / "ok", StoreConfig(), dim=384)
    with pytest.raises(IndexError_, match="'flat', config asks for 'hnsw'"):
        FaissStore.load(tmp_path / "ok", StoreConfig(index="hnsw"))
    (tmp_path / "ok" / "faiss.index").write_bytes(b"garbage")
    with pytest.raises(IndexError_, match="corrupt FAISS index"):
        FaissStore.load(tmp_path / "ok", StoreConfig())


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_empty_store_and_padding(tmp_path: Path, kind: str) -> None:
    """An empty store returns -1 ids; k larger than the store pads with -1 and -inf."""
    cfg = StoreConfig(index=kind, pq_m=8)
    store = FaissStore(cfg, DIM)
    q = _unit(np.ones((2, DIM)))
    scores, ids = store.search(q, 3)
    assert ids.shape == (2, 3) and np.all(ids == -1) and np.all(np.isneginf(scores))
    store.save(tmp_path / "empty")
    assert len(FaissStore.load(tmp_path / "empty", cfg)) == 0
    store = FaissStore(cfg, DIM)
    store.add(_unit(np.random.default_rng(0).standard_normal((3, DIM))))
    scores, ids = store.search(q, 5)
    assert sorted(ids[0, :3]) == [0, 1, 2]
    assert np.all(ids[:, 3:] == -1) and np.all(np.isneginf(scores[:, 3:]))


def test_bad_vectors_are_refused() -> None:
    """Wrong dimension, non-float or non-finite input and k <= 0 are clear errors."""
    store = FaissStore(StoreConfig(), DIM)
    with pytest.raises(IndexError_, match=r"shape \(n, 64\), got \(3, 32\)"):
        store.add(np.zeros((3, 32), dtype=np.float32))
    with pytest.raises(IndexError_, match=r"got \(1, 65\)"):
        store.search(np.zeros((1, 65), dtype=np.float32), 3)
    with pytest.raises(IndexError_, match="dtype int64"):
        store.add(np.zeros((2, DIM), dtype=np.int64))
    with pytest.raises(IndexError_, match="NaN"):
        store.add(np.full((1, DIM), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="k must be positive"):
        store.search(np.zeros((1, DIM), dtype=np.float32), 0)
    with pytest.raises(IndexError_, match="dimension must be positive"):
        FaissStore(StoreConfig(), 0)
    assert len(store) == 0


def test_single_vector_query_is_accepted(clustered: tuple[np.ndarray, np.ndarray]) -> None:
    """A 1-d query vector is treated as one query."""
    data, queries = clustered
    store = FaissStore(StoreConfig(), DIM)
    store.add(data)
    _, ids = store.search(queries[0], 4)
    assert ids.shape == (1, 4)


def test_concurrent_searches_agree(clustered: tuple[np.ndarray, np.ndarray]) -> None:
    """Searches from several threads return the same results as sequential ones."""
    data, queries = clustered
    store = FaissStore(StoreConfig(index="hnsw"), DIM)
    store.add(data)
    expected = [store.search(queries[i : i + 1], 10)[1] for i in range(len(queries))]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for i in range(offset, len(queries), 4):
                results[i] = store.search(queries[i : i + 1], 10)[1]
        except BaseException as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(o,)) for o in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, ids in enumerate(expected):
        np.testing.assert_array_equal(results[i], ids)
