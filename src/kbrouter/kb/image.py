"""Image-text knowledge base: images with captions (JSONL manifest: ``id``, ``path``,
``caption``, optional ``title``).

* Text queries search the captions (dense + BM25 per ``retrieval.mode``).
* A query carrying an image is also matched image-to-image with the image encoder (question
  images are re-cropped, re-encoded copies, so matching goes by content); that ranking is fused
  with the caption rankings by weighted reciprocal rank (:attr:`ImageKB.image_weight`).
* With a CLIP-style image encoder (``supports_text``) the query text is also matched against
  the images directly (text-to-image).

Images that do not decode are reported and skipped at index time (or fatal with
``on_bad_row = "fail"``); a query image that is missing or undecodable raises
:class:`~kbrouter.errors.ImageError`.

Evidence: ``text`` = title + caption, ``title``, ``image_path`` (absolute), ``metadata`` =
``doc_id``, the manifest's other fields (license, credit, source), ``scores`` and ``pinned``
(True for a near-duplicate image match ranked first; its ``score`` is the image cosine).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from kbrouter.config import ImageKBConfig
from kbrouter.errors import ImageError
from kbrouter.kb.ingest import IngestReport, check_image, read_images
from kbrouter.kb.table import _manifest_paths, _rel
from kbrouter.kb.text import IndexedKB, Item, _resolve, store_search
from kbrouter.types import Evidence, Modality, Query


class ImageKB(IndexedKB):
    """Captioned images, searched by caption text and (with an image encoder) by image."""

    config_type = ImageKBConfig
    kb_modality = Modality.IMAGE

    image_weight: float = 2.0
    """RRF weight of the image-to-image ranking relative to each caption ranking (1.0)."""
    pin_thresholds: ClassVar[dict[str, float]] = {"image": 0.8}
    """Image matches with cosine >= 0.8 are ranked first, by cosine, ahead of the fused list.

    A query image that is a (re-cropped, re-encoded) copy of a KB image must win over caption
    matches, which for generic questions ("which flag is shown?") rank near-identical captions
    arbitrarily; rank fusion alone cannot guarantee that. Measured on mkqa-mini with
    EfficientNet-Lite0: copies score 0.83-0.97, other images mostly < 0.75. Tune for other
    encoders (subclass or set on the instance)."""
    clip_text_weight: float = 1.0
    """RRF weight of the CLIP text-to-image ranking."""

    @classmethod
    def source_root_of(cls, config: ImageKBConfig, base_dir: Path) -> Path:
        return _resolve(config.source.manifest, base_dir).parent

    @classmethod
    def source_files(cls, config: ImageKBConfig, base_dir: Path) -> list[tuple[str, Path]]:
        manifest = _resolve(config.source.manifest, base_dir)
        return [(manifest.name, manifest), *_manifest_paths(manifest)]

    @classmethod
    def image_encoder_name(cls, config: ImageKBConfig) -> str | None:
        return config.image_encoder

    @classmethod
    def config_fingerprint(cls, config: ImageKBConfig) -> dict[str, Any]:
        return {**super().config_fingerprint(config), "image_encoder": config.image_encoder}

    @classmethod
    def read_items(
        cls, config: ImageKBConfig, base_dir: Path, report: IngestReport
    ) -> tuple[list[Item], int]:
        manifest = _resolve(config.source.manifest, base_dir)
        records = read_images(manifest, on_bad_row=config.on_bad_row, report=report)
        root = manifest.parent
        items = []
        for rec in records:
            text = _caption_text(rec.title, rec.caption)
            items.append(
                Item(
                    id=rec.id,
                    text=text,
                    index_text=text,
                    title=rec.title or None,
                    metadata={"doc_id": rec.id, **rec.metadata},
                    image_path=_rel(rec.path, root),
                )
            )
        return items, len(records)

    def image_file(self, item: Item) -> Path:
        assert item.image_path is not None
        return self.source_root / item.image_path

    def to_evidence(self, item: Item, score: float, extra: dict[str, Any]) -> Evidence:
        ev = super().to_evidence(item, score, extra)
        return ev.model_copy(update={"image_path": self.image_file(item)})

    def extra_rankings(
        self, queries: Sequence[Query], depth: int
    ) -> list[tuple[str, float, list[list[tuple[int, float]]]]]:
        out: list[tuple[str, float, list[list[tuple[int, float]]]]] = []
        if self.image_encoder is None or self.image_store is None:
            return out
        with_image = [i for i, q in enumerate(queries) if q.image is not None]
        if with_image:
            paths = [Path(queries[i].image) for i in with_image]  # type: ignore[arg-type]
            for p in paths:
                problem = check_image(p)
                if problem is not None:
                    raise ImageError(f"query image for KB {self.name!r}: {problem}")
            vecs = self.image_encoder.encode_images(paths)
            found = store_search(self.image_store, vecs, depth)
            res: list[list[tuple[int, float]]] = [[] for _ in queries]
            for i, r in zip(with_image, found, strict=True):
                res[i] = r
            out.append(("image", self.image_weight, res))
        if self.image_encoder.supports_text:
            live = [i for i, q in enumerate(queries) if q.text.strip()]
            if live:
                vecs = self.image_encoder.encode_texts([queries[i].text for i in live])
                found = store_search(self.image_store, vecs, depth)
                res = [[] for _ in queries]
                for i, r in zip(live, found, strict=True):
                    res[i] = r
                out.append(("clip_text", self.clip_text_weight, res))
        return out


def _caption_text(title: str, caption: str) -> str:
    if not title:
        return caption
    if not caption or caption.lower().startswith(title.lower()):
        return caption or title
    return f"{title}. {caption}"
