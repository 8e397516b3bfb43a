"""Milvus store on real Milvus Lite: agrees with FAISS flat on real MiniLM vectors, persists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kbrouter.config import StoreConfig
from kbrouter.errors import IndexError_
from kbrouter.kb.stores import create_store, open_store
from kbrouter.kb.stores.faiss_store import FaissStore
from kbrouter.kb.stores.milvus_store import MilvusStore, collection_name, is_server_uri

pytestmark = pytest.mark.integration

MILVUS = StoreConfig(backend="milvus")


@pytest.fixture(scope="module")
def real_vectors(mkqa_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """MiniLM vectors of 300 mkqa-mini passages and of 40 dev questions."""
    from kbrouter.encoders.text import load_text_encoder

    enc = load_text_encoder("minilm")
    passages = []
    with (mkqa_dir / "corpus" / "text.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            passages.append(f"{row['title']}. {row['text']}")
            if len(passages) == 300:
                break
    questions = []
    with (mkqa_dir / "questions" / "dev.jsonl").open(encoding="utf-8") as f:
        for line in f:
            questions.append(json.loads(line)["question"])
            if len(questions) == 40:
                break
    return enc.encode(passages), enc.encode(questions)


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b, strict=True)]))


def test_lite_matches_faiss_flat(
    real_vectors: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Milvus Lite flat search returns the same top-10 and scores as FAISS flat."""
    data, queries = real_vectors
    milvus = create_store(MILVUS, 384, tmp_path / "idx", name="text")
    assert isinstance(milvus, MilvusStore)
    milvus.add(data[:120])
    milvus.add(data[120:])  # ids continue across add calls
    assert len(milvus) == len(data)
    faiss = FaissStore(StoreConfig(), 384)
    faiss.add(data)
    m_scores, m_ids = milvus.search(queries, 10)
    f_scores, f_ids = faiss.search(queries, 10)
    assert m_ids.dtype == np.int64 and m_scores.dtype == np.float32
    assert _overlap(m_ids, f_ids) >= 0.99
    np.testing.assert_allclose(m_scores, f_scores, atol=1e-4)
    milvus.close()


