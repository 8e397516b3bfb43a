"""Error attribution: for each question, the first stage of the pipeline that failed.

Stages, in pipeline order (a question is charged to the first one that failed):

``correct``
    The final answer scores at least ``correct_at`` F1-Recall (default 0.5).
``format``
    No usable final answer: the run hit an error, the loop gave up on malformed replies
    (``format_fallback``), or the answer is empty.
``routing``
    Gold hop ``i``'s KB was never searched, although the method went on retrieving (it searched
    other KBs instead).
``early_stop``
    The method stopped (answered) before the gold hops were covered, including answering
    without any retrieval.
``budget``
    The step budget ran out before the gold hops were covered.
``retrieval``
    The gold KB of a hop was searched, but the hop's gold evidence was not among the evidence
    shown to the model (the top-k of each search).
``reading``
    Every hop's gold evidence was shown, yet the answer is wrong.
``retrieval_or_reading``
    Routing was right but the dataset has no gold evidence ids, so a retrieval failure cannot
    be told from a reading failure.
``unattributed``
    The question has no gold KBs: only ``correct`` / ``format`` can be told.

Hops are matched to retrieval steps in order: hop ``i`` is covered by the first retrieval step
after hop ``i-1``'s that searched its gold KB, or by any step that showed its gold evidence (so
one all-KB step that happens to show both hops' evidence covers both). Evidence is compared by
source document (``metadata["doc_id"]``, else the id up to ``#``), so a passage window or a
table's row block counts as its passage or table.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from kbrouter.eval.metrics import f1_recall
from kbrouter.types import Evidence, Trajectory, kb_key

__all__ = [
    "STAGES",
    "Attribution",
    "attribute",
    "attribute_record",
    "evidence_doc_id",
    "summarize_attribution",
]

Stage = Literal[
    "correct",
    "format",
    "routing",
    "early_stop",
    "budget",
    "retrieval",
    "reading",
    "retrieval_or_reading",
    "unattributed",
]
STAGES: tuple[str, ...] = (
    "correct",
    "routing",
    "retrieval",
    "reading",
    "early_stop",
    "budget",
    "format",
    "retrieval_or_reading",
    "unattributed",
)
"""Report order of the stages."""

FAILURES = frozenset(STAGES) - {"correct"}


class Attribution(BaseModel):
    """Where one question's answer went wrong (or ``correct``)."""

    model_config = ConfigDict(extra="forbid")

    stage: Stage
    hop: int | None = None
    """1-based gold hop at which the failure happened (routing/retrieval/early stop/budget)."""
    detail: str = ""
    final_only: bool | None = None
    """Reading failures: True when a sub-answer already had the gold answer and only the final
    answer lost it; None when not applicable."""


def evidence_doc_id(ev: Evidence | dict[str, Any]) -> str:
    """The source document an evidence item comes from (:attr:`Evidence.doc_id`), also for an
    item stored as JSON."""
    if isinstance(ev, Evidence):
        return ev.doc_id
    meta, eid = ev.get("metadata") or {}, str(ev.get("id", ""))
    doc = meta.get("doc_id") if isinstance(meta, dict) else None
    return str(doc) if doc else eid.split("#", 1)[0]


def attribute(
    traj: Trajectory,
    golds: Sequence[str],
    gold_kbs: Sequence[str] | None,
    gold_evidence: Sequence[str] | None = None,
    *,
    top_k: int | None = None,
    correct_at: float = 0.5,
    paper_compat: bool = False,
    score: float | None = None,
) -> Attribution:
    """The first failed stage of ``traj`` (see the module docstring).

    Args:
        traj: the trajectory (its steps' retrievals and the final answer).
        golds: gold answers.
        gold_kbs: gold KB names in hop order (configured names), or None if unknown.
        gold_evidence: gold evidence document ids, one per hop, or None if unknown.
        top_k: evidence items per search that were shown to the model (default: the engine
            setting recorded in ``traj.config``, else all returned items).
        correct_at: F1-Recall at or above which the answer counts as correct.
        paper_compat: score in the released code's mode.
        score: the answer's F1-Recall if already computed (else computed from ``golds``).
    """
    if score is None:
        score = f1_recall(traj.answer, golds, paper_compat)
    if score >= correct_at:
        return Attribution(stage="correct")
    if traj.error or traj.stop_reason == "error":
        return Attribution(stage="format", detail=f"run error: {traj.error or 'error'}")
    if traj.final_call is not None and traj.final_call.error:
        return Attribution(stage="format", detail=f"final call failed: {traj.final_call.error}")
    if traj.stop_reason == "format_fallback":
        return Attribution(stage="format", detail="gave up on malformed model replies")
    if not traj.answer.strip():
        return Attribution(stage="format", detail="empty final answer")
    if gold_kbs is None:
        return Attribution(stage="unattributed", detail="no gold KBs")
    if not gold_kbs:  # nothing needed looking up: the model did not know
        return Attribution(stage="reading", detail="no KB needed; answer wrong")
    if top_k is None:
        top_k = (traj.config.get("engine") or {}).get("top_k")
    steps: list[tuple[set[str], set[str]]] = []  # (KBs searched, doc ids shown) per step
    for step in traj.steps:
        if not step.retrievals:
            continue
        kbs = {kb_key(r.kb) for r in step.retrievals}
        shown = {
            evidence_doc_id(ev)
            for r in step.retrievals
            for ev in (r.evidence if top_k is None else r.evidence[:top_k])
        }
        steps.append((kbs, shown))
    evidence = list(gold_evidence) if gold_evidence else None
    if evidence is not None and len(evidence) != len(gold_kbs):
        evidence = None  # not one id per hop: cannot be matched hop by hop
    n = len(gold_kbs)
    pos = 0
    for i, kb in enumerate(map(kb_key, gold_kbs)):
        hop = i + 1
        gid = evidence[i] if evidence is not None else None
        if gid is not None:
            seen = [j for j, (_, shown) in enumerate(steps) if gid in shown]
            if seen:
                pos = max(pos, seen[0] + 1)
                continue
        match = next((j for j in range(pos, len(steps)) if kb in steps[j][0]), None)
        if match is None:
            if pos < len(steps):
                chosen = sorted(set().union(*(s[0] for s in steps[pos:])))
                return Attribution(
                    stage="routing",
                    hop=hop,
                    detail=f"hop {hop}/{n}: gold KB {kb!r} not searched (searched {chosen})",
                )
            if traj.stop_reason == "budget":
                return Attribution(
                    stage="budget",
                    hop=hop,
                    detail=f"hop {hop}/{n} not reached: the step budget ran out",
                )
            what = "answered without retrieving" if not steps else f"stopped after {len(steps)}"
            return Attribution(
                stage="early_stop", hop=hop, detail=f"hop {hop}/{n} not reached: {what}"
            )
        if gid is not None:
            return Attribution(
                stage="retrieval",
                hop=hop,
                detail=f"hop {hop}/{n}: KB {kb!r} searched but gold evidence {gid!r} not shown",
            )
        pos = match + 1
    if evidence is None:
        return Attribution(
            stage="retrieval_or_reading", detail="routing right; no gold evidence ids to tell"
        )
    final_only = any(
        s.sub_answer and f1_recall(s.sub_answer, golds, paper_compat) >= correct_at
        for s in traj.steps
    )
    return Attribution(
        stage="reading",
        detail="gold evidence shown, answer wrong"
        + ("; a sub-answer had it" if final_only else ""),
        final_only=final_only,
    )


