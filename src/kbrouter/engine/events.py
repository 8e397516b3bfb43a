"""Progress events a policy emits while it answers a question (for live traces).

The engine passes an optional ``on_event`` callback; policies call ``rt.emit(event)`` (when the
runtime has ``emit``) and never print. Events carry references to the trajectory's objects, so
a consumer must treat them as read-only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from kbrouter.types import Question, Step, Trajectory

EventKind = Literal["route", "retrieve", "sub_answer", "final", "note"]


@dataclass(frozen=True)
class TraceEvent:
    """One thing that just happened.

    ``route``: ``step.action`` (and ``step.route_calls``) are set; ``retrieve``:
    ``step.retrievals``; ``sub_answer``: ``step.sub_answer``; ``final``: ``trajectory`` is
    complete; ``note``: ``message`` says something unusual happened (retry, fallback, error).
    """

    kind: EventKind
    question: Question
    step: Step | None = None
    trajectory: Trajectory | None = None
    message: str = ""
    index: int | None = field(default=None)
    """Position of the question in an ``answer_many`` batch (None for ``answer``)."""


EventCallback = Callable[[TraceEvent], None]
