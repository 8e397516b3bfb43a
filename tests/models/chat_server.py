"""A fake OpenAI-compatible chat server for tests and benchmarks (FastAPI + uvicorn).

``POST /v1/chat/completions`` echoes the last user message (``"echo: <text>"``) with usage
counts (whitespace tokens). Behaviour is scripted through ``POST /control`` (JSON, every field
optional) or :meth:`ChatServer.control`:

- ``fail``: list of HTTP statuses returned by the next requests, one each (e.g. ``[503, 429]``);
- ``retry_after``: ``Retry-After`` header value sent with those failures;
- ``sleep``: seconds every request waits before answering (a timeout test);
- ``garbage``: ``"nonjson"`` (an HTML body) or ``"nochoices"`` (JSON without ``choices``);
- ``reset``: true clears all of the above and the request log.

``latency`` (constructor / ``--latency``) is a fixed delay for every request (benchmarks).
``GET /requests`` returns the received request bodies. Run standalone::

    python tests/models/chat_server.py --port 8011 --latency 0.2

In tests use :class:`ChatServer` as a context manager: it runs uvicorn in a background thread on
a free port of 127.0.0.1 and exposes ``base_url``.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` annotation.
import argparse
import asyncio
import socket
import threading
import time
from typing import Any


def _tokens(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(len(p.get("text", "").split()) + (p.get("type") == "image_url") for p in content)
    return 0


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ""


class _State:
    def __init__(self, latency: float = 0.0):
        self.latency = latency
        self.reset()

    def reset(self) -> None:
        self.fail: list[int] = []
        self.retry_after: str | None = None
        self.sleep = 0.0
        self.garbage: str | None = None
        self.requests: list[dict] = []
        self.lock = threading.Lock()


def create_app(latency: float = 0.0):
    """The FastAPI app; ``app.state.fake`` holds the scripted behaviour."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    app = FastAPI()
    state = _State(latency)
    app.state.fake = state

    @app.post("/control")
    async def control(request: Request) -> dict:
        cmd = await request.json()
        with state.lock:
            if cmd.get("reset"):
                state.reset()
            for key in ("fail", "retry_after", "sleep", "garbage", "latency"):
                if key in cmd:
                    setattr(state, key, cmd[key])
        return {"ok": True}

    @app.get("/requests")
    async def requests() -> list:
        return state.requests

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        with state.lock:
            state.requests.append(body)
            status = state.fail.pop(0) if state.fail else None
            delay = state.latency + state.sleep
            garbage = state.garbage
            retry_after = state.retry_after
        if delay:
            await asyncio.sleep(delay)
        if status is not None:
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            return JSONResponse(
                {"error": f"scripted {status}"}, status_code=status, headers=headers
            )
        if garbage == "nonjson":
            return PlainTextResponse("<html>Bad gateway page</html>", status_code=200)
        if garbage == "nochoices":
            return JSONResponse({"id": "x", "object": "chat.completion", "choices": []})
        messages = body.get("messages", [])
        last_user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        reply = "echo: " + _text(last_user.get("content"))
        prompt_tokens = sum(_tokens(m.get("content")) for m in messages)
        return {
            "id": f"chatcmpl-{len(state.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(reply.split()),
                "total_tokens": prompt_tokens + len(reply.split()),
            },
        }

    return app


class ChatServer:
    """Run :func:`create_app` with uvicorn in a background thread on 127.0.0.1:<free port>."""

    def __init__(self, latency: float = 0.0, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.app = create_app(latency)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", backlog=2048)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def state(self) -> _State:
        return self.app.state.fake

    @property
    def requests(self) -> list[dict]:
        return self.state.requests

    def control(self, **cmd: Any) -> None:
        """Same fields as ``POST /control``, applied directly."""
        with self.state.lock:
            if cmd.pop("reset", False):
                self.state.reset()
            for key, value in cmd.items():
                if not hasattr(self.state, key):
                    raise KeyError(f"unknown control field {key!r}")
                setattr(self.state, key, value)

    def start(self) -> "ChatServer":
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake chat server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(
        create_app(args.latency), host=args.host, port=args.port, log_level="warning", backlog=2048
    )


if __name__ == "__main__":
    main()
