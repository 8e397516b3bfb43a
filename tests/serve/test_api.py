"""The HTTP API on the scripted model and the demo KBs: schemas, SSE event order, the official
OpenAI client (streaming and not), errors, auth, limits."""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kbrouter.serve.app import ServeConfig, create_app
from kbrouter.testing import LiveServer, ScriptedChatModel, demo_registry
from kbrouter.types import ChatMessage, Trajectory

REPO = Path(__file__).resolve().parents[2]
QUESTION = "What is the capital of Australia?"
SUB_QUESTION = "Which city is the capital of Australia?"  # not the question: a final call follows


def reply(messages: list[ChatMessage]) -> str:
    """R1-Router prompts: one text hop, then stop; answers name the capital."""
    system, last = messages[0].text(), messages[-1].text()
    if "<ret>" in system:
        if "Answer 1:" in last:
            return "<think>done</think><sub-question>None</sub-question><ret>None</ret>"
        return f"<think>t</think><sub-question>{SUB_QUESTION}</sub-question><ret>text</ret>"
    return "<answer>Canberra</answer>"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    reg = demo_registry(tmp_path_factory.mktemp("serve-index"))
    yield reg
    reg.close()


def _client(registry, **cfg) -> TestClient:
    model = cfg.pop("model", None) or ScriptedChatModel(reply)
    return TestClient(create_app(model, registry, ServeConfig(**cfg)))


def test_health_readiness_kbs_and_openapi(registry):
    with _client(registry) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"ready": True}
        kbs = c.get("/v1/kbs").json()["kbs"]
        assert [k["name"] for k in kbs] == ["text", "tables", "images"]
        assert all(k["size"] > 0 for k in kbs)
        paths = c.get("/openapi.json").json()["paths"]
        assert {"/v1/answer", "/v1/chat/completions", "/v1/search", "/v1/kbs"} <= set(paths)


def test_not_ready_when_the_model_does_not_answer(registry):
    with _client(registry, model=ScriptedChatModel(reply, fail_at=[0])) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "scripted failure" in r.json()["reason"]


def test_answer_returns_the_answer_and_the_trajectory(registry):
    with _client(registry) as c:
        r = c.post("/v1/answer", json={"question": QUESTION})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["answer"] == "Canberra"
        steps = body["trajectory"]["steps"]
        assert steps[0]["action"]["kbs"] == ["text"] and steps[0]["retrievals"][0]["evidence"]
        # the trajectory is spliced in pre-encoded: it must be exactly the Trajectory JSON
        traj = Trajectory.model_validate(body["trajectory"])
        assert body == {"answer": traj.answer, "trajectory": traj.model_dump(mode="json")}
        chat = c.post(
            "/v1/chat/completions",
            json={
                "model": "kbrouter/r1-router",
                "messages": [{"role": "user", "content": QUESTION}],
            },
        ).json()
        assert list(chat["kbrouter"]) == ["trajectory"]
        again = Trajectory.model_validate(chat["kbrouter"]["trajectory"])
        assert chat["kbrouter"]["trajectory"] == again.model_dump(mode="json")
        assert chat["choices"][0]["message"]["content"] == "Canberra"


