"""File helpers every layer shares: one JSONL reader, one file hasher, one atomic writer.

:func:`iter_jsonl` reads JSON Lines with errors that name the file and line (missing file,
unreadable file, text that is not UTF-8, a line that is not JSON or not an object), raised as
the caller's error class or, for a line, handed to a callback so one bad row fails only
itself. :func:`file_sha256` is the streamed SHA-256 of a file (``hashlib.file_digest``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kbrouter.errors import DataError, KBRouterError

__all__ = ["atomic_write_text", "file_sha256", "iter_jsonl"]


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file, streamed."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def iter_jsonl(
    path: str | Path,
    *,
    what: str = "file",
    error: type[KBRouterError] = DataError,
    objects: bool = True,
    on_bad_line: Callable[[int, str], None] | None = None,
) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line of a JSON Lines file.

    Args:
        path: the file.
        what: what the file is, for the not-found message ("dataset file", "step file").
        error: the error class raised (a :class:`~kbrouter.errors.KBRouterError`).
        objects: require each line to be a JSON object.
        on_bad_line: called with ``(line number, problem)`` for a line that is not valid JSON
            (or not an object) instead of raising, so the caller can skip and record it.

    Raises:
        ``error``: the file is missing or unreadable, its text is not UTF-8 (with the line), or
        a line is bad and there is no ``on_bad_line``.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        fh = path.open("rb")  # decoded line by line, so a decoding error names its line
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise error(
                    f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                    "line); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            problem = None
            try:
                value = json.loads(line)  # Python's json accepts Dyn-VQA's bare NaN
            except json.JSONDecodeError as e:
                problem = f"invalid JSON ({e.msg} at column {e.colno})"
            else:
                if objects and not isinstance(value, dict):
                    problem = f"expected a JSON object, got {type(value).__name__}"
            if problem is None:
                yield lineno, value
            elif on_bad_line is not None:
                on_bad_line(lineno, problem)
            else:
                raise error(f"{path}:{lineno}: {problem}")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so
    a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
