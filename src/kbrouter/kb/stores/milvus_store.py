"""Milvus vector store: embedded Milvus Lite (a local folder) or a Milvus server/cluster.

Where the vectors live is decided by :attr:`StoreConfig.milvus_uri`:

* unset (default): Milvus Lite, its database at ``<index dir>/milvus.db``, so the KB's index
  folder is self-contained and can be renamed or copied as a whole;
* a local path (e.g. ``/data/kb.db``): Milvus Lite at that path, possibly shared by KBs;
* ``http(s)://host:port`` (or ``tcp://``, ``grpc://``): a Milvus server or cluster, with the
  token from :attr:`StoreConfig.milvus_token` or the env variable ``MILVUS_TOKEN``.

One collection per KB, named from the KB name; on a shared database or a server the name
gets a unique suffix per build, so re-indexing never touches the collection being served
until the new index folder replaces the old one. Rows have an ``INT64`` primary key equal to
the row number and a ``FLOAT_VECTOR`` searched by inner product (``IP``; vectors are unit
length, so this is cosine). The index type follows :attr:`StoreConfig.index` (``FLAT``,
``HNSW`` or ``IVF_PQ``). :meth:`MilvusStore.save` writes ``milvus.json`` pointing at the
collection. Failures raise :class:`~kbrouter.errors.IndexError_` naming the URI/collection.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from kbrouter.config import StoreConfig
from kbrouter.errors import IndexError_
from kbrouter.kb.stores.base import VectorStore

logger = logging.getLogger(__name__)

META_FILE = "milvus.json"
LITE_DB = "milvus.db"
INSERT_BATCH = 2000
"""Rows per insert call (a 384-d batch is ~3 MB, far below gRPC message limits)."""
SEARCH_BATCH = 1024
"""Queries per search call (Milvus accepts at most 16384)."""
MAX_TOPK = 16384
"""Milvus's largest allowed ``limit``."""
_SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "unix:")


def collection_name(kb_name: str) -> str:
    """A valid Milvus collection name derived from a KB name (letters, digits, underscores)."""
    base = re.sub(r"[^0-9A-Za-z_]", "_", kb_name.strip()) or "kb"
    return f"kbrouter_{base}"[:200]


def is_server_uri(uri: str | None) -> bool:
    """True for a Milvus server URI, False for a Milvus Lite local path (or None)."""
    return bool(uri) and uri.strip().lower().startswith(_SERVER_SCHEMES)


def _client(uri: str, token: str | None) -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError as e:  # pragma: no cover - depends on the install
        raise IndexError_(
            "the Milvus store needs pymilvus (and milvus-lite for local files): "
            "pip install 'kbrouter[milvus]'"
        ) from e
    try:
        return MilvusClient(uri=uri, token=token or "")
    except Exception as e:  # noqa: BLE001 - connection failures come in many types
        raise IndexError_(f"cannot connect to Milvus at {uri!r}: {type(e).__name__}: {e}") from e


