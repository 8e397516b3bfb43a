"""Lexical BM25 retrieval backed by ``bm25s`` (sparse, fast, persisted as numpy arrays)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kbrouter.errors import IndexError_

logger = logging.getLogger(__name__)

_PARAMS_FILE = "kbrouter_bm25.json"


class BM25Index:
    """A BM25 index over a list of texts; result ids are row numbers into that list.

    Tokenisation: lower-cased ``\\w\\w+`` words with English stop words removed (bm25s'
    tokenizer), no stemming. The same settings are saved with the index and used for queries.

    Args:
        method: the BM25 variant (``"lucene"`` default, as Lucene/Elasticsearch).
        k1, b: the usual BM25 parameters.
    """

    def __init__(self, method: str = "lucene", k1: float = 1.5, b: float = 0.75) -> None:
        self.method = method
        self.k1 = k1
        self.b = b
        self.stopwords = "en"
        self._retriever: Any = None
        self._n = 0

    # ------------------------------------------------------------------ build / persist

    def build(self, texts: Sequence[str]) -> BM25Index:
        """Index ``texts`` (replacing any previous content)."""
        import bm25s

        texts = list(texts)
        if not texts:
            raise ValueError("cannot build a BM25 index over zero texts")
        tokens = bm25s.tokenize(texts, stopwords=self.stopwords, show_progress=False)
        retriever = bm25s.BM25(method=self.method, k1=self.k1, b=self.b)
        retriever.index(tokens, show_progress=False)
        self._retriever = retriever
        self._n = len(texts)
        return self

    def save(self, directory: Path) -> None:
        """Write the index into ``directory`` (created if needed)."""
        import bm25s

        if self._retriever is None:
            raise RuntimeError("BM25 index is empty; call build() first")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._retriever.save(str(directory), show_progress=False)
        params = {
            "method": self.method,
            "k1": self.k1,
            "b": self.b,
            "stopwords": self.stopwords,
            "n": self._n,
            "bm25s_version": getattr(bm25s, "__version__", "unknown"),
        }
        (directory / _PARAMS_FILE).write_text(json.dumps(params, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> BM25Index:
        """Open a saved index; a missing or corrupt one raises :class:`IndexError_`."""
        import bm25s

        directory = Path(directory)
        try:
            params = json.loads((directory / _PARAMS_FILE).read_text(encoding="utf-8"))
            index = cls(method=params["method"], k1=params["k1"], b=params["b"])
            index.stopwords = params["stopwords"]
            index._retriever = bm25s.BM25.load(str(directory), show_progress=False, mmap=False)
            index._n = int(params["n"])
        except Exception as e:  # noqa: BLE001 - any failure means an unusable index
            raise IndexError_(
                f"BM25 index at {directory} is missing or corrupt ({type(e).__name__}: {e}); "
                "rebuild it with `kbrouter index --force`"
            ) from None
        return index

    # ------------------------------------------------------------------ search

    def __len__(self) -> int:
        return self._n

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """Top-``k`` ``(row, score)`` pairs per query, best first; rows with score 0 are dropped.

        A query with no indexable word (empty, only stop words) gets an empty list.
        """
        import bm25s

        if self._retriever is None:
            raise RuntimeError("BM25 index is empty; call build() or load() first")
        queries = list(queries)
        if not queries:
            return []
        k = min(k, self._n)
        toks = bm25s.tokenize(
            queries, stopwords=self.stopwords, show_progress=False, return_ids=False
        )
        out: list[list[tuple[int, float]]] = [[] for _ in queries]
        live = [i for i, t in enumerate(toks) if t]
        if not live or k <= 0:
            return out
        docs, scores = self._retriever.retrieve(
            [toks[i] for i in live], k=k, show_progress=False, n_threads=1
        )
        for qi, drow, srow in zip(live, docs, scores, strict=True):
            out[qi] = [(int(d), float(s)) for d, s in zip(drow, srow, strict=True) if s > 0]
        return out
