"""Running policies on questions: concurrency, retrieval batching, replay cache, events."""

from kbrouter.engine.cache import ReplayCache
from kbrouter.engine.engine import Engine, EngineConfig
from kbrouter.engine.events import TraceEvent

__all__ = ["Engine", "EngineConfig", "ReplayCache", "TraceEvent"]
