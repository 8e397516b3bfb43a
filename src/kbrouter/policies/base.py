"""The policy interface: a method (R1-Router, a baseline, a learned router) as a strategy.

A policy decides what to do for one question; the engine supplies a :class:`Runtime` through
which every model call and every retrieval goes. The runtime records nothing by itself — the
policy puts the returned :class:`~kbrouter.types.ModelCall` / :class:`~kbrouter.types.Retrieval`
objects into the :class:`~kbrouter.types.Step` objects of the trajectory it returns — but it
provides caching (replay), batching of retrievals across concurrent questions, error capture and
timing, so every method gets them for free and every method's trajectories are comparable.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from kbrouter.types import (
    ChatMessage,
    EventKind,
    KBInfo,
    ModelCall,
    Query,
    Question,
    Retrieval,
    SamplingParams,
    Step,
    TraceEvent,
    Trajectory,
)

Purpose = Literal["route", "sub_answer", "final", "generate", "read"]


class Runtime(Protocol):
    """What the engine offers a policy while it answers one question."""

    @property
    def kbs(self) -> list[KBInfo]:
        """The registry's KBs (names, descriptions, modalities, aliases), in config order."""
        ...

    @property
    def supports_images(self) -> bool:
        """Whether the model backend sees image parts."""
        ...

    @property
    def prompt_variant(self) -> str | None:
        """The router prompt variant the model that answers ``route`` calls was trained with (a
        trained model records it, e.g. in its GGUF metadata), or None."""
        ...

    @property
    def max_steps(self) -> int:
        """Retrieval-step budget for this run."""
        ...

    @property
    def top_k(self) -> int:
        """How many evidence items per KB a sub-answer prompt shows."""
        ...

    def resolve_kb(self, name: str) -> str:
        """Canonical KB name for a name or alias (case/space-insensitive).

        Raises :class:`~kbrouter.errors.UnknownKBError`.
        """
        ...

    async def chat(
        self, purpose: Purpose, messages: list[ChatMessage], params: SamplingParams | None = None
    ) -> ModelCall:
        """Call the model. Never raises for backend failures: the returned call has ``error``
        set and empty ``output`` so the policy can fall back and the trace says what happened."""
        ...

    async def retrieve(self, kb: str, query: Query, k: int | None = None) -> Retrieval:
        """Search one KB (batched with other concurrent questions). Never raises for search
        failures: ``error`` is set and ``evidence`` empty."""
        ...

    async def lookup(self, kb: str, doc_ids: Sequence[str], query: Query) -> Retrieval:
        """Fetch given source documents of one KB by id, recorded as a retrieval for ``query``
        (the gold-evidence bound). Never raises: unknown ids or KBs set ``error``."""
        ...


class Policy(ABC):
    """A question-answering method expressed over a :class:`Runtime`."""

    name: str = "policy"
    needs_gold: bool = False
    """True for bounds that route along a dataset's gold KBs (the harness calls ``set_gold``)."""

    needs_gold_evidence: bool = False
    """True for bounds that show a dataset's gold evidence (the harness calls
    ``set_gold_evidence``)."""

    def set_gold(self, gold: Mapping[str, Sequence[str] | None]) -> None:
        """Gold KB names in hop order by question id (only policies with ``needs_gold``)."""
        raise NotImplementedError(f"method {self.name!r} does not use gold KBs")

    def set_gold_evidence(self, gold: Mapping[str, Sequence[str] | None]) -> None:
        """Gold evidence ids in hop order by question id (policies with ``needs_gold_evidence``)."""
        raise NotImplementedError(f"method {self.name!r} does not use gold evidence")

    @abstractmethod
    async def run(self, question: Question, rt: Runtime) -> Trajectory:
        """Answer one question, returning its complete trajectory."""

    def describe(self) -> dict[str, Any]:
        """Config facts recorded with results."""
        return {"policy": self.name}

    # Live-trace helpers shared by every policy. Runtimes without ``emit`` get no events.

    @staticmethod
    def _emit(
        rt: Runtime,
        kind: EventKind,
        question: Question,
        *,
        step: Step | None = None,
        trajectory: Trajectory | None = None,
        message: str = "",
    ) -> None:
        emit = getattr(rt, "emit", None)
        if emit is not None:
            emit(
                TraceEvent(
                    kind=kind, question=question, step=step, trajectory=trajectory, message=message
                )
            )

    def _note(self, rt: Runtime, question: Question, step: Step | None, message: str) -> None:
        """Record something unusual: logged, kept in ``step.notes``, and emitted to the trace."""
        logging.getLogger(type(self).__module__).info(
            "%s: %s", question.id or question.text[:40], message
        )
        if step is not None:
            step.notes.append(message)
        self._emit(rt, "note", question, step=step, message=message)
