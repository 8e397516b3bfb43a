"""A relevance margin: show only the evidence that scored close to a search's best hit.

Small models read a list of evidence in order and often answer from a lower-ranked item. When
one hit clearly beats the rest (an image-to-image match at 0.95 against 0.05, a BM25 score three
times the next), the rest is noise. ``within_margin(evidence, margin)`` keeps the items whose
score is at least ``(1 - margin)`` times the best score of the same search (scores of different
KBs are not comparable, so the margin applies per retrieval); the best item always stays, and
items keep their order. Scores <= 0 (nothing to compare against) keep everything.
"""

from __future__ import annotations

from collections.abc import Sequence

from kbrouter.types import Evidence

__all__ = ["within_margin"]


def within_margin(evidence: Sequence[Evidence], margin: float) -> list[Evidence]:
    """The items of one search within ``margin`` (a fraction in [0, 1]) of its best score."""
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"a relevance margin is a fraction in [0, 1], not {margin}")
    items = list(evidence)
    if not items:
        return items
    best = max(e.score for e in items)
    if best <= 0:
        return items
    floor = best * (1.0 - margin)
    return [e for e in items if e.score >= floor]
