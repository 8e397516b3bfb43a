"""Chat backend for any OpenAI-compatible ``/v1/chat/completions`` server.

Works with vLLM, SGLang, Ollama, the llama.cpp server and OpenAI itself. Requests go through one
pooled :class:`httpx.AsyncClient` (sized for high concurrency); transient failures (HTTP 429 and
5xx, connection errors, timeouts) are retried with capped exponential backoff and jitter; a
server that stays down, times out on every attempt or answers garbage raises
:class:`~kbrouter.errors.ModelError` naming the URL and the cause. Every await is bounded by a
timeout, so a call can never hang.

Example::

    model = OpenAICompatibleModel("Qwen/Qwen2.5-VL-7B-Instruct", base_url="http://gpu:8000/v1",
                                  vision=True, grammar_mode="vllm")
    result = await model.chat([ChatMessage(role="user", content="Hi")])
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from kbrouter.errors import ConfigError, ModelError, ModelUnavailableError
from kbrouter.models._messages import IMAGE_NOTE, openai_messages
from kbrouter.models.base import ChatModel
from kbrouter.types import ChatMessage, ChatResult, SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
BASE_URL_ENV = ("KBROUTER_OPENAI_BASE_URL", "OPENAI_BASE_URL")
API_KEY_ENV = ("KBROUTER_OPENAI_API_KEY", "OPENAI_API_KEY")
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

GrammarMode = Literal["off", "vllm", "vllm-structured", "llama.cpp", "sglang"]


class OpenAICompatibleConfig(BaseModel):
    """Settings of :class:`OpenAICompatibleModel`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Model name as the server knows it (the request's `model`).")
    base_url: str = Field(
        DEFAULT_BASE_URL,
        description="API root including /v1, e.g. http://localhost:8000/v1 (a bare host gets /v1).",
    )
    api_key: str | None = Field(None, description="Bearer token; None sends no Authorization.")
    vision: bool = Field(
        False, description="Send image parts as base64 data URLs (the model is a VLM)."
    )
    image_note: str = Field(IMAGE_NOTE, description="Text replacing images for text-only models.")
    max_image_side: int | None = Field(
        None, gt=0, description="Downscale images so their longest side is at most this (pixels)."
    )
    timeout: float = Field(120.0, gt=0, description="Seconds allowed for one attempt, end to end.")
    connect_timeout: float = Field(10.0, gt=0, description="Seconds allowed to open a connection.")
    max_retries: int = Field(
        4, ge=0, description="Retries after the first attempt (transient errors)."
    )
    backoff_base: float = Field(
        0.5, ge=0, description="First backoff in seconds (doubles per retry)."
    )
    backoff_max: float = Field(20.0, ge=0, description="Upper bound of one backoff, seconds.")
    max_connections: int = Field(256, gt=0, description="Concurrent requests / pooled connections.")
    grammar_mode: GrammarMode = Field(
        "off",
        description="How SamplingParams.grammar is sent: off (ignored), vllm (`guided_grammar`), "
        "vllm-structured (`structured_outputs.grammar`), llama.cpp (`grammar`), sglang (`ebnf`).",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="Extra JSON fields merged into every request body."
    )
    context_window: int | None = Field(None, gt=0, description="Model context length, if known.")


def resolve_base_url(base_url: str | None) -> str:
    """``base_url`` or the env (``KBROUTER_OPENAI_BASE_URL``, ``OPENAI_BASE_URL``) or OpenAI's.

    A URL without a path (``http://host:8000``) gets ``/v1`` appended.
    """
    url = base_url or next((os.environ[k] for k in BASE_URL_ENV if os.environ.get(k)), None)
    url = (url or DEFAULT_BASE_URL).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"OpenAI-compatible base_url must be an http(s) URL, got {url!r}")
    if parts.path in ("", "/"):
        url += "/v1"
    return url


