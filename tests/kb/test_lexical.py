"""BM25 index: build, batched search, persistence, corrupt files."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbrouter.errors import IndexError_
from kbrouter.kb.lexical import BM25Index

DOCS = [
    "Paris is the capital of France",
    "Berlin is the capital of Germany",
    "The Nile flows through Egypt",
]


def test_batched_search_ranks_matching_documents_first():
    idx = BM25Index().build(DOCS)
    res = idx.search(["capital of Germany", "Nile Egypt", "the of is", ""], k=2)
    assert res[0][0][0] == 1
    assert [row for row, _ in res[1]] == [2]  # zero-score rows are dropped
    assert res[2] == [] and res[3] == []  # only stop words / empty
    assert all(s > 0 for row in res for _, s in row)


def test_k_larger_than_corpus_is_clamped():
    idx = BM25Index().build(DOCS)
    assert len(idx.search(["capital"], k=50)[0]) == 2


def test_save_and_load_round_trip(tmp_path: Path):
    idx = BM25Index().build(DOCS)
    idx.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25")
    assert len(loaded) == 3
    assert loaded.search(["Paris"], k=1) == idx.search(["Paris"], k=1)


def test_missing_or_corrupt_index_is_a_clear_error(tmp_path: Path):
    with pytest.raises(IndexError_, match="missing or corrupt"):
        BM25Index.load(tmp_path / "nope")
    BM25Index().build(DOCS).save(tmp_path / "bm25")
    (tmp_path / "bm25" / "kbrouter_bm25.json").write_text("{not json")
    with pytest.raises(IndexError_, match="kbrouter index --force"):
        BM25Index.load(tmp_path / "bm25")


def test_empty_corpus_is_rejected():
    with pytest.raises(ValueError):
        BM25Index().build([])