class MilvusStore(VectorStore):
    """A Milvus collection holding one KB's vectors (ids = row numbers).

    Args:
        cfg: the store config (``backend = "milvus"``).
        dim: vector dimension.
        directory: the KB's index folder; Milvus Lite's default database goes there.
        name: the KB name the collection is named after.

    The constructor creates a new, empty collection. Use :meth:`load` to open a saved one.
    Thread-safe (calls on one store are serialised).
    """

    def __init__(self, cfg: StoreConfig, dim: int, directory: Path, name: str = "kb") -> None:
        if dim <= 0:
            raise IndexError_(f"vector dimension must be positive, got {dim}")
        if cfg.backend != "milvus":
            raise IndexError_(f"MilvusStore got a store config for backend {cfg.backend!r}")
        if cfg.index == "ivfpq" and dim % cfg.pq_m != 0:
            raise IndexError_(f"pq_m={cfg.pq_m} must divide the vector dimension {dim}")
        self.cfg = cfg
        self.dim = int(dim)
        self._lock = threading.RLock()
        self._count = 0
        directory = Path(directory)
        if cfg.milvus_uri is None:  # Lite inside the index folder
            directory.mkdir(parents=True, exist_ok=True)
            self._local_db: Path | None = directory / LITE_DB
            self.uri = str(self._local_db)
            self.collection = collection_name(name)
        else:
            self._local_db = None
            self.uri = _resolve_uri(cfg.milvus_uri)
            # shared database/server: never clobber the collection currently being served
            self.collection = f"{collection_name(name)}_{uuid.uuid4().hex[:8]}"
        self._token = cfg.milvus_token or os.environ.get("MILVUS_TOKEN")
        self._client: Any = _client(self.uri, self._token)
        self._create_collection()

    # --- collection management ------------------------------------------------------------
    def _index_params(self) -> tuple[str, dict[str, Any]]:
        cfg = self.cfg
        if cfg.index == "hnsw":
            return "HNSW", {"M": cfg.hnsw_m, "efConstruction": max(40, 2 * cfg.hnsw_m)}
        if cfg.index == "ivfpq":
            return "IVF_PQ", {"nlist": cfg.ivf_nlist or 128, "m": cfg.pq_m, "nbits": 8}
        return "FLAT", {}

    def _create_collection(self) -> None:
        from pymilvus import DataType

        c = self._client
        try:
            if c.has_collection(self.collection):
                logger.info(
                    "dropping existing Milvus collection %s at %s", self.collection, self.uri
                )
                c.drop_collection(self.collection)
            schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            index_type, params = self._index_params()
            index_params = c.prepare_index_params()
            index_params.add_index(
                field_name="vector", index_type=index_type, metric_type="IP", params=params
            )
            c.create_collection(self.collection, schema=schema, index_params=index_params)
        except IndexError_:
            raise
        except Exception as e:  # noqa: BLE001
            raise IndexError_(
                f"cannot create Milvus collection {self.collection!r} at {self.uri!r}: "
                f"{type(e).__name__}: {e}"
            ) from e

    def _conn(self) -> Any:
        """The client, reopened if :meth:`save` closed it (Milvus Lite only)."""
        if self._client is None:
            if self._local_db is not None and not self._local_db.exists():
                raise IndexError_(
                    f"Milvus Lite database {self._local_db} was moved after saving; "
                    "open the saved index with MilvusStore.load(<new folder>, cfg)"
                )
            self._client = _client(self.uri, self._token)
            self._call("load", self._client.load_collection, self.collection)
        return self._client

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise IndexError_(
                f"Milvus {what} failed on collection {self.collection!r} at {self.uri!r}: "
                f"{type(e).__name__}: {e}"
            ) from e

    def close(self) -> None:
        """Close the connection (the store reopens it on next use).

        For Milvus Lite this also stops the in-process Lite server of this database, which
        writes everything to disk and releases the folder's lock, so it can be moved or copied.
        """
        with self._lock:
            if self._client is not None:
                try:
                    self._client.close()
                finally:
                    self._client = None
            if self._local_db is not None:
                _release_lite(self._local_db)

    def drop(self) -> None:
        """Delete the collection (e.g. a replaced build on a shared server)."""
        with self._lock:
            c = self._conn()
            self._call("drop", c.drop_collection, self.collection)
            self._count = 0

    # --- VectorStore ----------------------------------------------------------------------
    def add(self, vectors: np.ndarray) -> None:
        vecs = self._check(vectors, "add")
        if len(vecs) == 0:
            return
        with self._lock:
            c = self._conn()
            for start in range(0, len(vecs), INSERT_BATCH):
                chunk = vecs[start : start + INSERT_BATCH]
                rows = [{"id": self._count + i, "vector": v} for i, v in enumerate(chunk.tolist())]
                self._call("insert", c.insert, self.collection, rows)
                self._count += len(chunk)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        q = self._check(queries, "search")
        nq = len(q)
        scores = np.full((nq, k), -np.inf, dtype=np.float32)
        ids = np.full((nq, k), -1, dtype=np.int64)
        with self._lock:
            limit = min(k, self._count, MAX_TOPK)
            if nq == 0 or limit == 0:
                return scores, ids
            c = self._conn()
            params = self._search_params(limit)
            for start in range(0, nq, SEARCH_BATCH):
                chunk = q[start : start + SEARCH_BATCH]
                res = self._call(
                    "search",
                    c.search,
                    self.collection,
                    data=chunk.tolist(),
                    limit=limit,
                    output_fields=["id"],
                    search_params=params,
                )
                for row, hits in enumerate(res, start=start):
                    for j, hit in enumerate(hits[:k]):
                        ids[row, j] = int(hit["id"])
                        scores[row, j] = float(hit["distance"])
        return scores, ids

    def _search_params(self, k: int) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.cfg.index == "hnsw":
            params["ef"] = max(self.cfg.hnsw_ef_search, k)
        elif self.cfg.index == "ivfpq":
            params["nprobe"] = self.cfg.ivf_nprobe
        return {"metric_type": "IP", "params": params}

    def __len__(self) -> int:
        return self._count

    # --- persistence ----------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Flush and write ``milvus.json``; Milvus Lite's default database moves into ``directory``.

        For Milvus Lite the connection is closed so the caller can rename the folder; the store
        reopens it on next use as long as the folder was not moved.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            c = self._conn()
            self._call("flush", c.flush, self.collection)
            meta: dict[str, Any] = {
                "backend": "milvus",
                "collection": self.collection,
                "dim": self.dim,
                "count": self._count,
                "index": self.cfg.index,
                "metric": "IP",
            }
            if self._local_db is not None:
                target = directory / LITE_DB
                self.close()
                if target.resolve() != self._local_db.resolve():
                    if target.exists():
                        shutil.rmtree(target) if target.is_dir() else target.unlink()
                    if self._local_db.is_dir():
                        shutil.copytree(self._local_db, target)
                    else:
                        shutil.copy2(self._local_db, target)
                    self._local_db = target
                    self.uri = str(target)
                meta["uri"] = None  # relative: <this folder>/milvus.db
            else:
                meta["uri"] = self.uri
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path, cfg: StoreConfig, dim: int | None = None) -> MilvusStore:
        """Open the collection a saved ``milvus.json`` points at.

        Raises :class:`~kbrouter.errors.IndexError_` if the pointer is missing or corrupt, the
        collection is gone, or its dimension or row count differs from what was saved (or
        from ``dim``).
        """
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise IndexError_(f"no Milvus index in {directory} (expected {META_FILE})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            saved_dim, count, coll = int(meta["dim"]), int(meta["count"]), str(meta["collection"])
        except (ValueError, KeyError, TypeError) as e:
            raise IndexError_(f"corrupt Milvus pointer {meta_path}: {e}") from e
        if dim is not None and dim != saved_dim:
            raise IndexError_(
                f"Milvus index in {directory} has dimension {saved_dim}, the encoder gives {dim}"
            )
        if meta.get("index", cfg.index) != cfg.index:
            raise IndexError_(
                f"Milvus index in {directory} is of type {meta.get('index')!r}, "
                f"config asks for {cfg.index!r}; rebuild the index"
            )
        store = cls.__new__(cls)
        store.cfg = cfg
        store.dim = saved_dim
        store._lock = threading.RLock()
        store._count = count
        store.collection = coll
        store._token = cfg.milvus_token or os.environ.get("MILVUS_TOKEN")
        if meta.get("uri") is None:
            store._local_db = directory / LITE_DB
            if not store._local_db.exists():
                raise IndexError_(f"Milvus Lite database missing: {store._local_db}")
            store.uri = str(store._local_db)
        else:
            store._local_db = None
            store.uri = str(meta["uri"])
        store._client = _client(store.uri, store._token)
        c = store._client
        if not store._call("has_collection", c.has_collection, coll):
            raise IndexError_(f"Milvus collection {coll!r} not found at {store.uri!r}; rebuild")
        desc = store._call("describe", c.describe_collection, coll)
        vec_dims = [
            int(f.get("params", {}).get("dim", -1))
            for f in desc.get("fields", [])
            if f.get("name") == "vector"
        ]
        if vec_dims and vec_dims[0] != saved_dim:
            raise IndexError_(
                f"Milvus collection {coll!r} has dimension {vec_dims[0]}, pointer says {saved_dim}"
            )
        store._call("load", c.load_collection, coll)
        stats = store._call("stats", c.get_collection_stats, coll)
        rows = int(stats.get("row_count", count))
        if rows != count:
            raise IndexError_(
                f"Milvus collection {coll!r} at {store.uri!r} has {rows} rows, "
                f"the saved index has {count}; rebuild"
            )
        return store

    # --- helpers --------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"MilvusStore(uri={self.uri!r}, collection={self.collection!r}, n={self._count})"


def _release_lite(db: Path) -> None:
    """Stop milvus-lite's in-process server for ``db`` (flushes and unlocks it), if running."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:  # older milvus-lite: a subprocess released with the client
        return
    release = getattr(server_manager_instance, "release_server", None)
    if release is not None:
        release(str(db))


def _resolve_uri(uri: str) -> str:
    uri = uri.strip()
    if is_server_uri(uri):
        return uri
    path = Path(uri).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def shared_collection(directory: Path) -> dict[str, Any] | None:
    """The saved pointer (``uri``, ``collection``, ``previous``) of a store in ``directory`` that
    lives in a shared Milvus database or server (not a Lite file inside the index folder)."""
    try:
        meta = json.loads((Path(directory) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("backend") != "milvus" or not meta.get("uri"):
        return None
    return meta


def drop_superseded(old: dict[str, Any] | None, directory: Path, cfg: StoreConfig) -> bool:
    """After a rebuild was swapped into place: remember the build it replaced (a process that
    opened it before the swap may still be serving it) and drop the one before that. Shared
    databases and servers give every build its own collection, so without this they pile up;
    at most two builds of a KB are kept. True if one was dropped; a failure is logged, never
    raised (the new index works either way)."""
    new = shared_collection(directory)
    if old is None or new is None or new.get("collection") == old.get("collection"):
        return False
    new["previous"] = old["collection"]
    pointer = Path(directory) / META_FILE
    tmp = pointer.with_name(pointer.name + ".tmp")
    tmp.write_text(json.dumps(new, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, pointer)  # atomic: a crash leaves the old pointer or the new one
    stale = old.get("previous")
    if not stale or stale in (new["collection"], old["collection"]):
        return False
    uri = str(old["uri"])
    try:
        client = _client(uri, cfg.milvus_token or os.environ.get("MILVUS_TOKEN"))
        try:
            if client.has_collection(stale):
                client.drop_collection(stale)
                logger.info("dropped superseded Milvus collection %s at %s", stale, uri)
                return True
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001 - cleanup must not fail a finished build
        logger.warning("could not drop superseded Milvus collection %s at %s: %s", stale, uri, e)
    return False
