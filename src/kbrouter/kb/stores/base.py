"""The vector-store interface: inner-product search over L2-normalised float32 vectors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from kbrouter.errors import IndexError_


class VectorStore(ABC):
    """Holds vectors keyed by their row number (0..n-1) in the KB's item list.

    Scores are inner products (cosine for normalised vectors). Missing results are ``-1`` ids.
    """

    dim: int

    @abstractmethod
    def add(self, vectors: np.ndarray) -> None:
        """Append vectors (n, dim) float32; their ids are the next n row numbers."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(scores, ids)``, both shape (n_queries, k); ids are int64, -1 where empty."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Persist into ``directory`` (which the caller creates and later renames atomically)."""

    @abstractmethod
    def __len__(self) -> int: ...

    def _check(self, vectors: np.ndarray, what: str) -> np.ndarray:
        """Validate vectors against ``dim``: a C-contiguous float32 (n, dim) array of finite values.

        Raises :class:`~kbrouter.errors.IndexError_` naming ``what`` and the problem.
        """
        arr = np.asarray(vectors)
        if arr.ndim == 1 and arr.shape[0] == self.dim:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise IndexError_(
                f"{what}: expected vectors of shape (n, {self.dim}), got {tuple(arr.shape)}"
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise IndexError_(f"{what}: expected float vectors, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise IndexError_(f"{what}: vectors contain NaN or infinity")
        return arr
