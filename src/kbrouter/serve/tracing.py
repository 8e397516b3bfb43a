"""Optional OpenTelemetry spans that follow the OpenInference semantic conventions.

One **CHAIN** span per question (input: the question; output: the answer; the method and stop
reason as attributes), and under it, as they happen, an **LLM** span per model call (purpose,
model name, input and output messages, prompt/completion/total token counts) and a
**RETRIEVER** span per KB call (the query, the KB, and each document's id, score and text).
Model calls and retrievals are timed by the engine; their spans get the engine's start and end
times (end = when the event arrived, start = end - the recorded seconds).

Off by default. :func:`tracer_from_endpoint` builds an OTLP/HTTP exporter for an endpoint (e.g.
a Phoenix or Jaeger collector); tests pass their own ``TracerProvider`` with the SDK's in-memory
exporter. Nothing secret is recorded: prompts and evidence are the question's own content, and
no API key or header ever reaches a span.
"""

from __future__ import annotations

import json
import time
from typing import Any

from kbrouter.types import (
    EventCallback,
    ModelCall,
    Question,
    Retrieval,
    Step,
    TraceEvent,
    Trajectory,
)

__all__ = ["OpenInferenceTracer", "tracer_from_endpoint"]

_MAX_TEXT = 4000  # characters of any one message or document kept in a span


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + " …"