def test_streamed_steps_arrive_as_typed_events_in_order(registry):
    body = {"question": QUESTION, "stream": True}
    with _client(registry) as c, c.stream("POST", "/v1/answer", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events, data = [], []
        for line in r.iter_lines():
            if line.startswith("event:"):
                events.append(line.split(":", 1)[1].strip())
            elif line.startswith("data:"):
                data.append(json.loads(line.split(":", 1)[1]))
    assert events == [
        "step_start",
        "route",
        "retrieval",
        "sub_answer",
        "step_end",
        "step_start",
        "route",
        "step_end",
        "final",
    ]
    assert len({d["question_id"] for d in data}) == 1
    assert [d["step"] for d in data] == [0, 0, 0, 0, 0, 1, 1, 1, None]
    route, retrieval = data[1], data[2]
    assert route["kbs"] == ["text"] and route["decided_by"] == "llm"
    assert retrieval["kb"] == "text" and retrieval["evidence"][0]["id"]
    assert data[-1]["answer"] == "Canberra" and data[-1]["trajectory"]["answer"] == "Canberra"


def test_search_images_and_bad_requests(registry):
    flag = REPO / "demo" / "questions" / "flag.jpg"
    with _client(registry) as c:
        hits = c.post("/v1/search", json={"kb": "images", "query": "flag of Australia"}).json()
        assert hits["kb"] == "images" and hits["evidence"][0]["image_url"].startswith("/v1/images/")
        img = c.get(hits["evidence"][0]["image_url"])
        assert img.status_code == 200 and img.content[:4] in (
            b"\x89PNG",
            b"\xff\xd8\xff\xe0",
            b"\xff\xd8\xff\xe1",
            b"\xff\xd8\xff\xdb",
        )
        assert c.get("/v1/images/images/..%2F..%2Fetc%2Fpasswd").status_code == 404
        assert c.get("/v1/images/nowhere/flag_au").status_code == 404
        r = c.post("/v1/search", json={"kb": "nowhere", "query": "x"})
        assert (
            r.status_code == 400
            and "unknown knowledge base 'nowhere'" in r.json()["error"]["message"]
        )
        r = c.post("/v1/answer", json={"question": QUESTION, "method": "magic"})
        assert r.status_code == 400 and "unknown method 'magic'" in r.json()["error"]["message"]
        r = c.post("/v1/answer", json={"question": QUESTION, "image_base64": "%%%"})
        assert r.status_code == 400 and "base64" in r.json()["error"]["message"]
        r = c.post(
            "/v1/answer",
            json={"question": QUESTION, "image_base64": base64.b64encode(b"hi").decode()},
        )
        assert r.status_code == 400 and "not a decodable image" in r.json()["error"]["message"]
        assert c.post("/v1/answer", json={"question": ""}).status_code == 422
        assert c.post("/v1/answer", json={"question": "x" * 5000}).status_code == 413
        ok = c.post(
            "/v1/answer",
            json={
                "question": QUESTION,
                "image_base64": base64.b64encode(flag.read_bytes()).decode(),
            },
        )
        assert ok.status_code == 200 and ok.json()["trajectory"]["question"]["image"]


def test_api_key_is_required_when_configured(registry):
    with _client(registry, api_key="s3cret") as c:
        assert c.get("/healthz").status_code == 200  # probes stay open
        assert c.get("/v1/kbs").status_code == 401
        assert c.get("/v1/kbs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/kbs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/kbs", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_a_failing_model_is_a_503_for_that_request_only(registry):
    # calls: 0 = readiness ping, 1 route, 2 sub-answer, 3 route, 4 final (fails)
    with _client(registry, model=ScriptedChatModel(reply, fail_at=[4])) as c:
        r = c.post("/v1/answer", json={"question": QUESTION})
        assert r.status_code == 503 and "answering failed" in r.json()["error"]["message"]
        assert c.post("/v1/answer", json={"question": QUESTION}).status_code == 200


def test_the_official_openai_client_streaming_and_not(registry):
    import openai

    app = create_app(ScriptedChatModel(reply), registry, ServeConfig(api_key="k"))
    with LiveServer(app) as s:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="k")
        assert "kbrouter/r1-router" in [m.id for m in client.models.list()]
        msgs = [{"role": "user", "content": QUESTION}]
        out = client.chat.completions.create(model="kbrouter/r1-router", messages=msgs)
        assert out.choices[0].message.content == "Canberra"
        assert out.model_extra["kbrouter"]["trajectory"]["steps"]
        chunks = list(
            client.chat.completions.create(model="kbrouter/all-kbs", messages=msgs, stream=True)
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Canberra"
        assert chunks[-1].choices[0].finish_reason == "stop"
        with pytest.raises(openai.BadRequestError, match="unknown method"):
            client.chat.completions.create(model="kbrouter/magic", messages=msgs)
        bad = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="nope")
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_saturation_is_a_clear_429(registry):
    import httpx

    slow = ScriptedChatModel(reply, latency=0.3)
    app = create_app(slow, registry, ServeConfig(max_concurrent=1))
    with LiveServer(app) as s:
        url = f"http://127.0.0.1:{s.port}/v1/answer"
        results: list[int] = []
        flag = base64.b64encode((REPO / "demo" / "questions" / "flag.jpg").read_bytes()).decode()

        def ask() -> None:
            body = {"question": QUESTION, "image_base64": flag}
            results.append(httpx.post(url, json=body, timeout=30).status_code)

        threads = [threading.Thread(target=ask) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert list(app.state.service.upload_dir.iterdir()) == []  # no upload left behind
    assert sorted(results)[0] == 200 and 429 in results


def test_only_plain_raster_images_are_accepted(registry):
    eps = base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n").decode()
    with _client(registry) as c:
        r = c.post("/v1/answer", json={"question": QUESTION, "image_base64": eps})
        assert r.status_code == 400 and "not a decodable image" in r.json()["error"]["message"]


def test_a_client_that_disconnects_cancels_its_remaining_model_calls(registry):
    import httpx

    slow = ScriptedChatModel(reply, latency=0.4)
    app = create_app(slow, registry, ServeConfig())
    with LiveServer(app) as s:
        url = f"http://127.0.0.1:{s.port}/v1/answer"
        with httpx.stream("POST", url, json={"question": QUESTION, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("event: route"):
                    break  # disconnect after the first routing decision
        time.sleep(0.2)
        made = len(slow.requests)
        time.sleep(1.5)  # an uncancelled question would make 3 more calls in this time
        assert len(slow.requests) <= made + 1  # at most the call that was already running
        assert made < 5


def test_multipart_upload_and_body_limits(registry):
    flag = REPO / "demo" / "questions" / "flag.jpg"
    with _client(registry, max_body_bytes=200_000) as c:
        r = c.post(
            "/v1/answer",
            data={"question": QUESTION, "top_k": "2"},
            files={"image": ("flag.jpg", flag.read_bytes(), "image/jpeg")},
        )
        assert r.status_code == 200, r.text
        traj = r.json()["trajectory"]
        assert traj["question"]["image"] and traj["answer"] == "Canberra"
        assert traj["config"]["policy"] == "r1router"
        # bad parts: a text "image", a second file, an unknown field, garbage bytes
        r = c.post("/v1/answer", data={"question": QUESTION, "image": "not a file"})
        assert r.status_code == 400 and "file upload" in r.json()["error"]["message"], r.text
        r = c.post(
            "/v1/answer",
            data={"question": QUESTION},
            files={"image": ("x.jpg", b"not an image", "image/jpeg")},
        )
        assert r.status_code == 400 and "not a decodable image" in r.json()["error"]["message"]
        r = c.post("/v1/answer", data={"question": QUESTION, "colour": "red"})
        assert r.status_code == 422 and "colour" in r.json()["error"]["message"]
        r = c.post(
            "/v1/answer",
            content=b'--xx\r\nContent-Disposition: form-data; name="question"\r\n\r\nq',
            headers={"content-type": "multipart/form-data; boundary=xx"},
        )
        assert r.status_code in (400, 422)
        # bodies over the limit are refused before parsing: by length and when chunked
        big = {"question": QUESTION, "image_base64": "A" * 300_000}
        r = c.post("/v1/answer", json=big)
        assert r.status_code == 413 and "exceeds 200000 bytes" in r.json()["error"]["message"]

        def chunks():
            for _ in range(30):
                yield b"x" * 10_000

        r = c.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.get("/healthz").status_code == 200  # still serving


def test_results_saved_without_messages_still_show(tmp_path):
    """``eval --no-messages`` results: model calls without their prompts still validate."""
    from kbrouter.types import ModelCall

    call = ModelCall.model_validate({"purpose": "final", "output": "<answer>x</answer>"})
    assert call.messages == []


def test_a_model_per_call_purpose_answers_its_calls(registry):
    """``purpose_models``: the final answers come from their own model; readiness pings every
    model; the trajectory records both; an unknown purpose is refused when the app is built."""
    from kbrouter.errors import ConfigError

    main = ScriptedChatModel(reply, name="main")
    final = ScriptedChatModel(lambda messages: "<answer>Canberra, ACT</answer>", name="finals")
    app = create_app(main, registry, ServeConfig(), purpose_models={"final": final})
    with TestClient(app) as c:
        assert c.get("/readyz").json() == {"ready": True}
        body = c.post("/v1/answer", json={"question": QUESTION}).json()
    assert body["answer"] == "Canberra, ACT"
    assert body["trajectory"]["config"]["purpose_models"]["final"]["name"] == "finals"
    final_prompts = [m for m, _ in final.requests if m[-1].text() != "ping"]
    assert len(final_prompts) == 1 and QUESTION in final_prompts[0][-1].text()
    assert all("What is the answer to the question?" not in m[-1].text() for m, _ in main.requests)

    down = ScriptedChatModel(reply, fail_at=[0], name="finals")
    app = create_app(main, registry, ServeConfig(), purpose_models={"final": down})
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "scripted failure" in r.json()["reason"]
    with pytest.raises(ConfigError, match="unknown call purpose 'judge'"):
        create_app(main, registry, ServeConfig(), purpose_models={"judge": final})
