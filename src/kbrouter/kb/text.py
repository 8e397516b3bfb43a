"""Text knowledge base (passages) and the index machinery the table and image KBs share.

An index directory holds::

    manifest.json     what the index was built from (kbrouter.kb.manifest)
    items.jsonl       one indexed item per line (id, text, title, payload), row = vector id
    bm25/             lexical index (bm25s)
    store/            dense vectors of the items' text (FAISS or Milvus); absent for mode="bm25"
    image_store/      image vectors (image KBs with an image encoder)

Search modes (``retrieval.mode``): ``dense`` (cosine over encoder vectors), ``bm25``, or
``hybrid`` (both fused by reciprocal rank). Evidence ``score`` is the cosine or BM25 score for a
single ranking and the RRF score when several rankings are fused (then ``metadata["fused"]`` is
true); the per-ranking scores are in ``metadata["scores"]``. Text and table KBs ignore a query's
image.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from kbrouter.config import TextKBConfig
from kbrouter.encoders.base import ImageEncoder, TextEncoder
from kbrouter.errors import IndexError_
from kbrouter.kb.base import KBInfo, KnowledgeBase
from kbrouter.kb.chunking import chunk_passages
from kbrouter.kb.fusion import reciprocal_rank_fusion
from kbrouter.kb.ingest import IngestReport, read_passages
from kbrouter.kb.lexical import BM25Index
from kbrouter.kb.manifest import (
    FORMAT_VERSION,
    IndexManifest,
    atomic_directory,
    check_encoder_identity,
    config_hash,
    fingerprint_sources,
    library_versions,
    now_iso,
    read_manifest,
    write_manifest,
)
from kbrouter.types import Evidence, Modality, Query

logger = logging.getLogger(__name__)

ITEMS_FILE = "items.jsonl"
BM25_DIR = "bm25"
STORE_DIR = "store"
IMAGE_STORE_DIR = "image_store"
ENCODE_BLOCK = 2048
"""Texts per encoder call at index time (progress granularity; the encoder batches inside)."""


# --------------------------------------------------------------------------- items, progress


@dataclass
class Item:
    """One indexed unit (passage chunk, table block, image)."""

    id: str
    text: str
    """What a reader model sees."""
    index_text: str
    """What is embedded and BM25-indexed."""
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    table: dict[str, Any] | None = None
    image_path: str | None = None
    """Image path relative to the source root (the image manifest's folder)."""

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if v is not None and v != {}}
        return json.dumps(d, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Item:
        return cls(**json.loads(line))


class BuildProgress:
    """Receives index-build progress; the default does nothing (see the registry's rich one)."""

    def stage(self, kb: str, stage: str, total: int | None = None) -> None:
        """A new stage of ``kb``'s build starts (``total`` units, None if unknown)."""

    def advance(self, n: int = 1) -> None:
        """``n`` more units of the current stage are done."""


@dataclass
class BuildResult:
    """What one index build (or no-op) did."""

    kb: str
    status: str
    """``built``, ``rebuilt``, ``up-to-date`` or ``failed``."""
    n_items: int = 0
    n_source_items: int = 0
    bad_rows: list[str] = field(default_factory=list)
    seconds: float = 0.0
    reasons: list[str] = field(default_factory=list)
    """Why the index was (re)built."""
    error: str | None = None


# --------------------------------------------------------------------------- the shared base


class IndexedKB(KnowledgeBase):
    """A KB whose items are searched by their text (dense and/or BM25), plus optional extras.

    Subclasses define how a source becomes :class:`Item` s (:meth:`read_items`), which files
    the source consists of (:meth:`source_files`) and how an item becomes :class:`Evidence`.
    """

    config_type: ClassVar[type] = TextKBConfig
    kb_modality: ClassVar[Modality] = Modality.TEXT
    pin_thresholds: ClassVar[dict[str, float]] = {}
    """Rankings whose items scoring at least the threshold are ranked first (by that score),
    ahead of the fused ranking; see :class:`~kbrouter.kb.image.ImageKB`."""

    def __init__(
        self,
        config: Any,
        directory: Path,
        manifest: IndexManifest,
        items: list[Item],
        *,
        text_encoder: TextEncoder | None,
        store: Any | None,
        bm25: BM25Index | None,
        source_root: Path,
        image_encoder: ImageEncoder | None = None,
        image_store: Any | None = None,
    ) -> None:
        self.config = config
        self.info = KBInfo(
            name=config.name,
            description=config.description,
            modality=self.kb_modality,
            aliases=list(config.aliases),
        )
        self.directory = Path(directory)
        self.manifest = manifest
        self.items = items
        self.text_encoder = text_encoder
        self.store = store
        self.bm25 = bm25
        self.source_root = Path(source_root)
        self.image_encoder = image_encoder
        self.image_store = image_store
        self._by_id = {it.id: i for i, it in enumerate(items)}
        self._by_doc: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            self._by_doc.setdefault(str(it.metadata.get("doc_id", it.id)), []).append(i)

    # ------------------------------------------------------------------ per-modality hooks

    @classmethod
    def source_root_of(cls, config: Any, base_dir: Path) -> Path:
        """The folder source-relative paths are resolved against."""
        return _resolve(config.source.path, base_dir).parent

    @classmethod
    def source_files(cls, config: Any, base_dir: Path) -> list[tuple[str, Path]]:
        """``(name, path)`` of every file the index depends on."""
        path = _resolve(config.source.path, base_dir)
        return [(path.name, path)]

    @classmethod
    def read_items(
        cls, config: TextKBConfig, base_dir: Path, report: IngestReport
    ) -> tuple[list[Item], int]:
        """Read the source into items; returns ``(items, number of source records)``."""
        passages = read_passages(
            _resolve(config.source.path, base_dir),
            format=config.source.format,
            on_bad_row=config.on_bad_row,
            report=report,
        )
        if config.chunking is None:
            triples = [(p.id, p.title, " ".join(p.text.split())) for p in passages]
            items = [
                Item(id_, text, _join_title(title, text), title or None, {"doc_id": id_})
                for id_, title, text in triples
            ]
            return items, len(passages)
        chunks = chunk_passages(
            ((p.id, p.title, p.text) for p in passages),
            words=config.chunking.words,
            stride=config.chunking.stride,
        )
        items = [
            Item(
                c.id,
                c.text,
                _join_title(c.title, c.text),
                c.title or None,
                {"doc_id": c.doc_id, "chunk": c.index, "n_chunks": c.n_chunks},
            )
            for c in chunks
        ]
        return items, len(passages)

    @classmethod
    def config_fingerprint(cls, config: Any) -> dict[str, Any]:
        """The configuration the index content depends on (hashed into the manifest)."""
        store = config.retrieval.store.model_dump(mode="json", exclude={"milvus_token"})
        fp: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "modality": str(cls.kb_modality),
            "store": store,
            "on_bad_row": config.on_bad_row,
        }
        if isinstance(config, TextKBConfig):
            fp["source_format"] = config.source.format
            fp["chunking"] = None if config.chunking is None else config.chunking.model_dump()
        return fp

    @classmethod
    def image_encoder_name(cls, config: Any) -> str | None:
        return None

    def to_evidence(self, item: Item, score: float, extra: dict[str, Any]) -> Evidence:
        return Evidence(
            kb=self.name,
            id=item.id,
            score=score,
            text=item.text,
            title=item.title,
            modality=self.kb_modality,
            metadata={**item.metadata, **extra},
        )

    def extra_rankings(
        self, queries: Sequence[Query], depth: int
    ) -> list[tuple[str, float, list[list[tuple[int, float]]]]]:
        """More rankings to fuse: ``(label, weight, per-query [(row, score)])`` (image KB)."""
        return []

    # ------------------------------------------------------------------ expected state

    @classmethod
    def needs_dense(cls, config: Any) -> bool:
        return config.retrieval.mode != "bm25"

    @classmethod
    def expected_state(cls, config: Any, base_dir: Path, previous: IndexManifest | None = None):
        """``(config_digest, sources)`` for staleness checks."""
        digest = config_hash(cls.config_fingerprint(config))
        sources = fingerprint_sources(
            cls.source_files(config, base_dir), previous.sources if previous else ()
        )
        return digest, sources

    # ------------------------------------------------------------------ build

    @classmethod
    def build(
        cls,
        config: Any,
        directory: Path,
        base_dir: Path,
        *,
        text_encoder: TextEncoder | None = None,
        image_encoder: ImageEncoder | None = None,
        progress: BuildProgress | None = None,
        reasons: Sequence[str] = (),
    ) -> BuildResult:
        """Build the index into ``directory`` atomically (the old index survives a failure).

        ``text_encoder`` is required unless ``retrieval.mode == "bm25"``; ``image_encoder``
        when the config names one.
        """
        from kbrouter.kb.stores import create_store

        t0 = time.perf_counter()
        progress = progress or BuildProgress()
        name = config.name
        needs_dense = cls.needs_dense(config)
        if needs_dense and text_encoder is None:
            raise ValueError(
                f"KB {name!r}: retrieval mode {config.retrieval.mode!r} needs a text encoder"
            )
        img_name = cls.image_encoder_name(config)
        if img_name is not None and image_encoder is None:
            raise ValueError(f"KB {name!r}: image encoder {img_name!r} was not provided")

        digest = config_hash(cls.config_fingerprint(config))
        sources = fingerprint_sources(cls.source_files(config, base_dir))
        progress.stage(name, "reading", None)
        report = IngestReport()
        items, n_source = cls.read_items(config, base_dir, report)
        logger.info("KB %s: %d items from %d source records", name, len(items), n_source)

        from kbrouter.kb.stores.milvus_store import drop_superseded, shared_collection

        superseded = {
            sub: shared_collection(Path(directory) / sub) for sub in (STORE_DIR, IMAGE_STORE_DIR)
        }
        with atomic_directory(directory) as tmp:
            with (tmp / ITEMS_FILE).open("w", encoding="utf-8") as fh:
                for it in items:
                    fh.write(it.to_json() + "\n")
            progress.stage(name, "bm25", None)
            BM25Index().build([it.index_text for it in items]).save(tmp / BM25_DIR)

            if needs_dense:
                assert text_encoder is not None
                progress.stage(name, "encoding text", len(items))
                store = create_store(
                    config.retrieval.store, text_encoder.dim, tmp / STORE_DIR, name=name
                )
                texts = [it.index_text for it in items]
                for start in range(0, len(texts), ENCODE_BLOCK):
                    block = texts[start : start + ENCODE_BLOCK]
                    store.add(text_encoder.encode(block, batch_size=config.retrieval.batch_size))
                    progress.advance(len(block))
                store.save(tmp / STORE_DIR)
                _close(store)

            if image_encoder is not None:
                progress.stage(name, "encoding images", len(items))
                root = cls.source_root_of(config, base_dir)
                paths = [root / it.image_path for it in items]  # type: ignore[operator]
                istore = create_store(
                    config.retrieval.store,
                    image_encoder.dim,
                    tmp / IMAGE_STORE_DIR,
                    name=f"{name}_image",
                )
                bs = 16
                for start in range(0, len(paths), bs * 4):
                    block = paths[start : start + bs * 4]
                    istore.add(image_encoder.encode_images(block, batch_size=bs))
                    progress.advance(len(block))
                istore.save(tmp / IMAGE_STORE_DIR)
                _close(istore)

            manifest = IndexManifest(
                kb=name,
                modality=cls.kb_modality,
                encoder=config.retrieval.encoder if needs_dense else None,
                encoder_id=text_encoder.name if needs_dense and text_encoder else None,
                dim=text_encoder.dim if needs_dense and text_encoder else None,
                image_encoder=img_name,
                image_encoder_id=image_encoder.name if image_encoder else None,
                image_dim=image_encoder.dim if image_encoder else None,
                n_items=len(items),
                n_source_items=n_source,
                bad_rows=len(report.bad_rows),
                sources=sources,
                config_hash=digest,
                config=cls.config_fingerprint(config),
                versions=library_versions(),
                created=now_iso(),
                build_seconds=round(time.perf_counter() - t0, 3),
            )
            write_manifest(tmp, manifest)
        for sub, old in superseded.items():  # the new index is in place: free the old one
            drop_superseded(old, Path(directory) / sub, config.retrieval.store)
        return BuildResult(
            kb=name,
            status="built",
            n_items=len(items),
            n_source_items=n_source,
            bad_rows=[str(b) for b in report.bad_rows],
            seconds=time.perf_counter() - t0,
            reasons=list(reasons),
        )

    # ------------------------------------------------------------------ open

    @classmethod
    def open(
        cls,
        config: Any,
        directory: Path,
        base_dir: Path,
        *,
        text_encoder: TextEncoder | None = None,
        image_encoder: ImageEncoder | None = None,
        manifest: IndexManifest | None = None,
    ) -> IndexedKB:
        """Open a built index (staleness is the caller's check: see the registry).

        A missing or corrupt index raises :class:`~kbrouter.errors.IndexError_`; encoders
        whose id or dimension differ from the index's raise
        :class:`~kbrouter.errors.StaleIndexError`.
        """
        from kbrouter.kb.stores import open_store

        directory = Path(directory)
        manifest = manifest or read_manifest(directory)
        items = _read_items(directory / ITEMS_FILE, manifest)
        bm25 = BM25Index.load(directory / BM25_DIR)
        if len(bm25) != len(items):
            raise IndexError_(
                f"KB {config.name!r}: BM25 index has {len(bm25)} rows, items {len(items)}; "
                "rebuild with `kbrouter index --force`"
            )
        store = None
        if cls.needs_dense(config):
            if text_encoder is None:
                raise ValueError(f"KB {config.name!r}: a text encoder is needed to open it")
            check_encoder_identity(manifest, text_encoder.name, text_encoder.dim)
            store = _open_checked(
                open_store, config, text_encoder.dim, directory / STORE_DIR, len(items)
            )
        else:
            text_encoder = None
        istore = None
        if image_encoder is not None and manifest.image_encoder_id is not None:
            check_encoder_identity(manifest, image_encoder.name, image_encoder.dim, image=True)
            istore = _open_checked(
                open_store, config, image_encoder.dim, directory / IMAGE_STORE_DIR, len(items)
            )
        else:
            image_encoder = None
        return cls(
            config,
            directory,
            manifest,
            items,
            text_encoder=text_encoder,
            store=store,
            bm25=bm25,
            source_root=cls.source_root_of(config, base_dir),
            image_encoder=image_encoder,
            image_store=istore,
        )

    # ------------------------------------------------------------------ search

    def __len__(self) -> int:
        return len(self.items)

    def get_item(self, item_id: str) -> Item:
        """The indexed item with this id (KeyError if absent)."""
        return self.items[self._by_id[item_id]]

    def fetch(self, doc_ids: Sequence[str]) -> list[list[Evidence]]:
        return [
            [
                self.to_evidence(self.items[i], 1.0, {"fetched": True})
                for i in self._by_doc.get(str(d), [])
            ]
            for d in doc_ids
        ]

    def search(
        self,
        queries: Sequence[Query],
        k: int | None = None,
        mode: Literal["dense", "bm25", "hybrid"] | None = None,
    ) -> list[list[Evidence]]:
        """Top-``k`` evidence per query (batched: the encoder and BM25 run once per call).

        ``mode`` overrides the configured retrieval mode for this call, within what the index
        holds (``dense`` needs vectors: not available for a KB configured as ``bm25``).
        """
        queries = [q if isinstance(q, Query) else Query(text=str(q)) for q in queries]
        k = int(k or self.config.retrieval.k)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        mode = mode or self.config.retrieval.mode
        if mode != "bm25" and self.store is None:
            raise ValueError(f"KB {self.name!r} has no dense vectors (mode 'bm25' index)")
        if mode != "dense" and self.bm25 is None:
            raise ValueError(f"KB {self.name!r} was opened without BM25 (mode 'dense')")
        if not queries:
            return []
        n = len(self.items)
        depth = min(n, max(2 * k, 20))
        rankings: list[tuple[str, float, list[list[tuple[int, float]]]]] = []
        if mode != "bm25":
            rankings.append(("dense", 1.0, self._dense(queries, depth)))
        if mode != "dense":
            assert self.bm25 is not None
            rankings.append(("bm25", 1.0, self.bm25.search([q.text for q in queries], depth)))
        rankings += self.extra_rankings(queries, depth)
        out: list[list[Evidence]] = []
        for qi in range(len(queries)):
            per = [(label, w, r[qi]) for label, w, r in rankings if r[qi]]
            out.append(self._fuse(per, k))
        return out

    def _dense(self, queries: Sequence[Query], depth: int) -> list[list[tuple[int, float]]]:
        assert self.text_encoder is not None and self.store is not None
        live = [i for i, q in enumerate(queries) if q.text.strip()]
        res: list[list[tuple[int, float]]] = [[] for _ in queries]
        if not live:
            return res
        vecs = self.text_encoder.encode([queries[i].text for i in live])
        res_live = store_search(self.store, vecs, depth)
        for i, r in zip(live, res_live, strict=True):
            res[i] = r
        return res

    def _fuse(
        self, per: list[tuple[str, float, list[tuple[int, float]]]], k: int
    ) -> list[Evidence]:
        if not per:
            return []
        detail: dict[int, dict[str, float]] = {}
        for label, _, ranking in per:
            for row, score in ranking:
                detail.setdefault(row, {})[label] = round(float(score), 6)
        pinned: list[tuple[int, float]] = []
        for label, _, ranking in per:
            threshold = self.pin_thresholds.get(label)
            if threshold is not None:
                pinned += [(row, s) for row, s in ranking if s >= threshold]
        pinned.sort(key=lambda rs: -rs[1])
        pinned_rows: set[int] = set()
        unique: list[tuple[int, float]] = []
        for row, s in pinned:
            if row not in pinned_rows:
                pinned_rows.add(row)
                unique.append((row, s))
        pinned = unique
        if len(per) == 1:
            fused = per[0][2][: k + len(pinned)]
        else:
            fused = reciprocal_rank_fusion(
                [[row for row, _ in r] for _, _, r in per],
                k=self.config.retrieval.rrf_k,
                weights=[w for _, w, _ in per],
                limit=k + len(pinned),
            )
        ranked = pinned + [(row, s) for row, s in fused if row not in pinned_rows]
        return [
            self.to_evidence(
                self.items[row],
                float(score),
                {
                    "scores": detail.get(row, {}),
                    **({"fused": True} if len(per) > 1 else {}),
                    **({"pinned": True} if row in pinned_rows else {}),
                },
            )
            for row, score in ranked[:k]
        ]


