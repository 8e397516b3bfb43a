"""OpenAI-compatible backend against a real local HTTP server (tests/models/chat_server.py)."""

from __future__ import annotations

import asyncio
import base64
import socket
from pathlib import Path

import pytest
from chat_server import ChatServer
from PIL import Image

from kbrouter.errors import ConfigError, ImageError, ModelError
from kbrouter.models._messages import IMAGE_NOTE
from kbrouter.models.openai_compat import OpenAICompatibleModel, resolve_base_url
from kbrouter.types import ChatMessage, ImagePart, SamplingParams, TextPart

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server():
    with ChatServer() as s:
        yield s


@pytest.fixture
def fake(server: ChatServer) -> ChatServer:
    server.control(reset=True)
    return server


def _model(server: ChatServer, **kw) -> OpenAICompatibleModel:
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("backoff_max", 0.05)
    return OpenAICompatibleModel("fake-model", base_url=server.base_url, **kw)


def _user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "flag.png"
    Image.new("RGB", (8, 6), (200, 10, 10)).save(path)
    return path


def test_echo_returns_text_usage_and_sampling_fields(fake: ChatServer):
    """A reply carries the text, the server's token usage, and the request carries seed/greedy."""
    model = _model(fake)
    params = SamplingParams(temperature=0.0, seed=7, max_tokens=33, stop=["</ret>"])
    result = asyncio.run(model.chat(_user("hello there world"), params))
    assert result.text == "echo: hello there world"
    assert result.prompt_tokens == 3
    assert result.completion_tokens == 4
    assert result.finish_reason == "stop"
    assert result.seconds > 0
    body = fake.requests[-1]
    assert body["model"] == "fake-model"
    assert body["temperature"] == 0.0
    assert body["seed"] == 7
    assert body["max_tokens"] == 33
    assert body["stop"] == ["</ret>"]
    assert "grammar" not in body and "guided_grammar" not in body


def test_retries_transient_errors_then_succeeds(fake: ChatServer):
    """503 and 429 answers are retried with backoff until the server answers."""
    fake.control(fail=[503, 429, 502])
    result = asyncio.run(_model(fake, max_retries=3).chat(_user("x")))
    assert result.text == "echo: x"
    assert len(fake.requests) == 4


def test_gives_up_after_bounded_retries(fake: ChatServer):
    """A server that keeps failing raises ModelError naming the URL and the status."""
    fake.control(fail=[503] * 10)
    with pytest.raises(ModelError, match=r"/v1/chat/completions.*3 attempt.*HTTP 503"):
        asyncio.run(_model(fake, max_retries=2).chat(_user("x")))
    assert len(fake.requests) == 3


def test_retry_after_header_is_honoured(fake: ChatServer):
    """Retry-After raises the backoff above the configured exponential delay."""
    fake.control(fail=[429], retry_after="0.3")
    model = _model(fake, max_retries=1, backoff_max=1.0)
    result = asyncio.run(model.chat(_user("x")))
    assert result.text == "echo: x"
    assert result.seconds >= 0.3


def test_client_error_is_not_retried(fake: ChatServer):
    """A 400 (bad request) fails at once with the status in the message."""
    fake.control(fail=[400, 400])
    with pytest.raises(ModelError, match="HTTP 400"):
        asyncio.run(_model(fake, max_retries=3).chat(_user("x")))
    assert len(fake.requests) == 1


def test_timeout_raises_model_error(fake: ChatServer):
    """A server slower than the timeout fails every attempt, then raises ModelError."""
    fake.control(sleep=2.0)
    with pytest.raises(ModelError, match=r"failed after 2 attempt.*(timeout|within)"):
        asyncio.run(_model(fake, timeout=0.2, max_retries=1).chat(_user("x")))


def test_dead_server_raises_model_error():
    """A closed port gives a ModelError naming the URL and the connection error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = OpenAICompatibleModel(
        "m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_base=0.01
    )
    with pytest.raises(ModelError, match=rf"127\.0\.0\.1:{port}/v1.*connection error"):
        asyncio.run(model.chat(_user("x")))


@pytest.mark.parametrize(
    ("garbage", "pattern"), [("nonjson", "non-JSON"), ("nochoices", "invalid")]
)
def test_garbage_response_raises_model_error(fake: ChatServer, garbage: str, pattern: str):
    """A 200 response that is not a chat completion is reported, not crashed on."""
    fake.control(garbage=garbage)
    with pytest.raises(ModelError, match=pattern):
        asyncio.run(_model(fake).chat(_user("x")))


def test_vision_sends_image_as_data_url(fake: ChatServer, image: Path):
    """With vision=True the image part becomes a base64 data URL of the file's bytes."""
    msg = ChatMessage(role="user", content=[ImagePart(path=image), TextPart(text="Which flag?")])
    model = _model(fake, vision=True)
    assert model.supports_images
    result = asyncio.run(model.chat([msg]))
    assert result.text == "echo: Which flag?"
    parts = fake.requests[-1]["messages"][0]["content"]
    assert parts[0]["type"] == "image_url"
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == image.read_bytes()
    assert parts[1] == {"type": "text", "text": "Which flag?"}