def test_lite_hnsw_agrees_with_flat(
    real_vectors: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """An HNSW collection on Milvus Lite finds (nearly) the exact top-10."""
    data, queries = real_vectors
    store = MilvusStore(StoreConfig(backend="milvus", index="hnsw"), 384, tmp_path, name="t")
    store.add(data)
    _, ids = store.search(queries, 10)
    truth = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    assert _overlap(ids, truth) >= 0.95
    store.close()


def test_save_rename_load_round_trip(
    real_vectors: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """A saved Lite index lives in its folder: rename the folder, load it, same answers."""
    data, queries = real_vectors
    store = create_store(MILVUS, 384, tmp_path / "build", name="My KB!")
    assert store.collection == "kbrouter_My_KB_"
    store.add(data)
    before = store.search(queries, 5)
    store.save(tmp_path / "build")
    meta = json.loads((tmp_path / "build" / "milvus.json").read_text())
    assert meta["count"] == len(data) and meta["uri"] is None and meta["dim"] == 384
    (tmp_path / "build").rename(tmp_path / "final")
    with pytest.raises(IndexError_, match="moved after saving"):
        store.search(queries, 5)
    loaded = open_store(MILVUS, 384, tmp_path / "final")
    assert isinstance(loaded, MilvusStore) and len(loaded) == len(data)
    after = loaded.search(queries, 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], atol=1e-5)
    loaded.add(data[:3])  # a loaded store keeps numbering rows after the saved ones
    assert len(loaded) == len(data) + 3
    _, ids = loaded.search(data[:1], 2)
    assert set(ids[0]) == {0, len(data)}
    loaded.close()


def test_save_into_another_folder_copies_lite_db(
    real_vectors: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Saving to a different folder copies the Lite database there."""
    data, queries = real_vectors
    store = create_store(MILVUS, 384, tmp_path / "a", name="text")
    store.add(data[:50])
    store.save(tmp_path / "b")
    loaded = open_store(MILVUS, 384, tmp_path / "b")
    np.testing.assert_array_equal(loaded.search(queries, 3)[1], store.search(queries, 3)[1])
    loaded.close()
    store.close()


def test_shared_lite_file_keeps_builds_apart(
    real_vectors: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """With an explicit Lite path, each build gets its own collection in the shared database."""
    data, _ = real_vectors
    cfg = StoreConfig(backend="milvus", milvus_uri=str(tmp_path / "shared" / "kbs.db"))
    a = MilvusStore(cfg, 384, tmp_path / "a", name="text")
    b = MilvusStore(cfg, 384, tmp_path / "b", name="text")
    assert a.collection != b.collection and a.collection.startswith("kbrouter_text_")
    a.add(data[:10])
    b.add(data[:20])
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    assert len(open_store(cfg, 384, tmp_path / "a")) == 10
    assert len(open_store(cfg, 384, tmp_path / "b")) == 20
    b.drop()
    with pytest.raises(IndexError_, match="not found"):
        open_store(cfg, 384, tmp_path / "b")


def test_empty_store_and_padding(tmp_path: Path) -> None:
    """An empty collection returns -1 ids; k larger than the store pads with -1 and -inf."""
    store = MilvusStore(MILVUS, 8, tmp_path, name="empty")
    q = np.eye(8, dtype=np.float32)[:2]
    scores, ids = store.search(q, 4)
    assert ids.shape == (2, 4) and np.all(ids == -1) and np.all(np.isneginf(scores))
    store.add(np.eye(8, dtype=np.float32)[:3])
    scores, ids = store.search(q, 4)
    assert ids[0, 0] == 0 and ids[1, 0] == 1
    assert np.all(ids[:, 3:] == -1) and np.all(np.isneginf(scores[:, 3:]))
    store.save(tmp_path)
    assert len(open_store(MILVUS, 8, tmp_path)) == 3


def test_dimension_mismatches_and_bad_pointers(tmp_path: Path) -> None:
    """Wrong-dimension vectors, a wrong expected dimension and missing files are IndexError_."""
    store = MilvusStore(MILVUS, 8, tmp_path / "idx", name="d")
    with pytest.raises(IndexError_, match=r"shape \(n, 8\), got \(2, 4\)"):
        store.add(np.ones((2, 4), dtype=np.float32))
    with pytest.raises(IndexError_, match=r"got \(1, 9\)"):
        store.search(np.ones((1, 9), dtype=np.float32), 1)
    store.add(np.eye(8, dtype=np.float32))
    store.save(tmp_path / "idx")
    with pytest.raises(IndexError_, match="dimension 8, the encoder gives 384"):
        open_store(MILVUS, 384, tmp_path / "idx")
    with pytest.raises(IndexError_, match="'flat', config asks for 'hnsw'"):
        open_store(StoreConfig(backend="milvus", index="hnsw"), 8, tmp_path / "idx")
    with pytest.raises(IndexError_, match="no Milvus index"):
        open_store(MILVUS, 8, tmp_path / "nothing")
    (tmp_path / "idx" / "milvus.json").write_text("{not json")
    with pytest.raises(IndexError_, match="corrupt Milvus pointer"):
        open_store(MILVUS, 8, tmp_path / "idx")
    with pytest.raises(IndexError_, match="pq_m=48 must divide"):
        MilvusStore(StoreConfig(backend="milvus", index="ivfpq"), 100, tmp_path / "x")


def test_unreachable_server_is_an_index_error(tmp_path: Path) -> None:
    """A server URI nobody listens on fails fast with IndexError_ naming the URI."""
    cfg = StoreConfig(backend="milvus", milvus_uri="http://127.0.0.1:9")
    with pytest.raises(IndexError_, match="127.0.0.1:9"):
        MilvusStore(cfg, 8, tmp_path, name="x")


def test_naming_helpers() -> None:
    """Collection names are valid Milvus identifiers; server URIs are told from Lite paths."""
    assert collection_name("Text Retriever") == "kbrouter_Text_Retriever"
    assert collection_name("") == "kbrouter_kb"
    assert is_server_uri("http://milvus:19530") and is_server_uri("https://x.cloud")
    assert not is_server_uri("/data/kb.db") and not is_server_uri(None)


def test_a_rebuild_drops_the_collection_it_replaced_in_a_shared_database(tmp_path: Path) -> None:
    """Shared databases give every build its own collection; after a rebuild the build just
    replaced is kept (a running process may still serve it) and the one before is dropped, so
    at most two builds of a KB stay."""
    from kb_helpers import fake_loaders, tiny_config
    from pymilvus import MilvusClient

    from kbrouter.kb.registry import KBRegistry

    shared = tmp_path / "shared" / "kbs.db"
    store = {"retrieval": {"store": {"backend": "milvus", "milvus_uri": str(shared)}}}
    reg = KBRegistry(tiny_config(tmp_path, text=store), **fake_loaders())

    def collection() -> str:
        meta = tmp_path / "index" / "text" / "store" / "milvus.json"
        return json.loads(meta.read_text())["collection"]

    built = []
    for force in (False, True, True):
        reg.build(["text"], force=force, progress=False)
        built.append(collection())
        reg.close()
    assert len(set(built)) == 3
    assert reg.search("text", ["capital of France"], k=1)[0]
    reg.close()
    client = MilvusClient(uri=str(shared))
    try:
        assert [client.has_collection(c) for c in built] == [False, True, True]
    finally:
        client.close()
