"""The replay cache: model calls and retrievals keyed by their exact inputs, on disk.

Keys are the sha256 of the canonical JSON (sorted keys, no spaces) of everything that
determines the result: for a model call the model's content identity (``ChatModel.identity``: a
GGUF's or checkpoint's sha256 and the settings that change outputs, never a path or a thread
count), the messages (image parts by file content hash) and the effective sampling parameters;
for a retrieval the KB name, its index manifest id (when the KB exposes a manifest), the query
(image by content hash) and ``k``. Values are the JSON of the
:class:`~kbrouter.types.ChatResult` / evidence list. Failed calls are never stored, so a re-run
retries them.

Storage is one SQLite file (``cache.sqlite`` in the cache dir, WAL mode) so concurrent runs can
share it. Re-running the same questions with the same cache replays every call: identical
trajectories, no model or index work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from kbrouter.files import file_sha256
from kbrouter.types import ChatMessage, ChatResult, Evidence, ImagePart, Query, SamplingParams

log = logging.getLogger(__name__)

_EVIDENCE_LIST = TypeAdapter(list[Evidence])


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, compact separators, non-ASCII kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class FileHasher:
    """Content hashes of image files, memoised by (path, size, mtime)."""

    def __init__(self) -> None:
        self._memo: dict[tuple[str, int, int], str] = {}

    def __call__(self, path: Path | None) -> str | None:
        if path is None:
            return None
        p = Path(path)
        try:
            st = p.stat()
        except OSError:
            return f"missing:{p}"
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        digest = self._memo.get(key)
        if digest is None:
            digest = file_sha256(p)
            self._memo[key] = digest
        return digest


def manifest_id(kb: object) -> str | None:
    """A stable id of the index a KB serves, if it exposes its manifest (else None).

    Creation time, build duration and library versions are left out, so rebuilding from the
    same sources and config keeps the id.
    """
    manifest = getattr(kb, "manifest", None)
    if manifest is None or not hasattr(manifest, "model_dump"):
        return None
    data = manifest.model_dump(mode="json", exclude={"created", "build_seconds", "versions"})
    return sha256_text(canonical_json(data))[:16]


def chat_key(
    model: dict[str, Any], messages: list[ChatMessage], params: SamplingParams, hasher: FileHasher
) -> str:
    msgs = []
    for m in messages:
        if isinstance(m.content, str):
            content: Any = m.content
        else:
            content = [
                {"image": hasher(p.path)} if isinstance(p, ImagePart) else {"text": p.text}
                for p in m.content
            ]
        msgs.append({"role": m.role, "content": content})
    payload = {
        "kind": "chat",
        "model": model,
        "messages": msgs,
        "params": params.model_dump(mode="json"),
    }
    return sha256_text(canonical_json(payload))


def search_key(kb: str, manifest: str | None, query: Query, k: int, hasher: FileHasher) -> str:
    payload = {
        "kind": "search",
        "kb": kb,
        "manifest": manifest,
        "query": {"text": query.text, "image": hasher(query.image)},
        "k": k,
    }
    return sha256_text(canonical_json(payload))


class ReplayCache:
    """An on-disk key/value store of model results and retrieval results.

    Args:
        directory: the cache folder (created if missing); the data is in ``cache.sqlite``.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "cache.sqlite"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, kind TEXT, value TEXT)"
        )
        self.hits = 0
        self.misses = 0

    def _get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return row[0]

    def _put(self, key: str, kind: str, value: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO entries (key, kind, value) VALUES (?, ?, ?)",
                (key, kind, value),
            )

    def get_chat(self, key: str) -> ChatResult | None:
        raw = self._get(key)
        if raw is None:
            return None
        try:
            return ChatResult.model_validate_json(raw)
        except ValueError:
            log.warning("ignoring a corrupt chat cache entry %s", key[:12])
            return None

    def put_chat(self, key: str, result: ChatResult) -> None:
        self._put(key, "chat", result.model_dump_json())

    def get_search(self, key: str) -> tuple[list[Evidence], float] | None:
        raw = self._get(key)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return _EVIDENCE_LIST.validate_python(data["evidence"]), float(data["seconds"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a corrupt search cache entry %s", key[:12])
            return None

    def put_search(self, key: str, evidence: list[Evidence], seconds: float) -> None:
        value = {"evidence": _EVIDENCE_LIST.dump_python(evidence, mode="json"), "seconds": seconds}
        self._put(key, "search", json.dumps(value, ensure_ascii=False))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
