"""Word-window chunking of passages (the paper: 100-word windows with a stride of 50).

A passage no longer than one window is kept whole and keeps its id. A longer passage becomes
overlapping windows whose ids are ``<id>#<n>`` (``n`` from 0); the last window always ends at
the passage's last word, so no words are lost and no window is a tiny tail.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    """One window of a source passage."""

    id: str
    doc_id: str
    index: int
    """Position of this window within its passage (0-based)."""
    n_chunks: int
    title: str
    text: str


def word_windows(text: str, words: int = 100, stride: int = 50) -> list[str]:
    """Split ``text`` into windows of ``words`` words starting every ``stride`` words.

    Whitespace is normalised to single spaces. Text of at most ``words`` words gives one
    window; an empty text gives one empty window (callers decide whether to keep it).
    """
    if words <= 0 or stride <= 0:
        raise ValueError(f"words ({words}) and stride ({stride}) must be positive")
    if stride > words:
        raise ValueError(f"stride ({stride}) must not exceed words ({words})")
    toks = text.split()
    if len(toks) <= words:
        return [" ".join(toks)]
    out: list[str] = []
    start = 0
    while True:
        if start + words >= len(toks):
            # last window: aligned to the end so it is a full window
            out.append(" ".join(toks[len(toks) - words :]))
            break
        out.append(" ".join(toks[start : start + words]))
        start += stride
    return out


def chunk_id(doc_id: str, index: int, n_chunks: int) -> str:
    """The id of window ``index`` of a document split into ``n_chunks`` windows."""
    return doc_id if n_chunks == 1 else f"{doc_id}#{index}"


def chunk_passages(
    passages: Iterable[tuple[str, str, str]], words: int = 100, stride: int = 50
) -> list[Chunk]:
    """Chunk ``(id, title, text)`` passages into :class:`Chunk` windows (titles repeated)."""
    chunks: list[Chunk] = []
    for doc_id, title, text in passages:
        wins = word_windows(text, words, stride)
        n = len(wins)
        for i, w in enumerate(wins):
            chunks.append(Chunk(chunk_id(doc_id, i, n), doc_id, i, n, title, w))
    return chunks
