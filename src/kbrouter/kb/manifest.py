"""Index manifests, staleness checks and atomic index directories.

Every persisted KB index is a directory holding the index files and ``manifest.json``
(:class:`IndexManifest`): the KB name and modality, the encoders (config name, stable id and
dimension), the item count, sha256 checksums of every source file, a hash of the
index-relevant configuration, library versions and the creation time.

Opening an index compares the manifest with the current config, sources and encoder
(:func:`staleness`); any difference makes the index *stale* — the registry then rebuilds it or
raises :class:`~kbrouter.errors.StaleIndexError`, never returns results from a mismatched
index. A missing or unreadable manifest raises :class:`~kbrouter.errors.IndexError_`.

Writes are atomic (:func:`atomic_directory`): an index is built in a temporary sibling
directory and renamed into place only once complete (the manifest is written last), so an
interrupted build leaves the previous index untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kbrouter.errors import IndexError_, StaleIndexError
from kbrouter.files import file_sha256
from kbrouter.types import Modality

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
"""Bumped whenever the on-disk layout or the text that is indexed changes."""

_LIBRARIES = (
    "kbrouter",
    "numpy",
    "faiss-cpu",
    "bm25s",
    "sentence-transformers",
    "torch",
    "pymilvus",
    "milvus-lite",
    "pillow",
)


class SourceFile(BaseModel):
    """A source file an index was built from."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """Path relative to the source root (the passage file's or manifest's folder)."""
    path: str
    """Absolute path at build time (informational)."""
    size: int
    mtime_ns: int
    sha256: str


class IndexManifest(BaseModel):
    """The facts an index was built from (``manifest.json``)."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    kb: str
    modality: Modality
    encoder: str | None = Field(None, description="Text encoder config name (None: BM25 only).")
    encoder_id: str | None = Field(None, description="The text encoder's stable name.")
    dim: int | None = None
    image_encoder: str | None = None
    image_encoder_id: str | None = None
    image_dim: int | None = None
    n_items: int = Field(..., description="Indexed items (chunks / table blocks / images).")
    n_source_items: int = Field(..., description="Source passages / tables / images.")
    bad_rows: int = 0
    sources: list[SourceFile]
    config_hash: str
    config: dict[str, Any] = Field(default_factory=dict, description="What config_hash covers.")
    versions: dict[str, str] = Field(default_factory=dict)
    created: str = ""
    build_seconds: float = 0.0


# --------------------------------------------------------------------------- fingerprints


def fingerprint_sources(
    files: Iterable[tuple[str, Path]], previous: Iterable[SourceFile] = ()
) -> list[SourceFile]:
    """Checksum ``(name, path)`` source files, sorted by name.

    A file whose absolute path, size and modification time equal an entry of ``previous``
    reuses its checksum (so checking a big unchanged corpus is cheap). A missing file gets
    ``sha256 = "missing"``.
    """
    cache = {(p.path, p.size, p.mtime_ns): p.sha256 for p in previous}
    out: list[SourceFile] = []
    for name, path in files:
        path = Path(path).resolve()
        try:
            st = path.stat()
        except OSError:
            out.append(
                SourceFile(name=name, path=str(path), size=-1, mtime_ns=-1, sha256="missing")
            )
            continue
        key = (str(path), st.st_size, st.st_mtime_ns)
        sha = cache.get(key) or file_sha256(path)
        out.append(
            SourceFile(
                name=name, path=str(path), size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=sha
            )
        )
    out.sort(key=lambda s: s.name)
    return out


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config``."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def library_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for lib in _LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    return out


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- read / write


