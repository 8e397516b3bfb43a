"""The vector-store interface: inner-product search over L2-normalised float32 vectors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


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
