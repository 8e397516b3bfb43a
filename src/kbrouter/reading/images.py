"""Image identification: an image-to-image match names what the question's image shows.

A text-only model cannot compare pictures; it reads captions and, seen on the 0.5B model, often
names the wrong item ("Flag of Kenya" for a matched Australian flag). When the image KB matched
the question's image above its threshold (the evidence is ``pinned``), the matched item's title
identifies the entity, and a sub-question that only asks what the image shows can be answered
with it directly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kbrouter.types import Evidence, Modality, Retrieval

__all__ = ["IDENTIFY_QUESTION", "asks_what_image_shows", "identified_entity"]

#: the sub-question an identification step answers
IDENTIFY_QUESTION = "What does the image show?"

# a few words between the wh-word and "shown" ("Which country's flag is shown"), none of them
# starting a relative clause or a property ("... the capital of the country whose flag is shown")
_FEW = r"(?:(?!(?:whose|where|which|that|of|in|on|from)\b)[\w'’-]+\s+){0,4}"
_SHOWN = re.compile(
    r"^\s*(what|which|who)\s+" + _FEW + r"(shown|pictured|depicted|displayed|seen)\b"
    r"(\s+(in|on)\s+(the|this)\s+(image|picture|photo|photograph))?\s*[?.!]*\s*$",
    re.I,
)
_THIS = re.compile(r"^\s*(what|who|which)\s+(\w+\s+)?(is|are)\s+(this|these|it)\s*[?.!]*\s*$", re.I)
_SHOW = re.compile(r"\bwhat\s+(does|do)\s+(the|this)\s+(image|picture|photo)\s+show\b", re.I)
_IN_IMAGE = re.compile(
    r"^\s*(what|who|which)\s+" + _FEW + r"(in|on)\s+(the|this)\s+(image|picture|photo|photograph)"
    r"\s*[?.!]*\s*$",
    re.I,
)


def asks_what_image_shows(text: str) -> bool:
    """Whether a (sub-)question asks what its image shows ("Which monument is shown in this
    image?", "What is this?"), rather than something about it ("... famous for?")."""
    return any(p.search(text or "") for p in (_SHOWN, _THIS, _SHOW, _IN_IMAGE))


def identified_entity(retrievals: Sequence[Retrieval]) -> Evidence | None:
    """The image-KB item matched to the question's image above the KB's threshold (the best
    ``pinned`` hit of an image query), or None."""
    best: Evidence | None = None
    for r in retrievals:
        if r.error or r.query.image is None:
            continue
        for ev in r.evidence:
            if ev.modality == Modality.IMAGE and ev.metadata.get("pinned") and ev.title:
                if best is None or ev.score > best.score:
                    best = ev
                break
    return best