class OpenInferenceTracer:
    """Wraps :meth:`Engine.answer` so every question becomes an OpenInference span tree."""

    def __init__(self, tracer_provider: Any, *, model_name: str = "") -> None:
        self.provider = tracer_provider
        self._tracer = tracer_provider.get_tracer("kbrouter")
        self.model_name = model_name

    def close(self) -> None:
        """Flush pending spans and shut the provider (and its exporters) down."""
        shutdown = getattr(self.provider, "shutdown", None)
        if shutdown is not None:
            shutdown()

    async def answer(
        self, engine: Any, question: Question, on_event: EventCallback | None = None
    ) -> Trajectory:
        """``engine.answer(question)`` inside a CHAIN span, children emitted as events arrive."""
        from openinference.semconv.trace import OpenInferenceSpanKindValues, SpanAttributes
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        attrs = {
            SpanAttributes.OPENINFERENCE_SPAN_KIND: OpenInferenceSpanKindValues.CHAIN.value,
            SpanAttributes.INPUT_VALUE: question.text,
            "kbrouter.question.id": question.id or "",
            "kbrouter.question.has_image": question.image is not None,
            "kbrouter.method": getattr(engine.policy, "name", ""),
        }
        with self._tracer.start_as_current_span("kbrouter.answer", attributes=attrs) as chain:
            ctx = trace.set_span_in_context(chain)
            done: set[int] = set()  # ids of the calls and retrievals already spanned

            def hook(te: TraceEvent) -> None:
                if te.step is not None:
                    self._step_spans(te.step, ctx, done)
                if te.trajectory is not None:
                    for step in te.trajectory.steps:
                        self._step_spans(step, ctx, done)
                    if te.trajectory.final_call is not None:
                        self._llm_span(te.trajectory.final_call, ctx, done)
                if on_event is not None:
                    on_event(te)

            try:
                traj = await engine.answer(question, on_event=hook)
            except BaseException as e:
                chain.set_status(Status(StatusCode.ERROR, type(e).__name__))
                raise
            for step in traj.steps:  # anything no event carried
                self._step_spans(step, ctx, done)
            if traj.final_call is not None:
                self._llm_span(traj.final_call, ctx, done)
            chain.set_attribute(SpanAttributes.OUTPUT_VALUE, traj.answer)
            chain.set_attribute("kbrouter.stop_reason", traj.stop_reason)
            chain.set_attribute("kbrouter.steps", len(traj.steps))
            if traj.error:
                chain.set_status(Status(StatusCode.ERROR, _clip(traj.error)))
            return traj

    # ------------------------------------------------------------------ children

    def _step_spans(self, step: Step, ctx: Any, done: set[int]) -> None:
        for call in step.route_calls:
            self._llm_span(call, ctx, done, step=step.index)
        for r in step.retrievals:
            self._retriever_span(r, ctx, done, step=step.index)
        for call in step.read_calls:
            self._llm_span(call, ctx, done, step=step.index)
        if step.answer_call is not None:
            self._llm_span(step.answer_call, ctx, done, step=step.index)

    def _record(
        self,
        name: str,
        ctx: Any,
        attrs: dict[str, Any],
        seconds: float,
        error: str | None,
        step: int | None,
    ) -> None:
        """One finished child span: it ended now and lasted the engine's recorded seconds."""
        from opentelemetry.trace import Status, StatusCode

        if step is not None:
            attrs["kbrouter.step"] = step
        end = time.time_ns()
        start = end - int(max(seconds, 0.0) * 1e9)
        span = self._tracer.start_span(name, ctx, attributes=attrs, start_time=start)
        if error:
            span.set_status(Status(StatusCode.ERROR, _clip(error)))
        span.end(end_time=end)

    def _llm_span(self, call: ModelCall, ctx: Any, done: set[int], step: int | None = None) -> None:
        if id(call) in done:
            return
        done.add(id(call))
        from openinference.semconv.trace import (
            MessageAttributes,
            OpenInferenceSpanKindValues,
            SpanAttributes,
        )

        attrs: dict[str, Any] = {
            SpanAttributes.OPENINFERENCE_SPAN_KIND: OpenInferenceSpanKindValues.LLM.value,
            SpanAttributes.LLM_MODEL_NAME: self.model_name,
            SpanAttributes.LLM_TOKEN_COUNT_PROMPT: call.prompt_tokens,
            SpanAttributes.LLM_TOKEN_COUNT_COMPLETION: call.completion_tokens,
            SpanAttributes.LLM_TOKEN_COUNT_TOTAL: call.prompt_tokens + call.completion_tokens,
            SpanAttributes.OUTPUT_VALUE: _clip(call.output),
            "kbrouter.purpose": call.purpose,
            "kbrouter.cached": call.cached,
        }
        for i, m in enumerate(call.messages):
            prefix = f"{SpanAttributes.LLM_INPUT_MESSAGES}.{i}."
            attrs[prefix + MessageAttributes.MESSAGE_ROLE] = m.role
            attrs[prefix + MessageAttributes.MESSAGE_CONTENT] = _clip(m.text())
        out = f"{SpanAttributes.LLM_OUTPUT_MESSAGES}.0."
        attrs[out + MessageAttributes.MESSAGE_ROLE] = "assistant"
        attrs[out + MessageAttributes.MESSAGE_CONTENT] = _clip(call.output)
        self._record(f"llm.{call.purpose}", ctx, attrs, call.seconds, call.error, step)

    def _retriever_span(
        self, r: Retrieval, ctx: Any, done: set[int], step: int | None = None
    ) -> None:
        if id(r) in done:
            return
        done.add(id(r))
        from openinference.semconv.trace import (
            DocumentAttributes,
            OpenInferenceSpanKindValues,
            SpanAttributes,
        )

        attrs: dict[str, Any] = {
            SpanAttributes.OPENINFERENCE_SPAN_KIND: OpenInferenceSpanKindValues.RETRIEVER.value,
            SpanAttributes.INPUT_VALUE: r.query.text,
            "kbrouter.kb": r.kb,
            "kbrouter.query.has_image": r.query.image is not None,
            "kbrouter.cached": r.cached,
        }
        for i, ev in enumerate(r.evidence):
            prefix = f"{SpanAttributes.RETRIEVAL_DOCUMENTS}.{i}."
            attrs[prefix + DocumentAttributes.DOCUMENT_ID] = ev.id
            attrs[prefix + DocumentAttributes.DOCUMENT_SCORE] = float(ev.score)
            attrs[prefix + DocumentAttributes.DOCUMENT_CONTENT] = _clip(ev.text)
            meta = {"kb": ev.kb, "modality": ev.modality.value, "title": ev.title}
            attrs[prefix + DocumentAttributes.DOCUMENT_METADATA] = json.dumps(meta)
        self._record(f"retrieve.{r.kb}", ctx, attrs, r.seconds, r.error, step)


def tracer_from_endpoint(endpoint: str, *, service_name: str = "kbrouter", model_name: str = ""):
    """An :class:`OpenInferenceTracer` exporting over OTLP/HTTP to ``endpoint`` (batched)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    url = endpoint.rstrip("/")
    if not url.endswith("/v1/traces"):
        url += "/v1/traces"
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    return OpenInferenceTracer(provider, model_name=model_name)
