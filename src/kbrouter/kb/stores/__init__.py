"""Vector stores for dense retrieval: FAISS (embedded default) and Milvus (Lite or cluster).

Use :func:`create_store` to make a new, empty store for an index build and :func:`open_store`
to open a saved one; both pick the backend from :class:`~kbrouter.config.StoreConfig`.
Backends are imported lazily, so importing this package stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kbrouter.kb.stores.base import VectorStore

if TYPE_CHECKING:
    from kbrouter.config import StoreConfig

__all__ = ["VectorStore", "create_store", "open_store"]


def create_store(cfg: StoreConfig, dim: int, directory: Path, name: str = "kb") -> VectorStore:
    """A new, empty store of dimension ``dim`` for the index being built in ``directory``.

    ``name`` (the KB name) names the Milvus collection; FAISS ignores it. Call
    ``store.save(directory)`` when all vectors are added.
    """
    if cfg.backend == "milvus":
        from kbrouter.kb.stores.milvus_store import MilvusStore

        return MilvusStore(cfg, dim, Path(directory), name=name)
    from kbrouter.kb.stores.faiss_store import FaissStore

    return FaissStore(cfg, dim)


def open_store(cfg: StoreConfig, dim: int | None, directory: Path) -> VectorStore:
    """Open the store saved in ``directory``.

    Raises :class:`~kbrouter.errors.IndexError_` if it is missing, corrupt, of another index
    type than ``cfg`` asks for, or (when ``dim`` is given) of another dimension.
    """
    if cfg.backend == "milvus":
        from kbrouter.kb.stores.milvus_store import MilvusStore

        return MilvusStore.load(Path(directory), cfg, dim)
    from kbrouter.kb.stores.faiss_store import FaissStore

    return FaissStore.load(Path(directory), cfg, dim)
