"""Progress events a policy emits while it answers a question (for live traces).

The engine passes an optional ``on_event`` callback; policies call ``rt.emit(event)`` (when the
runtime has ``emit``) and never print. The event type is part of the shared vocabulary
(:class:`kbrouter.types.TraceEvent`); it is re-exported here for the engine's callers.
"""

from __future__ import annotations

from kbrouter.types import EventCallback, EventKind, TraceEvent

__all__ = ["EventCallback", "EventKind", "TraceEvent"]
