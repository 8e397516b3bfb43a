"""The shared vocabulary every layer of kbrouter speaks.

Knowledge bases return :class:`Evidence`; model backends take :class:`ChatMessage` lists and
return :class:`ChatResult`; policies emit :class:`RouteAction`; the engine records
:class:`Step` objects into a :class:`Trajectory`. All of them are pydantic models, so they
validate on construction and round-trip through JSON (``model_dump_json`` /
``model_validate_json``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Modality(StrEnum):
    """The kind of items a knowledge base holds."""

    TEXT = "text"
    IMAGE = "image"
    TABLE = "table"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


_KB_KEY_SEPARATORS = re.compile(r"[\s_\-]+")


def kb_key(name: str) -> str:
    """The one normal form of a KB name, used wherever names are matched (config, registry,
    routing labels, rewards, datasets): case, spaces, ``_`` and ``-`` are ignored, so
    ``"Text Image Retriever"``, ``"text_image_retriever"`` and ``"TextImageRetriever"`` are one
    KB."""
    return _KB_KEY_SEPARATORS.sub("", str(name)).casefold()


# --------------------------------------------------------------------------- knowledge bases


class KBInfo(BaseModel):
    """What the router and the CLI know about a KB without opening its index."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    modality: Modality
    aliases: list[str] = []


# --------------------------------------------------------------------------- questions


class Question(_Model):
    """A user question: text plus an optional image (path on disk)."""

    text: str
    image: Path | None = None
    id: str | None = None


class Query(_Model):
    """What is sent to one knowledge base: a (sub-)question text and optionally an image."""

    text: str
    image: Path | None = None


# --------------------------------------------------------------------------- evidence


class Table(_Model):
    """A structured table: a header and rows of cell strings."""

    header: list[str]
    rows: list[list[str]]
    title: str | None = None

    def render(self, max_rows: int | None = None, max_cell_chars: int = 60) -> str:
        """Compact pipe-separated rendering for prompts."""

        def cell(v: str) -> str:
            v = " ".join(str(v).split())
            return v if len(v) <= max_cell_chars else v[: max_cell_chars - 1] + "…"

        rows = self.rows if max_rows is None else self.rows[:max_rows]
        lines = [" | ".join(cell(h) for h in self.header)]
        lines += [" | ".join(cell(c) for c in r) for r in rows]
        if max_rows is not None and len(self.rows) > max_rows:
            lines.append(f"... ({len(self.rows) - max_rows} more rows)")
        return "\n".join(lines)


class Evidence(_Model):
    """One retrieved item.

    ``text`` is what a language model reads (passage, caption, or linearised table);
    the modality payload (``image_path`` / ``table``) carries the structured item.
    """

    kb: str
    id: str
    score: float
    text: str
    title: str | None = None
    modality: Modality = Modality.TEXT
    image_path: Path | None = None
    table: Table | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def doc_id(self) -> str:
        """The source document (passage, image or table id) this item comes from: a chunk or
        row block counts as its document (``metadata["doc_id"]``, else the id up to ``#``)."""
        doc = self.metadata.get("doc_id")
        return str(doc) if doc else self.id.split("#", 1)[0]


# --------------------------------------------------------------------------- model I/O


class TextPart(_Model):
    type: Literal["text"] = "text"
    text: str


class ImagePart(_Model):
    type: Literal["image"] = "image"
    path: Path


ContentPart = TextPart | ImagePart


class ChatMessage(_Model):
    """One chat turn. ``content`` is a string or a list of text/image parts."""

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        """The text of the message with image parts dropped."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    def images(self) -> list[Path]:
        if isinstance(self.content, str):
            return []
        return [p.path for p in self.content if isinstance(p, ImagePart)]


class SamplingParams(_Model):
    """Decoding settings. ``temperature=0`` means greedy (the evaluation default)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0
    stop: list[str] = Field(default_factory=list)
    grammar: str | None = None
    """Optional GBNF grammar constraining the output; backends that cannot use it ignore it."""


