"""A relevance margin: show only the evidence that scored close to a search's best hit.

Small models read a list of evidence in order and often answer from a lower-ranked item. When
one hit clearly beats the rest (an image-to-image match at 0.95 against 0.05, a passage at cosine
0.73 against 0.25), the rest is noise. ``within_margin(evidence, margin)`` keeps the items whose
relevance is at least ``(1 - margin)`` times the best relevance of the same search (scores of
different KBs are not comparable, so the margin applies per retrieval); the search's first item
always stays, and items keep their order. Relevances <= 0 (nothing to compare against) keep
everything.

**Relevance** (:func:`relevance`) is the evidence score of a single ranking (a cosine, a BM25
score, an image-to-image similarity). A hybrid search fuses rankings by reciprocal rank, and an
RRF score says only where an item ranked (0.0328 for the first, 0.0323 for the second whatever
their content), so for fused evidence the relevance is the ``basis`` ranking's score (default
the dense cosine, ``metadata["scores"]["dense"]``; an item missing from that ranking counts 0).
An image-to-image match above the image KB's threshold (``metadata["pinned"]``) stands alone:
when a search's first item is one, only the pinned items stay, whatever the margin (the other
flags of a flag search are 0.5-0.6 similar to the question's image, against 0.95).
"""

from __future__ import annotations

from collections.abc import Sequence

from kbrouter.types import Evidence

__all__ = ["relevance", "within_margin"]

#: the ranking whose scores stand for relevance in a fused (hybrid) search
DEFAULT_BASIS = "dense"


def relevance(evidence: Evidence, basis: str = DEFAULT_BASIS) -> float:
    """The score the margin compares for one item: its own score from a single ranking, the
    ``basis`` ranking's score (0 when it is missing from that ranking) from a fused search."""
    meta = evidence.metadata or {}
    if not meta.get("fused"):
        return float(evidence.score)
    return float((meta.get("scores") or {}).get(basis, 0.0))


def within_margin(
    evidence: Sequence[Evidence], margin: float, basis: str = DEFAULT_BASIS
) -> list[Evidence]:
    """The items of one search within ``margin`` (a fraction in [0, 1]) of its best relevance
    (only its pinned items when the first one is pinned)."""
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"a relevance margin is a fraction in [0, 1], not {margin}")
    items = list(evidence)
    if not items:
        return items
    if items[0].metadata.get("pinned"):
        return [e for e in items if e.metadata.get("pinned")]
    rel = [relevance(e, basis) for e in items]
    best = max(rel)
    if best <= 0:
        return items
    floor = best * (1.0 - margin)
    return [e for i, (e, r) in enumerate(zip(items, rel, strict=True)) if i == 0 or r >= floor]