def test_text_only_model_gets_image_note(fake: ChatServer, image: Path):
    """Without vision the image part is replaced by the note telling where images are searched."""
    msg = ChatMessage(role="user", content=[ImagePart(path=image), TextPart(text="Which flag?")])
    model = _model(fake)
    assert not model.supports_images
    asyncio.run(model.chat([msg]))
    content = fake.requests[-1]["messages"][0]["content"]
    assert content == IMAGE_NOTE + "\nWhich flag?"
    assert "base64" not in content


def test_missing_image_raises_image_error(fake: ChatServer, tmp_path: Path):
    """A vision request whose image file is missing fails with ImageError naming the path."""
    msg = ChatMessage(role="user", content=[ImagePart(path=tmp_path / "nope.png")])
    with pytest.raises(ImageError, match="nope.png"):
        asyncio.run(_model(fake, vision=True).chat([msg]))


@pytest.mark.parametrize(
    ("mode", "field"),
    [("llama.cpp", "grammar"), ("vllm", "guided_grammar"), ("sglang", "ebnf")],
)
def test_grammar_is_forwarded_per_mode(fake: ChatServer, mode: str, field: str):
    """The GBNF grammar goes into the field the configured server type understands."""
    grammar = 'root ::= "yes" | "no"'
    model = _model(fake, grammar_mode=mode)
    assert model.supports_grammar
    asyncio.run(model.chat(_user("x"), SamplingParams(grammar=grammar)))
    assert fake.requests[-1][field] == grammar


def test_many_concurrent_requests_share_the_pool(fake: ChatServer):
    """Concurrent chats on one model all succeed and keep their own answers."""
    fake.control(latency=0.05)
    model = _model(fake, max_connections=16)

    async def run() -> list[str]:
        results = await asyncio.gather(*(model.chat(_user(f"q{i}")) for i in range(40)))
        await model.aclose()
        return [r.text for r in results]

    try:
        assert asyncio.run(run()) == [f"echo: q{i}" for i in range(40)]
    finally:
        fake.control(latency=0.0)


def test_model_survives_a_new_event_loop(fake: ChatServer):
    """The same model object works across separate asyncio.run calls."""
    model = _model(fake)
    assert asyncio.run(model.chat(_user("a"))).text == "echo: a"
    assert asyncio.run(model.chat(_user("b"))).text == "echo: b"


def test_base_url_and_key_from_env(monkeypatch: pytest.MonkeyPatch, fake: ChatServer):
    """Base URL and API key come from the environment when not given; a bare host gets /v1."""
    monkeypatch.setenv("KBROUTER_OPENAI_BASE_URL", f"http://127.0.0.1:{fake.port}")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    model = OpenAICompatibleModel("m")
    assert model.config.base_url == fake.base_url
    assert model.config.api_key == "sk-test"
    assert "sk-test" not in str(model.describe())
    assert asyncio.run(model.chat(_user("env"))).text == "echo: env"


def test_bad_base_url_is_config_error():
    """A base URL that is not http(s) is rejected at construction."""
    with pytest.raises(ConfigError, match="ftp://x"):
        resolve_base_url("ftp://x")


def test_a_spec_carries_backend_settings_so_the_cli_can_send_images(fake: ChatServer, image: Path):
    """`--model 'openai:<m>@<url>;vision=true'`: the spec's settings reach the backend, and the
    vision request carries the image."""
    from kbrouter.models.registry import load_model

    model = load_model(f"openai:fake-vlm@{fake.base_url};vision=true;max_retries=0", api_key="k")
    assert model.supports_images and model.config.max_retries == 0
    msg = ChatMessage(role="user", content=[ImagePart(path=image), TextPart(text="Which flag?")])
    asyncio.run(model.chat([msg]))
    parts = fake.requests[-1]["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:")