def read_manifest(directory: Path) -> IndexManifest:
    """Read ``manifest.json``; missing or corrupt raises :class:`IndexError_`."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise IndexError_(
            f"index manifest not found: {path} (build the index with `kbrouter index`)"
        )
    try:
        return IndexManifest.model_validate_json(path.read_bytes())
    except (ValidationError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise IndexError_(
            f"index manifest {path} is corrupt ({first}); rebuild with `kbrouter index --force`"
        ) from None


def write_manifest(directory: Path, manifest: IndexManifest) -> None:
    path = Path(directory) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
    os.replace(tmp, path)


def staleness(
    manifest: IndexManifest,
    *,
    kb: str,
    modality: Modality,
    config_digest: str,
    sources: list[SourceFile],
    encoder: str | None = None,
    needs_dense: bool = True,
    image_encoder: str | None = None,
) -> list[str]:
    """Why ``manifest`` does not match the current setup (empty list: the index is fresh).

    Encoders are compared by config name here; :func:`check_encoder_identity` compares the
    loaded encoders' stable ids and dimensions when they are available.
    """
    reasons: list[str] = []
    if manifest.format_version != FORMAT_VERSION:
        reasons.append(f"index format {manifest.format_version} != current format {FORMAT_VERSION}")
    if manifest.kb != kb:
        reasons.append(f"index belongs to KB {manifest.kb!r}, not {kb!r}")
    if manifest.modality != modality:
        reasons.append(f"index modality {manifest.modality} != configured {modality}")
    if manifest.config_hash != config_digest:
        reasons.append("index-relevant configuration changed (config hash differs)")
    if needs_dense:
        if manifest.encoder is None:
            reasons.append("index has no dense vectors but the retrieval mode needs them")
        elif encoder is not None and manifest.encoder != encoder:
            reasons.append(f"text encoder changed: index {manifest.encoder!r}, config {encoder!r}")
    if manifest.image_encoder != image_encoder:
        reasons.append(
            f"image encoder changed: index {manifest.image_encoder!r}, config {image_encoder!r}"
        )
    old = {s.name: s.sha256 for s in manifest.sources}
    new = {s.name: s.sha256 for s in sources}
    changed = sorted(n for n in old.keys() & new.keys() if old[n] != new[n])
    added = sorted(new.keys() - old.keys())
    removed = sorted(old.keys() - new.keys())
    for label, names in (("changed", changed), ("added", added), ("removed", removed)):
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            reasons.append(f"source files {label}: {', '.join(names[:3])}{more}")
    return reasons


def check_encoder_identity(
    manifest: IndexManifest, encoder_id: str, dim: int, *, image: bool = False
) -> None:
    """Raise :class:`StaleIndexError` if a loaded encoder differs from the index's."""

    want_id = manifest.image_encoder_id if image else manifest.encoder_id
    want_dim = manifest.image_dim if image else manifest.dim
    what = "image encoder" if image else "text encoder"
    if want_id is not None and want_id != encoder_id:
        raise StaleIndexError(
            f"KB {manifest.kb!r}: the index was built with {what} {want_id!r} but {encoder_id!r} "
            "is loaded; rebuild with `kbrouter index --force`"
        )
    if want_dim is not None and want_dim != dim:
        raise StaleIndexError(
            f"KB {manifest.kb!r}: index vectors are {want_dim}-d but the {what} gives {dim}-d; "
            "rebuild with `kbrouter index --force`"
        )


# --------------------------------------------------------------------------- atomic dirs


def _siblings(target: Path, kind: str) -> list[Path]:
    parent = target.parent
    if not parent.is_dir():
        return []
    return sorted(parent.glob(f".{target.name}.{kind}-*"), key=lambda p: p.stat().st_mtime)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``target``; on success, swap it into place.

    On an exception the temporary directory is removed and ``target`` is untouched. The swap
    is two renames (old aside, new in) followed by deleting the old copy; a crash between the
    renames is repaired by :func:`recover_directory`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_directory(target: Path) -> bool:
    """Repair a swap interrupted between its two renames; True if something was restored."""
    target = Path(target)
    if target.exists():
        return False
    for old in reversed(_siblings(target, "old")):
        if (old / MANIFEST_FILE).is_file():
            os.rename(old, target)
            logger.warning("restored index %s from interrupted swap (%s)", target, old.name)
            return True
    return False


def remove_leftovers(target: Path) -> list[Path]:
    """Delete temporary/old siblings of ``target`` left by interrupted builds."""
    removed: list[Path] = []
    for kind in ("tmp", "old"):
        for p in _siblings(Path(target), kind):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        logger.info("removed %d leftover build directories next to %s", len(removed), target)
    return removed