def attribute_record(
    rec: dict[str, Any], gold_evidence: Sequence[str] | None = None, *, correct_at: float = 0.5
) -> Attribution | None:
    """The attribution of a stored result line (``results.jsonl``) from its trajectory; gold
    evidence from the line unless given. None if the line has no trajectory."""
    if not rec.get("trajectory"):
        return None
    traj = Trajectory.model_validate(_with_messages(rec["trajectory"]))
    return attribute(
        traj,
        rec.get("golds") or [],
        rec.get("gold_kbs"),
        gold_evidence if gold_evidence is not None else rec.get("gold_evidence"),
        correct_at=correct_at,
        score=(rec.get("scores") or {}).get("f1_recall"),
    )


def _with_messages(traj: dict[str, Any]) -> dict[str, Any]:
    """A stored trajectory with the prompt messages put back as empty lists where a run kept
    no messages (``keep_messages=False``), so it validates."""

    def call(c: Any) -> Any:
        return {"messages": [], **c} if isinstance(c, dict) else c

    steps = [
        {
            **st,
            "route_calls": [call(c) for c in st.get("route_calls", [])],
            "answer_call": call(st.get("answer_call")),
        }
        for st in traj.get("steps", [])
    ]
    return {**traj, "steps": steps, "final_call": call(traj.get("final_call"))}


def summarize_attribution(
    records: Sequence[dict[str, Any]], gold_evidence: Mapping[str, Sequence[str]] | None = None
) -> dict[str, Any]:
    """Shares of each stage over result lines (overall and per source), plus what cannot be
    attributed. A line written without an attribution (an older run) is attributed from its
    trajectory, with gold evidence ids from ``gold_evidence`` (by question id) when given."""
    recs = []
    for r in records:
        if gold_evidence is not None and r.get("id") in gold_evidence:
            blame = attribute_record(r, gold_evidence[r["id"]])
            r = {**r, "attribution": None if blame is None else blame.model_dump(mode="json")}
        elif not r.get("attribution"):
            blame = attribute_record(r)
            r = {**r, "attribution": None if blame is None else blame.model_dump(mode="json")}
        if r.get("attribution"):
            recs.append(r)
    out: dict[str, Any] = {"questions": len(recs)}
    if not recs:
        return out

    def shares(rs: Sequence[dict[str, Any]]) -> dict[str, float]:
        c = Counter(r["attribution"]["stage"] for r in rs)
        return {s: c[s] / len(rs) for s in STAGES if c[s]}

    out["shares"] = shares(recs)
    out["counts"] = dict(Counter(r["attribution"]["stage"] for r in recs))
    failed = [r for r in recs if r["attribution"]["stage"] in FAILURES]
    out["failure_shares"] = shares(failed) if failed else {}
    reading = [r for r in recs if r["attribution"]["stage"] == "reading"]
    out["reading_final_only"] = sum(1 for r in reading if r["attribution"].get("final_only"))
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in recs:
        by_source[r.get("source", "?")].append(r)
    out["by_source"] = {
        s: {"questions": len(rs), "shares": shares(rs)} for s, rs in sorted(by_source.items())
    }
    cannot = []
    if out["counts"].get("retrieval_or_reading"):
        cannot.append("retrieval vs reading (no gold evidence ids)")
    if out["counts"].get("unattributed"):
        cannot.append("routing, retrieval and reading (no gold KBs)")
    out["not_attributable"] = cannot
    return out
