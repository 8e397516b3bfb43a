"""The KB registry: every configured knowledge base by name, built and opened on demand.

::

    reg = KBRegistry.from_config("kbs.toml")
    reg.build()                                   # no-op for indexes that are up to date
    hits = reg.search("Text Retriever", [Query(text="Who wrote Dune?")], k=5)

Names resolve case- and space-insensitively over names and aliases. KBs are opened lazily on
first use; KBs configured with the same encoder name share one loaded encoder. Opening an index
that no longer matches its config, sources or encoder raises
:class:`~kbrouter.errors.StaleIndexError` (``on_stale="error"``, the default) or rebuilds it
(``on_stale="rebuild"``); it never returns results from a mismatched index.

Indexes live in ``<index_dir>/<kb name>/`` and are replaced atomically (see
:mod:`kbrouter.kb.manifest`); building the same KB from two processes at once is not supported
(the second build removes the first one's temporary folder). An opened KB is cached by the
registry and does not notice a rebuild made by another process; open a new registry for that.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kbrouter.config import ImageKBConfig, RegistryConfig, TableKBConfig, load_registry_config
from kbrouter.encoders.base import ImageEncoder, TextEncoder
from kbrouter.errors import IndexError_, KBRouterError, StaleIndexError, UnknownKBError
from kbrouter.kb.base import KBInfo, KnowledgeBase
from kbrouter.kb.manifest import (
    IndexManifest,
    read_manifest,
    recover_directory,
    remove_leftovers,
    staleness,
)
from kbrouter.kb.text import BuildProgress, BuildResult, IndexedKB, TextKB
from kbrouter.types import Evidence, Query, kb_key

logger = logging.getLogger(__name__)

IndexState = Literal["missing", "fresh", "stale", "corrupt"]


@dataclass
class IndexStatus:
    """The state of one KB's persisted index."""

    kb: str
    state: IndexState
    directory: Path
    reasons: list[str] = field(default_factory=list)
    manifest: IndexManifest | None = None