class ChatResult(_Model):
    """What a chat backend returns for one request."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    model: str = ""
    cached: bool = False
    finish_reason: str | None = None


# --------------------------------------------------------------------------- steps


class RouteAction(_Model):
    """A parsed router decision.

    ``kbs`` empty and ``sub_question`` None means "stop and answer".
    """

    think: str = ""
    sub_question: str | None = None
    kbs: list[str] = Field(default_factory=list)

    @property
    def is_stop(self) -> bool:
        return self.sub_question is None and not self.kbs


class ModelCall(_Model):
    """One model call as recorded in a trajectory."""

    purpose: Literal["route", "sub_answer", "final", "generate", "read"]
    messages: list[ChatMessage] = Field(
        default_factory=list, description="Empty when results were saved without messages."
    )
    output: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None


class Retrieval(_Model):
    """One retrieval call: query sent to one KB and the evidence that came back."""

    kb: str
    query: Query
    evidence: list[Evidence]
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None


class Step(_Model):
    """One step of the loop: route, (retrieve, answer the sub-question)."""

    index: int
    route_calls: list[ModelCall] = Field(default_factory=list)
    action: RouteAction | None = None
    retrievals: list[Retrieval] = Field(default_factory=list)
    read_calls: list[ModelCall] = Field(default_factory=list)
    """Calls of an evidence reader (the SQL table reader's query), before the sub-answer."""
    answer_call: ModelCall | None = None
    sub_answer: str | None = None
    continued: bool = False
    """The router's stop was overridden at this step (multi-hop continuation)."""
    notes: list[str] = Field(default_factory=list)
    """Human-readable record of anything unusual: format retries, fallbacks, errors."""


StopReason = Literal["answered", "budget", "format_fallback", "error", "no_retrieval"]


class Trajectory(_Model):
    """The complete record of answering one question with one method."""

    question: Question
    method: str
    steps: list[Step] = Field(default_factory=list)
    final_call: ModelCall | None = None
    answer: str = ""
    stop_reason: StopReason = "answered"
    seconds: float = 0.0
    config: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None

    def model_calls(self) -> list[ModelCall]:
        calls: list[ModelCall] = []
        for s in self.steps:
            calls.extend(s.route_calls)
            calls.extend(s.read_calls)
            if s.answer_call is not None:
                calls.append(s.answer_call)
        if self.final_call is not None:
            calls.append(self.final_call)
        return calls

    def retrievals(self) -> list[Retrieval]:
        return [r for s in self.steps for r in s.retrievals]

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.model_calls())

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.model_calls())


# --------------------------------------------------------------------------- routing

NONE_LABEL = "none"
"""The routing label meaning "retrieve nothing more: answer now"."""


class RouteState(_Model):
    """What a router knows when it decides one step: the question and what came before.

    ``prev_kbs`` are the KBs of the earlier retrieval steps in order; ``sub_question`` is the
    sub-question an LLM wrote for *this* step, when one did (hybrid routing), else None.
    """

    question: str
    has_image: bool = False
    step: int = Field(0, ge=0)
    prev_kbs: list[str] = Field(default_factory=list)
    sub_question: str | None = None


class RouteDistribution(_Model):
    """A router's calibrated belief over the configured KB names plus ``none`` (answer now).

    ``label`` is the decision after the router's fitted abstain threshold (it may differ from
    the arg-max); ``confidence`` is the probability of the arg-max label.
    """

    probs: dict[str, float]
    label: str
    confidence: float

    @property
    def is_stop(self) -> bool:
        return self.label == NONE_LABEL

    @property
    def best_kb(self) -> str | None:
        """The most probable KB name (``none`` excluded); None if there are no KBs."""
        kbs = {k: p for k, p in self.probs.items() if k != NONE_LABEL}
        return max(kbs, key=lambda k: kbs[k]) if kbs else None


# --------------------------------------------------------------------------- trace events

EventKind = Literal["route", "retrieve", "sub_answer", "final", "note"]


@dataclass(frozen=True)
class TraceEvent:
    """One thing that just happened while a question is answered (for live traces).

    ``route``: ``step.action`` (and ``step.route_calls``) are set; ``retrieve``:
    ``step.retrievals``; ``sub_answer``: ``step.sub_answer``; ``final``: ``trajectory`` is
    complete; ``note``: ``message`` says something unusual happened (retry, fallback, error).
    Events carry references to the trajectory's objects: consumers treat them as read-only.
    """

    kind: EventKind
    question: Question
    step: Step | None = None
    trajectory: Trajectory | None = None
    message: str = ""
    index: int | None = field(default=None)
    """Position of the question in an ``answer_many`` batch (None for ``answer``)."""


EventCallback = Callable[[TraceEvent], None]
