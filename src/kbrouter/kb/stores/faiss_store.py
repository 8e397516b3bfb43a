"""FAISS vector store: exact flat inner product, HNSW graph, or IVF-PQ compressed lists.

Vectors are L2-normalised float32, so inner product equals cosine similarity. Ids are row
numbers (0..n-1) in insertion order.

* ``flat``: ``IndexFlatIP``, exact, the default (what the paper uses).
* ``hnsw``: ``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT``; ``hnsw_m`` neighbours per node,
  ``hnsw_ef_search`` search breadth. Vectors are inserted as they are added.
* ``ivfpq``: ``IndexIVFPQ`` (8-bit codes, ``pq_m`` sub-quantizers that must divide the
  dimension). It needs training, so vectors are buffered until the first search or save and
  then trained on everything added so far; vectors added later are encoded with that
  training. ``ivf_nlist`` defaults to about ``4*sqrt(n)``,
  capped so that every list has at least 39 training points (FAISS's own minimum); with fewer
  than 256 vectors (one 8-bit PQ codebook) the store stays exact (flat) and says so in the log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from kbrouter.config import StoreConfig
from kbrouter.errors import IndexError_
from kbrouter.kb.stores.base import VectorStore

logger = logging.getLogger(__name__)

INDEX_FILE = "faiss.index"
META_FILE = "faiss.json"
MIN_POINTS_PER_CENTROID = 39
"""FAISS warns below 39 training points per centroid; we never train with fewer."""
PQ_NBITS = 8
PQ_MIN_TRAIN = 1 << PQ_NBITS
"""An 8-bit PQ codebook has 256 centroids per sub-quantizer: fewer training points cannot work."""


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the install
        raise IndexError_("the FAISS store needs faiss-cpu (pip install 'kbrouter[local]')") from e
    return faiss


def configure_faiss_threads(n: int | None = None) -> int:
    """Set FAISS's OpenMP thread count (default: env ``KBROUTER_FAISS_THREADS`` or all cores).

    Returns the number set. FAISS's default can oversubscribe a machine where torch also runs.
    """
    faiss = _faiss()
    if n is None:
        env = os.environ.get("KBROUTER_FAISS_THREADS")
        n = int(env) if env and env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)
    faiss.omp_set_num_threads(int(n))
    return int(n)


def default_nlist(n: int) -> int:
    """IVF list count: about ``4*sqrt(n)``, at most ``n // 39`` so training is well posed."""
    if n <= 0:
        return 1
    return max(1, min(int(round(4 * math.sqrt(n))), n // MIN_POINTS_PER_CENTROID))


class FaissStore(VectorStore):
    """A FAISS index configured by a :class:`~kbrouter.config.StoreConfig`.

    Thread-safe: searches and adds are serialised by a lock (FAISS parallelises each call
    internally with OpenMP, so concurrent calls would only compete for the same cores).
    """

    def __init__(self, cfg: StoreConfig, dim: int) -> None:
        if dim <= 0:
            raise IndexError_(f"vector dimension must be positive, got {dim}")
        if cfg.backend != "faiss":
            raise IndexError_(f"FaissStore got a store config for backend {cfg.backend!r}")
        if cfg.index == "ivfpq" and dim % cfg.pq_m != 0:
            raise IndexError_(
                f"pq_m={cfg.pq_m} must divide the vector dimension {dim} "
                f"(divisors near it: {_divisors_near(dim, cfg.pq_m)})"
            )
        self.cfg = cfg
        self.dim = int(dim)
        self._lock = threading.RLock()
        self._faiss = _faiss()
        if os.environ.get("KBROUTER_FAISS_THREADS"):
            configure_faiss_threads()
        self._pending: list[np.ndarray] = []  # ivfpq: vectors waiting for training
        self._trained_kind: str | None = None  # ivfpq: "ivfpq" or "flat" once built
        self._index: Any = self._new_index()

    # --- construction ---------------------------------------------------------------------
    def _new_index(self) -> Any:
        faiss = self._faiss
        if self.cfg.index == "flat":
            return faiss.IndexFlatIP(self.dim)
        if self.cfg.index == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.cfg.hnsw_ef_search
            index.hnsw.efConstruction = max(40, 2 * self.cfg.hnsw_m)
            return index
        return None  # ivfpq: built at first search/save, once all vectors are known

    def _build_ivfpq(self) -> None:
        """Train IVF-PQ on all buffered vectors (or fall back to flat when too few)."""
        faiss = self._faiss
        data = (
            np.concatenate(self._pending)
            if self._pending
            else np.zeros((0, self.dim), dtype=np.float32)
        )
        n = len(data)
        nlist = self.cfg.ivf_nlist or default_nlist(n)
        if self.cfg.ivf_nlist and n < self.cfg.ivf_nlist * MIN_POINTS_PER_CENTROID:
            nlist = default_nlist(n)
            logger.warning(
                "ivf_nlist=%d needs >= %d training vectors, have %d; using nlist=%d",
                self.cfg.ivf_nlist,
                self.cfg.ivf_nlist * MIN_POINTS_PER_CENTROID,
                n,
                nlist,
            )
        if n < PQ_MIN_TRAIN:
            if n:
                logger.info(
                    "only %d vectors: IVF-PQ needs >= %d, using exact flat", n, PQ_MIN_TRAIN
                )
            index = faiss.IndexFlatIP(self.dim)
            self._trained_kind = "flat"
        else:
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFPQ(
                quantizer, self.dim, nlist, self.cfg.pq_m, PQ_NBITS, faiss.METRIC_INNER_PRODUCT
            )
            index.cp.min_points_per_centroid = 1  # nlist is already capped
            index.pq.cp.min_points_per_centroid = 1  # small KBs: accept a coarser codebook
            index.train(data)
            index.nprobe = min(self.cfg.ivf_nprobe, nlist)
            self._trained_kind = "ivfpq"
        if n:
            index.add(data)
        self._index = index
        self._pending = []

    def _ensure_built(self) -> None:
        if self.cfg.index == "ivfpq" and self._index is None and self._pending:
            self._build_ivfpq()

    # --- VectorStore ----------------------------------------------------------------------
    def add(self, vectors: np.ndarray) -> None:
        vecs = self._check(vectors, "add")
        if len(vecs) == 0:
            return
        with self._lock:
            if self._index is None:  # ivfpq before training
                self._pending.append(vecs)
            else:
                self._index.add(vecs)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        q = self._check(queries, "search")
        nq = len(q)
        with self._lock:
            self._ensure_built()
            ntotal = 0 if self._index is None else self._index.ntotal
            if nq == 0 or ntotal == 0:
                return (
                    np.full((nq, k), -np.inf, dtype=np.float32),
                    np.full((nq, k), -1, dtype=np.int64),
                )
            scores, ids = self._index.search(q, k)
        scores = np.asarray(scores, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        scores[ids < 0] = -np.inf
        return scores, ids

    def __len__(self) -> int:
        with self._lock:
            pending = sum(len(p) for p in self._pending)
            return pending + (0 if self._index is None else int(self._index.ntotal))

    @property
    def kind(self) -> str:
        """The index actually in use: flat, hnsw, ivfpq, or flat for a too-small ivfpq store."""
        with self._lock:
            if self.cfg.index != "ivfpq":
                return self.cfg.index
            self._ensure_built()
            return self._trained_kind or "flat"

    # --- persistence ----------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._ensure_built()
            if self._index is None:  # empty ivfpq store: nothing to train on
                self._build_ivfpq()
            try:
                self._faiss.write_index(self._index, str(directory / INDEX_FILE))
            except RuntimeError as e:
                raise IndexError_(f"cannot write FAISS index to {directory}: {e}") from e
            meta = {
                "backend": "faiss",
                "index": self.cfg.index,
                "kind": self._trained_kind or self.cfg.index,
                "dim": self.dim,
                "count": int(self._index.ntotal),
                "faiss_version": getattr(self._faiss, "__version__", "unknown"),
            }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path, cfg: StoreConfig, dim: int | None = None) -> FaissStore:
        """Load a store saved by :meth:`save`; search settings (efSearch, nprobe) come from ``cfg``.

        Raises :class:`~kbrouter.errors.IndexError_` if the files are missing or corrupt, or
        if ``dim`` is given and differs from the saved dimension.
        """
        directory = Path(directory)
        index_path, meta_path = directory / INDEX_FILE, directory / META_FILE
        if not index_path.is_file() or not meta_path.is_file():
            raise IndexError_(f"no FAISS index in {directory} (expected {INDEX_FILE}, {META_FILE})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            saved_dim = int(meta["dim"])
        except (ValueError, KeyError, TypeError) as e:
            raise IndexError_(f"corrupt FAISS metadata {meta_path}: {e}") from e
        if dim is not None and dim != saved_dim:
            raise IndexError_(
                f"FAISS index in {directory} has dimension {saved_dim}, the encoder gives {dim}"
            )
        if meta.get("index") != cfg.index:
            raise IndexError_(
                f"FAISS index in {directory} is of type {meta.get('index')!r}, "
                f"config asks for {cfg.index!r}; rebuild the index"
            )
        faiss = _faiss()
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as e:
            detail = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            raise IndexError_(
                f"corrupt FAISS index {index_path} ({detail}); rebuild with "
                "`kbrouter index --force`"
            ) from e
        if index.d != saved_dim or index.ntotal != int(meta.get("count", index.ntotal)):
            raise IndexError_(
                f"FAISS index {index_path} does not match its metadata "
                f"(d={index.d}, n={index.ntotal} vs {meta_path})"
            )
        store = cls(cfg, saved_dim)
        store._index = index
        if cfg.index == "hnsw":
            index.hnsw.efSearch = cfg.hnsw_ef_search
        elif cfg.index == "ivfpq":
            store._trained_kind = meta.get("kind", "ivfpq")
            if store._trained_kind == "ivfpq":
                index.nprobe = min(cfg.ivf_nprobe, index.nlist)
        return store

    # --- helpers --------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"FaissStore(index={self.cfg.index!r}, dim={self.dim}, n={len(self)})"


def _divisors_near(dim: int, m: int) -> list[int]:
    divs = [d for d in range(1, dim + 1) if dim % d == 0]
    return sorted(divs, key=lambda d: (abs(d - m), d))[:4]