@dataclass
class BuildReport:
    """The outcome of :meth:`KBRegistry.build` for every KB it looked at."""

    results: list[BuildResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[BuildResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed


def kb_class(cfg: Any) -> type[IndexedKB]:
    """The KB implementation for a KB config."""
    from kbrouter.kb.image import ImageKB
    from kbrouter.kb.table import TableKB

    if isinstance(cfg, ImageKBConfig):
        return ImageKB
    if isinstance(cfg, TableKBConfig):
        return TableKB
    return TextKB


def _dir_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "kb"
    if safe != name:
        safe += "-" + hashlib.sha1(name.encode("utf-8")).hexdigest()[:6]
    return safe


class RichBuildProgress(BuildProgress):
    """Index-build progress as rich progress bars (one line per KB stage)."""

    def __init__(self, console: Any = None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[kb]}[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task: Any = None

    def __enter__(self) -> RichBuildProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish()
        self._progress.stop()

    def _finish(self) -> None:
        if self._task is not None:
            task = self._progress.tasks[-1]
            total = task.total if task.total is not None else 1
            self._progress.update(self._task, total=total, completed=total)
            self._task = None

    def stage(self, kb: str, stage: str, total: int | None = None) -> None:
        self._finish()
        self._task = self._progress.add_task(stage, total=total, kb=kb)

    def advance(self, n: int = 1) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)


class KBRegistry:
    """All configured KBs.

    Args:
        config: the validated registry config.
        on_stale: what opening a missing, stale or corrupt index does: ``"error"`` raises
            (:class:`StaleIndexError` / :class:`IndexError_`), ``"rebuild"`` builds it first.
        device: torch device for encoders.
        text_encoder_loader / image_encoder_loader: ``name -> encoder`` (default: the packaged
            loaders); each name is loaded once per registry and shared by all its KBs.
    """

    def __init__(
        self,
        config: RegistryConfig,
        *,
        on_stale: Literal["error", "rebuild"] = "error",
        device: str = "cpu",
        text_encoder_loader: Callable[[str], TextEncoder] | None = None,
        image_encoder_loader: Callable[[str], ImageEncoder] | None = None,
    ) -> None:
        self.config = config
        self.on_stale = on_stale
        self.device = device
        self._text_loader = text_encoder_loader
        self._image_loader = image_encoder_loader
        self._by_name = {kb.name: kb for kb in config.kb}
        self._keys: dict[str, str] = {}
        for kb in config.kb:
            for n in [kb.name, *kb.aliases]:
                key = kb_key(n)
                other = self._keys.get(key)
                if other is not None and other != kb.name:
                    from kbrouter.errors import ConfigError

                    raise ConfigError(
                        f"KB names {other!r} and {kb.name!r}: {n!r} is ambiguous "
                        "(names are matched ignoring case and spaces)"
                    )
                self._keys[key] = kb.name
        self._open: dict[str, KnowledgeBase] = {}
        self._text_encoders: dict[str, TextEncoder] = {}
        self._image_encoders: dict[str, ImageEncoder] = {}
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, config: str | Path | RegistryConfig, **kwargs: Any) -> KBRegistry:
        """A registry from a ``kbs.toml`` path or an already validated config."""
        if not isinstance(config, RegistryConfig):
            config = load_registry_config(config)
        return cls(config, **kwargs)

    # ------------------------------------------------------------------ names

    @property
    def infos(self) -> list[KBInfo]:
        """Name, description, modality and aliases of every KB (no index is opened)."""
        return [
            KBInfo(
                name=kb.name, description=kb.description, modality=kb.modality, aliases=kb.aliases
            )
            for kb in self.config.kb
        ]

    @property
    def names(self) -> list[str]:
        return [kb.name for kb in self.config.kb]

    def resolve(self, name: str) -> str:
        """The canonical KB name for a name or alias (case and spaces ignored)."""
        key = kb_key(name)
        if key in self._keys:
            return self._keys[key]
        known = [n for kb in self.config.kb for n in [kb.name, *kb.aliases]]
        raise UnknownKBError(name, known)

    def kb_config(self, name: str) -> Any:
        return self._by_name[self.resolve(name)]

    def index_dir(self, name: str) -> Path:
        """Where the index of KB ``name`` lives."""
        return self.config.index_path / _dir_name(self.resolve(name))

    # ------------------------------------------------------------------ encoders

    def text_encoder(self, name: str) -> TextEncoder:
        """The shared text encoder for a config encoder name (loaded on first use)."""

        def load(key: str) -> TextEncoder:
            if self._text_loader is not None:
                return self._text_loader(key)
            from kbrouter.encoders.text import load_text_encoder

            return load_text_encoder(key, device=self.device)

        return self._shared(self._text_encoders, name, load)

    def image_encoder(self, name: str) -> ImageEncoder:
        """The shared image encoder for a config image-encoder name (loaded on first use)."""

        def load(key: str) -> ImageEncoder:
            if self._image_loader is not None:
                return self._image_loader(key)
            from kbrouter.encoders.image import load_image_encoder

            return load_image_encoder(key, device=self.device)

        return self._shared(self._image_encoders, name, load)

    def _shared(self, cache: dict[str, Any], name: str, load: Callable[[str], Any]) -> Any:
        """One encoder instance per name across KBs, loaded once under the registry lock."""
        key = name.strip()
        with self._lock:
            if key not in cache:
                cache[key] = load(key)
            return cache[key]

    def _encoders_for(self, cfg: Any) -> tuple[TextEncoder | None, ImageEncoder | None]:
        cls = kb_class(cfg)
        text = self.text_encoder(cfg.retrieval.encoder) if cls.needs_dense(cfg) else None
        img_name = cls.image_encoder_name(cfg)
        image = self.image_encoder(img_name) if img_name else None
        return text, image

    # ------------------------------------------------------------------ status / build

    def status(self, name: str) -> IndexStatus:
        """Whether KB ``name``'s index is missing, fresh, stale (with reasons) or corrupt."""
        canon = self.resolve(name)
        cfg = self._by_name[canon]
        directory = self.index_dir(canon)
        recover_directory(directory)
        if not directory.exists():
            return IndexStatus(canon, "missing", directory, ["index not built yet"])
        try:
            manifest = read_manifest(directory)
        except IndexError_ as e:
            return IndexStatus(canon, "corrupt", directory, [str(e)])
        cls = kb_class(cfg)
        digest, sources = cls.expected_state(cfg, self.config.base_dir, manifest)
        reasons = staleness(
            manifest,
            kb=canon,
            modality=cfg.modality,
            config_digest=digest,
            sources=sources,
            encoder=cfg.retrieval.encoder,
            needs_dense=cls.needs_dense(cfg),
            image_encoder=cls.image_encoder_name(cfg),
        )
        state: IndexState = "stale" if reasons else "fresh"
        return IndexStatus(canon, state, directory, reasons, manifest)

    def build(
        self,
        names: Sequence[str] | None = None,
        force: bool = False,
        progress: bool | BuildProgress = True,
        keep_going: bool = False,
    ) -> BuildReport:
        """Build the indexes of ``names`` (default: all KBs) that are missing or out of date.

        An up-to-date index is left alone (``status="up-to-date"``) unless ``force``. With
        ``keep_going`` a KB that fails is recorded (``status="failed"``) and the others are
        still built; otherwise the first error is raised.
        """
        t0 = time.perf_counter()
        canon = [self.resolve(n) for n in (names if names else self.names)]
        canon = list(dict.fromkeys(canon))
        report = BuildReport()
        if progress is True:
            with RichBuildProgress() as bar:
                self._build_all(canon, force, bar, keep_going, report)
        else:
            bar = progress if isinstance(progress, BuildProgress) else BuildProgress()
            self._build_all(canon, force, bar, keep_going, report)
        report.seconds = time.perf_counter() - t0
        return report

    def _build_all(
        self,
        names: list[str],
        force: bool,
        bar: BuildProgress,
        keep_going: bool,
        report: BuildReport,
    ) -> None:
        for name in names:
            try:
                report.results.append(self._build_one(name, force, bar))
            except KBRouterError as e:
                if not keep_going:
                    raise
                logger.error("building KB %s failed: %s", name, e)
                report.results.append(BuildResult(kb=name, status="failed", error=str(e)))

    def _build_one(self, name: str, force: bool, bar: BuildProgress) -> BuildResult:
        with self._lock:
            st = self.status(name)
            if st.state == "fresh" and not force:
                assert st.manifest is not None
                return BuildResult(
                    kb=name,
                    status="up-to-date",
                    n_items=st.manifest.n_items,
                    n_source_items=st.manifest.n_source_items,
                )
            reasons = ["forced"] if force and st.state == "fresh" else st.reasons
            cfg = self._by_name[name]
            remove_leftovers(st.directory)
            bar.stage(name, "loading encoders", None)
            text_enc, image_enc = self._encoders_for(cfg)
            result = kb_class(cfg).build(
                cfg,
                st.directory,
                self.config.base_dir,
                text_encoder=text_enc,
                image_encoder=image_enc,
                progress=bar,
                reasons=reasons,
            )
            result.status = "built" if st.state == "missing" else "rebuilt"
            self._open.pop(name, None)
            return result

    # ------------------------------------------------------------------ open / search

    def get(self, name: str) -> KnowledgeBase:
        """The opened KB (cached). Missing/stale/corrupt indexes: see ``on_stale``."""
        canon = self.resolve(name)
        with self._lock:
            kb = self._open.get(canon)
            if kb is not None:
                return kb
            kb = self._open_kb(canon)
            self._open[canon] = kb
            return kb

    def _open_kb(self, name: str) -> KnowledgeBase:
        st = self.status(name)
        if st.state != "fresh":
            if self.on_stale == "rebuild":
                logger.warning(
                    "KB %s index is %s (%s); rebuilding", name, st.state, "; ".join(st.reasons)
                )
                self._build_one(name, force=False, bar=BuildProgress())
                st = self.status(name)
            else:
                self._raise_for(st)
        cfg = self._by_name[name]
        text_enc, image_enc = self._encoders_for(cfg)
        try:
            return kb_class(cfg).open(
                cfg,
                st.directory,
                self.config.base_dir,
                text_encoder=text_enc,
                image_encoder=image_enc,
                manifest=st.manifest,
            )
        except IndexError_:
            if self.on_stale != "rebuild":
                raise
            logger.warning("KB %s index unusable; rebuilding", name)
            self._build_one(name, force=True, bar=BuildProgress())
            return kb_class(cfg).open(
                cfg,
                st.directory,
                self.config.base_dir,
                text_encoder=text_enc,
                image_encoder=image_enc,
            )

    def _raise_for(self, st: IndexStatus) -> None:
        hint = f"run `kbrouter index --kb {st.kb!r}`"
        if st.state == "missing":
            raise IndexError_(f"KB {st.kb!r} has no index at {st.directory}; {hint}")
        if st.state == "corrupt":
            raise IndexError_(f"KB {st.kb!r}: {st.reasons[0]}")
        raise StaleIndexError(
            f"KB {st.kb!r}: the index at {st.directory} is out of date: "
            + "; ".join(st.reasons)
            + f"; {hint} to rebuild it"
        )

    def search(
        self, name: str, queries: Sequence[Query | str], k: int | None = None
    ) -> list[list[Evidence]]:
        """Batched search of KB ``name``: one evidence list per query."""
        qs = [q if isinstance(q, Query) else Query(text=q) for q in queries]
        return self.get(name).search(qs, k)

    def close(self) -> None:
        """Close opened KBs' stores (Milvus connections) and drop cached objects."""
        with self._lock:
            for kb in self._open.values():
                for store in (getattr(kb, "store", None), getattr(kb, "image_store", None)):
                    close = getattr(store, "close", None)
                    if callable(close):
                        close()
            self._open.clear()
