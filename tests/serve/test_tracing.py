"""OpenInference spans of a served question, caught by the OpenTelemetry SDK's in-memory
exporter: one CHAIN per question, an LLM span per model call, a RETRIEVER span per KB call."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("openinference.semconv")

from fastapi.testclient import TestClient  # noqa: E402
from openinference.semconv.trace import SpanAttributes  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

from kbrouter.serve.app import ServeConfig, create_app  # noqa: E402
from kbrouter.serve.tracing import OpenInferenceTracer  # noqa: E402
from kbrouter.testing import ScriptedChatModel, demo_registry  # noqa: E402
from kbrouter.types import ChatMessage  # noqa: E402

QUESTION = "What is the capital of Australia?"
KEY = "s3cret-key-never-in-spans"


def reply(messages: list[ChatMessage]) -> str:
    system, last = messages[0].text(), messages[-1].text()
    if "<ret>" in system:
        if "Answer 1:" in last:
            return "<think>done</think><sub-question>None</sub-question><ret>None</ret>"
        sub = "<sub-question>Which city is the capital?</sub-question>"
        return f"<think>t</think>{sub}<ret>text</ret>"
    return "<answer>Canberra</answer>"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    reg = demo_registry(tmp_path_factory.mktemp("trace-index"))
    yield reg
    reg.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_question_is_one_chain_with_llm_and_retriever_children(registry, stream):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = OpenInferenceTracer(provider, model_name="scripted")
    app = create_app(ScriptedChatModel(reply), registry, ServeConfig(api_key=KEY), tracer=tracer)
    with TestClient(app) as c:
        r = c.post(
            "/v1/answer",
            json={"question": QUESTION, "stream": stream},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 200
        if stream:
            assert "event: final" in r.text

    spans = exporter.get_finished_spans()
    kind = SpanAttributes.OPENINFERENCE_SPAN_KIND
    [chain] = [s for s in spans if s.attributes[kind] == "CHAIN"]
    assert chain.name == "kbrouter.answer"
    assert chain.attributes[SpanAttributes.INPUT_VALUE] == QUESTION
    assert chain.attributes[SpanAttributes.OUTPUT_VALUE] == "Canberra"
    assert chain.attributes["kbrouter.method"] == "r1router"
    assert chain.attributes["kbrouter.stop_reason"] == "answered"

    children = sorted((s for s in spans if s is not chain), key=lambda s: s.start_time)
    assert all(s.parent is not None and s.parent.span_id == chain.context.span_id for s in children)
    assert all(s.context.trace_id == chain.context.trace_id for s in children)
    assert [(s.attributes[kind], s.name) for s in children] == [
        ("LLM", "llm.route"),
        ("RETRIEVER", "retrieve.text"),
        ("LLM", "llm.sub_answer"),
        ("LLM", "llm.route"),
        ("LLM", "llm.final"),
    ]
    route = children[0].attributes
    assert route[SpanAttributes.LLM_MODEL_NAME] == "scripted"
    assert route[SpanAttributes.LLM_TOKEN_COUNT_TOTAL] == (
        route[SpanAttributes.LLM_TOKEN_COUNT_PROMPT]
        + route[SpanAttributes.LLM_TOKEN_COUNT_COMPLETION]
    )
    assert route[f"{SpanAttributes.LLM_INPUT_MESSAGES}.0.message.role"] == "system"
    assert "<ret>text</ret>" in route[f"{SpanAttributes.LLM_OUTPUT_MESSAGES}.0.message.content"]
    docs = children[1].attributes
    assert docs[SpanAttributes.INPUT_VALUE] == "Which city is the capital?"
    assert docs["kbrouter.kb"] == "text"
    ids = [docs[k] for k in docs if k.endswith(".document.id")]
    scores = [docs[k] for k in docs if k.endswith(".document.score")]
    assert ids and len(ids) == len(scores) and all(isinstance(x, float) for x in scores)
    # the API key never reaches a span
    for s in spans:
        assert not any(KEY in str(v) for v in s.attributes.values())


def test_no_tracer_no_spans(registry):
    app = create_app(ScriptedChatModel(reply), registry, ServeConfig())
    assert app.state.service.tracer is None


def test_a_tracer_the_server_built_is_shut_down_with_it(registry, monkeypatch):
    """With --otlp-endpoint the server builds its own tracer and flushes and closes it when it
    stops; a tracer passed in stays open (its owner closes it)."""
    import kbrouter.serve.tracing as tracing

    exporters: list[InMemorySpanExporter] = []

    def built(endpoint: str, **kw) -> OpenInferenceTracer:
        exporter = InMemorySpanExporter()
        exporters.append(exporter)
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return OpenInferenceTracer(provider, **kw)

    monkeypatch.setattr(tracing, "tracer_from_endpoint", built)
    cfg = ServeConfig(otlp_endpoint="http://127.0.0.1:4318")
    with TestClient(create_app(ScriptedChatModel(reply), registry, cfg)) as c:
        assert c.post("/v1/answer", json={"question": QUESTION}).status_code == 200
    (exporter,) = exporters
    assert exporter.get_finished_spans()  # exported before the shutdown
    assert exporter._stopped  # the SDK exporter's own shutdown flag

    mine = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(mine))
    tracer = OpenInferenceTracer(provider)
    with TestClient(create_app(ScriptedChatModel(reply), registry, ServeConfig(), tracer=tracer)):
        pass
    assert not mine._stopped
