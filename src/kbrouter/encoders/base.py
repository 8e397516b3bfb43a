"""Encoder interfaces. Every encoder returns L2-normalised float32 arrays."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class TextEncoder(ABC):
    name: str
    """Stable identifier recorded in index manifests (model name/path + version facts)."""
    dim: int

    @abstractmethod
    def encode(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Encode texts to an (n, dim) float32 array of unit vectors."""


class ImageEncoder(ABC):
    name: str
    dim: int
    supports_text: bool = False
    """True for CLIP-style models whose text and image vectors share one space."""

    @abstractmethod
    def encode_images(
        self, paths: Sequence[Path], batch_size: int = 16, progress: bool = False
    ) -> np.ndarray:
        """Encode image files to an (n, dim) float32 array of unit vectors.

        Raises :class:`~kbrouter.errors.ImageError` naming the file that is missing or undecodable.
        """

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts into the image space (CLIP-style models only)."""
        raise NotImplementedError(f"image encoder {self.name!r} cannot embed text")