def store_search(store: Any, vecs: np.ndarray, depth: int) -> list[list[tuple[int, float]]]:
    """Search a vector store; drop empty (-1) slots."""
    scores, ids = store.search(vecs, depth)
    return [
        [(int(i), float(s)) for s, i in zip(srow, irow, strict=True) if i >= 0]
        for srow, irow in zip(scores, ids, strict=True)
    ]


class TextKB(IndexedKB):
    """Passages (JSONL/CSV/Parquet with ``id``, ``title``, ``text``), optionally chunked.

    Evidence: ``text`` = the passage (or window), ``title`` = its title, ``metadata`` =
    ``doc_id`` (the source passage id), ``chunk``/``n_chunks`` when chunked, ``scores``.
    """

    config_type = TextKBConfig
    kb_modality = Modality.TEXT


# --------------------------------------------------------------------------- helpers


def _resolve(path: Path, base_dir: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def _join_title(title: str | None, text: str) -> str:
    return f"{title}\n{text}" if title else text


def _read_items(path: Path, manifest: IndexManifest) -> list[Item]:
    try:
        with path.open("r", encoding="utf-8") as fh:
            items = [Item.from_json(line) for line in fh if line.strip()]
    except (OSError, ValueError, TypeError) as e:
        raise IndexError_(
            f"index items {path} are missing or corrupt ({type(e).__name__}: {e}); "
            "rebuild with `kbrouter index --force`"
        ) from None
    if len(items) != manifest.n_items:
        raise IndexError_(
            f"index items {path} hold {len(items)} rows, the manifest says {manifest.n_items}; "
            "rebuild with `kbrouter index --force`"
        )
    return items


def _open_checked(
    open_store: Callable[..., Any], config: Any, dim: int, directory: Path, n: int
) -> Any:
    store = open_store(config.retrieval.store, dim, directory)
    if len(store) != n:
        raise IndexError_(
            f"KB {config.name!r}: vector store in {directory} holds {len(store)} vectors, "
            f"expected {n}; rebuild with `kbrouter index --force`"
        )
    return store


def _close(store: Any) -> None:
    close = getattr(store, "close", None)
    if callable(close):
        close()
