"""Test helpers for the KB tests: small deterministic encoders and tiny corpora."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kbrouter.config import RegistryConfig, parse_registry
from kbrouter.encoders.base import ImageEncoder, TextEncoder
from kbrouter.errors import ImageError


class HashTextEncoder(TextEncoder):
    """Bag-of-words hashed into ``dim`` buckets (crc32), L2-normalised. Counts its calls."""

    def __init__(self, dim: int = 256, name: str = "hash") -> None:
        self.dim = dim
        self.name = f"{name}-{dim}"
        self.calls = 0
        self.fail_after: int | None = None
        """Raise RuntimeError on the call after this many calls (simulates a crash)."""

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash in the encoder")
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for tok in re.findall(r"\w+", t.lower()):
                out[i, zlib.crc32(tok.encode()) % self.dim] += 1.0
            if not out[i].any():
                out[i, 0] = 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class ColorImageEncoder(ImageEncoder):
    """8x8 RGB thumbnail, centred and L2-normalised: near-copies of an image match."""

    dim = 192

    def __init__(self, name: str = "color8") -> None:
        self.name = name

    def encode_images(
        self, paths: Sequence[Path], batch_size: int = 16, progress: bool = False
    ) -> np.ndarray:
        from PIL import Image

        out = []
        for p in paths:
            try:
                with Image.open(p) as im:
                    arr = np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32)
            except (FileNotFoundError, OSError) as e:
                raise ImageError(f"cannot read image {p}: {e}") from e
            v = arr.reshape(-1) - arr.mean()
            out.append(v / max(float(np.linalg.norm(v)), 1e-6))
        return np.asarray(out, dtype=np.float32).reshape(len(paths), self.dim)


def fake_loaders(text_encoder: TextEncoder | None = None) -> dict[str, Any]:
    """Registry keyword arguments that load the fake encoders (one instance per name)."""
    return {
        "text_encoder_loader": lambda name: text_encoder or HashTextEncoder(name=f"hash:{name}"),
        "image_encoder_loader": lambda name: ColorImageEncoder(name=f"color:{name}"),
    }


# --------------------------------------------------------------------------- tiny corpora

PASSAGES = [
    {"id": "p1", "title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"id": "p2", "title": "Berlin", "text": "Berlin is the capital of Germany on the Spree."},
    {"id": "p3", "title": "Nile", "text": "The Nile is a major river flowing north in Africa."},
    {"id": "p4", "title": "Jupiter", "text": "Jupiter is the largest planet of the solar system."},
    {
        "id": "p5",
        "title": "Long",
        "text": " ".join(f"w{i}" for i in range(250)),
    },
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_images(folder: Path) -> list[dict]:
    """Three solid/striped PNGs and their manifest rows (paths relative to ``folder``)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "img").mkdir(exist_ok=True)
    specs = {
        "red": ((220, 20, 20), "Red flag", "A plain red banner."),
        "blue": ((20, 20, 220), "Blue flag", "A plain blue banner with no emblem."),
        "green": ((20, 200, 20), "Green field", "A meadow of green grass in spring."),
    }
    rows = []
    for key, (rgb, title, caption) in specs.items():
        im = Image.new("RGB", (40, 30), rgb)
        for x in range(0, 40, 10):  # a stripe so the thumbnails are not constant
            for y in range(30):
                im.putpixel((x, y), (255, 255, 255))
        im.save(folder / "img" / f"{key}.png")
        row = {"id": f"img-{key}", "path": f"img/{key}.png", "title": title, "caption": caption}
        rows.append(row)
    return rows


def make_tables(folder: Path, n_rows_big: int = 7) -> list[dict]:
    (folder / "tables").mkdir(parents=True, exist_ok=True)
    (folder / "tables" / "countries.csv").write_text(
        "name,capital,area_km2\nFrance,Paris,551695\nGermany,Berlin,357022\n", encoding="utf-8"
    )
    big = "year,winner\n" + "".join(f"{1990 + i},Team {i}\n" for i in range(n_rows_big))
    (folder / "tables" / "cup.tsv").write_text(big.replace(",", "\t"), encoding="utf-8")
    return [
        {"id": "tbl-countries", "title": "Countries and capitals", "path": "tables/countries.csv"},
        {"id": "tbl-cup", "title": "Football cup winners", "path": "tables/cup.tsv"},
    ]


def tiny_config(root: Path, **overrides: dict[str, Any]) -> RegistryConfig:
    """A registry over tiny text/table/image corpora in ``root/data`` (written once).

    ``overrides`` maps a KB name (text, table, image) to fields merged into its config.
    """
    data = root / "data"
    if not (data / "text.jsonl").exists():
        write_jsonl(data / "text.jsonl", PASSAGES)
        write_jsonl(data / "tables.jsonl", make_tables(data))
        write_jsonl(data / "images.jsonl", make_images(data))
    kbs: list[dict[str, Any]] = [
        {
            "name": "text",
            "description": "Passages.",
            "modality": "text",
            "aliases": ["Text Retriever"],
            "source": {"path": "data/text.jsonl"},
            "chunking": {"words": 100, "stride": 50},
        },
        {
            "name": "table",
            "description": "Tables.",
            "modality": "table",
            "aliases": ["Table Retriever"],
            "source": {"manifest": "data/tables.jsonl"},
            "rows_per_chunk": 3,
        },
        {
            "name": "image",
            "description": "Images.",
            "modality": "image",
            "aliases": ["Text Image Retriever"],
            "source": {"manifest": "data/images.jsonl"},
            "image_encoder": "fake",
        },
    ]
    for kb in kbs:
        kb.update(overrides.get(kb["name"], {}))
    return parse_registry({"index_dir": "index", "kb": kbs}, base_dir=root)
