"""Server-sent events of one answer, built from the engine's trace events.

Order per question: ``step_start`` (a step begins: its index), ``route`` (the sub-question, the
chosen KBs and who decided, from the step's notes), ``retrieval`` (one per KB searched: its
evidence with id, score, title, text, and an image URL or the table), ``sub_answer``,
``step_end`` (the step's tokens and seconds); ``note`` whenever something unusual happens (a
retry, a fallback, an error); then ``final`` (the answer, the whole trajectory and the viewer's
``view`` of it) or ``error``. Every event carries the question
id and the step index (None outside a step).
"""

from __future__ import annotations

from typing import Any

from kbrouter.types import Evidence, Step, TraceEvent, Trajectory

__all__ = ["EVENT_ORDER", "evidence_json", "sse_events", "step_cost", "trajectory_view"]

EVENT_ORDER = (
    "step_start",
    "route",
    "retrieval",
    "sub_answer",
    "step_end",
    "note",
    "final",
    "error",
)


def evidence_json(ev: Evidence, image_url: str | None = None) -> dict[str, Any]:
    """What a client needs to show one evidence item (no server paths)."""
    out: dict[str, Any] = {
        "kb": ev.kb,
        "id": ev.id,
        "score": ev.score,
        "title": ev.title,
        "text": ev.text,
        "modality": ev.modality.value,
    }
    if ev.table is not None:
        out["table"] = ev.table.model_dump(mode="json")
    if ev.image_path is not None and image_url is not None:
        out["image_url"] = image_url
    if ev.metadata.get("pinned"):
        out["image_match"] = True
    return out


def step_cost(step: Step) -> dict[str, Any]:
    """Tokens and seconds of one step's model calls and retrievals."""
    calls = [*step.route_calls, *step.read_calls]
    if step.answer_call is not None:
        calls.append(step.answer_call)
    tokens = sum(c.prompt_tokens + c.completion_tokens for c in calls)
    seconds = sum(c.seconds for c in calls) + sum(r.seconds for r in step.retrievals)
    return {"tokens": tokens, "seconds": round(seconds, 3)}


def trajectory_view(
    traj: Trajectory, image_url: Any = lambda ev: None, golds: list[str] | None = None
) -> dict[str, Any]:
    """A trajectory as the trace viewer shows it: per step the route (think, sub-question,
    KBs, who decided), the retrievals' evidence (no server paths: images by URL), the
    sub-answer, notes, tokens and seconds; then the answer. The question image is only a flag.
    """
    steps = []
    for step in traj.steps:
        a = step.action
        route = None
        if a is not None:
            route = {
                "think": a.think,
                "sub_question": a.sub_question,
                "kbs": a.kbs,
                "stop": a.is_stop,
                "decided_by": _who_decided(step),
            }
        steps.append(
            {
                "index": step.index,
                "route": route,
                "retrievals": [
                    {
                        "kb": r.kb,
                        "query": r.query.text,
                        "error": r.error,
                        "evidence": [evidence_json(e, image_url(e)) for e in r.evidence],
                    }
                    for r in step.retrievals
                ],
                "sub_answer": step.sub_answer,
                "notes": list(step.notes),
                **step_cost(step),
            }
        )
    calls = traj.model_calls()
    return {
        "question": traj.question.text,
        "has_image": traj.question.image is not None,
        "method": traj.method,
        "steps": steps,
        "answer": traj.answer,
        "stop_reason": traj.stop_reason,
        "error": traj.error,
        "tokens": sum(c.prompt_tokens + c.completion_tokens for c in calls),
        "seconds": traj.seconds,
        "golds": golds,
    }


def _who_decided(step: Step) -> str:
    for note in step.notes:
        for marker, who in (
            ("route by learned router", "learned-router"),
            ("learned router overrode", "learned-router"),
            ("learned router vetoed", "learned-router"),
            ("route by oracle", "oracle"),
            ("random KB", "random"),
            ("route by LLM", "llm"),
        ):
            if marker in note:
                return who
    return "llm" if step.route_calls else "policy"


class _Stream:
    """Turns the trace events of one question into SSE events (tracks step boundaries)."""

    def __init__(self, qid: str, image_url: Any) -> None:
        self.qid = qid
        self.image_url = image_url
        self.open_step: int | None = None
        self.step: Step | None = None

    def _ev(self, kind: str, step: int | None, data: dict[str, Any]) -> dict[str, Any]:
        return {"event": kind, "data": {"question_id": self.qid, "step": step, **data}}

    def events(self, te: TraceEvent) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        step = te.step
        index = step.index if step is not None else None
        if index is not None and index != self.open_step:
            out += self.close()
            out.append(self._ev("step_start", index, {}))
            self.open_step = index
        if step is not None:
            self.step = step
        if te.kind == "route" and step is not None and step.action is not None:
            a = step.action
            out.append(
                self._ev(
                    "route",
                    index,
                    {
                        "think": a.think,
                        "sub_question": a.sub_question,
                        "kbs": a.kbs,
                        "stop": a.is_stop,
                        "decided_by": _who_decided(step),
                    },
                )
            )
        elif te.kind == "retrieve" and step is not None:
            for r in step.retrievals:
                out.append(
                    self._ev(
                        "retrieval",
                        index,
                        {
                            "kb": r.kb,
                            "query": r.query.text,
                            "error": r.error,
                            "evidence": [evidence_json(e, self.image_url(e)) for e in r.evidence],
                        },
                    )
                )
        elif te.kind == "sub_answer" and step is not None:
            out.append(self._ev("sub_answer", index, {"sub_answer": step.sub_answer}))
            out += self.close()
        elif te.kind == "note":
            out.append(self._ev("note", index, {"message": te.message}))
        return out

    def close(self) -> list[dict[str, Any]]:
        if self.open_step is None:
            return []
        index, self.open_step = self.open_step, None
        cost = step_cost(self.step) if self.step is not None else {}
        return [self._ev("step_end", index, cost)]

    def final(self, traj: Trajectory) -> list[dict[str, Any]]:
        data = {
            "answer": traj.answer,
            "stop_reason": traj.stop_reason,
            "error": traj.error,
            "trajectory": traj.model_dump(mode="json"),
            "view": trajectory_view(traj, self.image_url),
        }
        return [*self.close(), self._ev("final", None, data)]


def sse_events(qid: str, image_url: Any = lambda ev: None) -> _Stream:
    """A converter for one question's events (``image_url(evidence)`` names served images)."""
    return _Stream(qid, image_url)
