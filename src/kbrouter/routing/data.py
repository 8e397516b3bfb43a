"""Routing samples: one decision state and the label a router should give it.

A dataset question with gold KBs ``[k1, k2]`` gives three samples: step 0 (nothing retrieved)
labelled ``k1``, step 1 (``k1`` retrieved) labelled ``k2``, step 2 labelled ``none`` (answer
now). A router step sample (a teacher's decision) gives one state labelled with the teacher's KB
or ``none``, twice when the teacher also wrote a sub-question: with and without it, so one
router serves both the LLM-free loop and hybrid routing.

Labels are KB names of the user's ``kbs.toml``: :class:`LabelResolver` maps configured names,
aliases, the paper's retriever names ("Text Retriever", "Table Retriever", "Text Image
Retriever") and mkqa-mini's kinds (``text``/``image``/``table``) to them, and rejects anything
else with :class:`~kbrouter.errors.UnknownKBError`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from kbrouter.errors import UnknownKBError
from kbrouter.types import NONE_LABEL, KBInfo, Modality, RouteState, kb_key

__all__ = ["LabelResolver", "RouteSample", "gold_path_samples", "samples_hash"]

_PAPER_NAMES = {
    kb_key("Text Retriever"): Modality.TEXT,
    kb_key("Table Retriever"): Modality.TABLE,
    kb_key("Text Image Retriever"): Modality.IMAGE,
    kb_key("Image Retriever"): Modality.IMAGE,
}


class RouteSample(BaseModel):
    """One routing decision to learn or score."""

    model_config = ConfigDict(extra="forbid")

    state: RouteState
    label: str = Field(description="A configured KB name or 'none'.")
    group: str = Field(description="Question / trajectory id: splits never separate a group.")
    source: str = Field("", description="Dataset or sub-source, for stratified reports.")
    origin: str = Field("gold", description="'gold' (gold KBs in hop order) or 'steps'.")
    history: list[tuple[str, str]] = Field(
        default_factory=list,
        description="(sub-question, answer) of the earlier hops when known: what a teacher-"
        "forced LLM router is shown. Not a feature of the learned router.",
    )


class LabelResolver:
    """Maps KB names as data spell them to the configured KB names (or ``none``)."""

    def __init__(self, kbs: Sequence[KBInfo]) -> None:
        if not kbs:
            raise ValueError("a LabelResolver needs at least one configured KB")
        self.kbs = list(kbs)
        self.names = [kb.name for kb in self.kbs]
        self._by_name = {kb_key(n): kb.name for kb in self.kbs for n in [kb.name, *kb.aliases]}
        by_modality: dict[Modality, list[str]] = {}
        for kb in self.kbs:
            by_modality.setdefault(kb.modality, []).append(kb.name)
        self._by_modality = {m: v[0] for m, v in by_modality.items() if len(v) == 1}

    @property
    def labels(self) -> list[str]:
        """The label set: configured KB names in config order, then ``none``."""
        return [*self.names, NONE_LABEL]

    def __call__(self, name: str) -> str:
        key = kb_key(name)
        if key in ("", NONE_LABEL, "none."):
            return NONE_LABEL
        if key in self._by_name:
            return self._by_name[key]
        modality = _PAPER_NAMES.get(key)
        if modality is None and key in {m.value for m in Modality}:
            modality = Modality(key)
        if modality is not None and modality in self._by_modality:
            return self._by_modality[modality]
        raise UnknownKBError(name, self.names)


def gold_path_samples(
    group: str,
    question: str,
    gold_kbs: Sequence[str],
    *,
    has_image: bool,
    resolve: LabelResolver,
    source: str = "",
) -> list[RouteSample]:
    """The states along a gold KB path: hop ``i`` labelled ``gold_kbs[i]``, then ``none``."""
    gold = [resolve(k) for k in gold_kbs]
    if NONE_LABEL in gold:
        raise UnknownKBError("none", resolve.names)
    out = []
    for i in range(len(gold) + 1):
        out.append(
            RouteSample(
                state=RouteState(question=question, has_image=has_image, step=i, prev_kbs=gold[:i]),
                label=gold[i] if i < len(gold) else NONE_LABEL,
                group=group,
                source=source,
                origin="gold",
            )
        )
    return out


def samples_hash(samples: Iterable[RouteSample]) -> str:
    """sha256 over the samples' JSON, order-independent (recorded in router manifests)."""
    lines = sorted(json.dumps(s.model_dump(mode="json"), sort_keys=True) for s in samples)
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