def resolve_api_key(api_key: str | None) -> str | None:
    """``api_key`` or the env (``KBROUTER_OPENAI_API_KEY``, ``OPENAI_API_KEY``) or None."""
    return api_key or next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)


class _Transient(Exception):
    """An attempt failed in a way worth retrying."""

    def __init__(self, cause: str, retry_after: float | None = None):
        super().__init__(cause)
        self.retry_after = retry_after


class OpenAICompatibleModel(ChatModel):
    """An OpenAI-compatible HTTP chat server (vLLM, SGLang, Ollama, llama.cpp server, OpenAI).

    ``chat`` is safe to call from many tasks at once; at most ``max_connections`` requests are in
    flight, the rest wait their turn. Greedy decoding is ``temperature=0``; the seed is sent as
    the request's ``seed``. ``SamplingParams.grammar`` is forwarded only when ``grammar_mode`` says
    how the server takes it.
    """

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        config: OpenAICompatibleConfig | None = None,
        **kwargs: Any,
    ):
        if config is None:
            model = model or os.environ.get("KBROUTER_OPENAI_MODEL")
            if not model:
                raise ConfigError(
                    "OpenAI-compatible backend needs a model name "
                    "(argument or KBROUTER_OPENAI_MODEL)"
                )
            try:
                config = OpenAICompatibleConfig(
                    model=model,
                    base_url=resolve_base_url(base_url),
                    api_key=resolve_api_key(api_key),
                    **kwargs,
                )
            except ValueError as e:  # pydantic ValidationError
                raise ConfigError(f"invalid OpenAI-compatible backend settings: {e}") from e
        elif model or base_url or api_key or kwargs:
            raise ConfigError("pass either config= or individual settings, not both")
        self.config = config
        self.name = config.model
        self.supports_images = config.vision
        self.supports_grammar = config.grammar_mode != "off"
        self.context_window = config.context_window
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None  # httpx.AsyncClient, bound to self._loop
        self._slots: asyncio.Semaphore | None = None
        self._data_urls: dict[tuple[str, int, int], str] = {}
        self._rng = random.Random()

    # ------------------------------------------------------------------ public API

    async def chat(
        self, messages: list[ChatMessage], params: SamplingParams | None = None
    ) -> ChatResult:
        params = params or SamplingParams()
        body = self._body(messages, params)
        client, slots = self._ensure_client()
        cfg = self.config
        last_cause = ""
        attempts = cfg.max_retries + 1
        async with slots:
            start = time.perf_counter()
            for attempt in range(attempts):
                try:
                    async with asyncio.timeout(cfg.timeout):
                        data = await self._post(client, body)
                    return self._result(data, time.perf_counter() - start)
                except _Transient as e:
                    last_cause = str(e)
                    retry_after = e.retry_after
                except TimeoutError:
                    last_cause = f"no complete response within {cfg.timeout:g} s"
                    retry_after = None
                if attempt + 1 < attempts:
                    delay = self._backoff(attempt, retry_after)
                    logger.warning(
                        "%s: attempt %d/%d failed (%s); retrying in %.2f s",
                        self.url,
                        attempt + 1,
                        attempts,
                        last_cause,
                        delay,
                    )
                    await asyncio.sleep(delay)
        raise ModelUnavailableError(
            f"model server {self.url} failed after {attempts} attempt(s): {last_cause}"
        )

    async def aclose(self) -> None:
        client, self._client, self._loop, self._slots = self._client, None, None, None
        if client is not None:
            try:
                async with asyncio.timeout(5):
                    await client.aclose()
            except (TimeoutError, RuntimeError) as e:  # closed/foreign loop: drop it
                logger.debug("closing HTTP client: %s", e)

    def describe(self) -> dict:
        cfg = self.config
        return {
            "backend": type(self).__name__,
            "name": self.name,
            "base_url": cfg.base_url,
            "vision": cfg.vision,
            "grammar_mode": cfg.grammar_mode,
            "timeout": cfg.timeout,
            "max_retries": cfg.max_retries,
        }

    def identity(self) -> dict:
        """The served model's name and whether images are sent; not the URL (the same model
        served elsewhere replays) nor timeouts and retries."""
        cfg = self.config
        return {
            "backend": "openai",
            "name": self.name,
            "vision": cfg.vision,
            "grammar_mode": cfg.grammar_mode,
        }

    # ------------------------------------------------------------------ internals

    def _ensure_client(self) -> tuple[Any, asyncio.Semaphore]:
        """One client + semaphore per event loop (a client cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop or self._slots is None:
            import httpx

            cfg = self.config
            headers = {"Content-Type": "application/json"}
            if cfg.api_key:
                headers["Authorization"] = f"Bearer {cfg.api_key}"
            self._client = httpx.AsyncClient(
                headers=headers,
                timeout=httpx.Timeout(cfg.timeout, connect=cfg.connect_timeout),
                limits=httpx.Limits(
                    max_connections=cfg.max_connections,
                    max_keepalive_connections=cfg.max_connections,
                ),
            )
            self._slots = asyncio.Semaphore(cfg.max_connections)
            self._loop = loop
        return self._client, self._slots

    def _body(self, messages: list[ChatMessage], params: SamplingParams) -> dict[str, Any]:
        cfg = self.config
        body: dict[str, Any] = {
            "model": cfg.model,
            "messages": openai_messages(
                messages,
                vision=cfg.vision,
                image_note=cfg.image_note,
                max_image_side=cfg.max_image_side,
                data_url_cache=self._data_urls,
            ),
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": params.seed,
            "stream": False,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.grammar:
            mode = cfg.grammar_mode
            if mode == "vllm":
                body["guided_grammar"] = params.grammar
            elif mode == "vllm-structured":
                body["structured_outputs"] = {"grammar": params.grammar}
            elif mode == "llama.cpp":
                body["grammar"] = params.grammar
            elif mode == "sglang":
                body["ebnf"] = params.grammar
        body.update(cfg.extra_body)
        return body

    async def _post(self, client: Any, body: dict[str, Any]) -> Any:
        import httpx

        try:
            resp = await client.post(self.url, json=body)
        except httpx.TimeoutException as e:
            raise _Transient(f"timeout ({type(e).__name__})") from e
        except httpx.TransportError as e:  # connection refused/reset, DNS, protocol errors
            raise _Transient(f"connection error: {type(e).__name__}: {e or 'no detail'}") from e
        if resp.status_code in RETRY_STATUS:
            raise _Transient(
                f"HTTP {resp.status_code}: {_snippet(resp.text)}", _retry_after(resp.headers)
            )
        if resp.status_code >= 400:
            raise ModelError(
                f"model server {self.url} rejected the request with HTTP {resp.status_code}: "
                f"{_snippet(resp.text)}"
            )
        try:
            return resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(
                f"model server {self.url} returned a non-JSON response "
                f"(HTTP {resp.status_code}): {_snippet(resp.text)}"
            ) from e

    def _result(self, data: Any, seconds: float) -> ChatResult:
        try:
            choice = data["choices"][0]
            message = choice["message"]
            text = message.get("content") or ""
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise ModelError(
                f"model server {self.url} returned an invalid completion "
                f"(missing {e!s} / no choices): {_snippet(json.dumps(data))}"
            ) from e
        usage = data.get("usage") or {}
        return ChatResult(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            seconds=seconds,
            model=str(data.get("model") or self.config.model),
            finish_reason=choice.get("finish_reason"),
        )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff, "equal jitter" (uniform in [cap/2, cap]), honouring Retry-After."""
        cfg = self.config
        cap = min(cfg.backoff_max, cfg.backoff_base * (2**attempt))
        delay = self._rng.uniform(cap / 2, cap)
        if retry_after is not None:
            delay = max(delay, min(retry_after, cfg.backoff_max))
        return delay


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _snippet(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return (text[:limit] + "…") if len(text) > limit else (text or "(empty body)")
