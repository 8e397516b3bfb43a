"""kbrouter as an MCP server (the official ``mcp`` Python SDK): tools ``list_kbs``,
``search(kb, query, k)`` and ``ask(question, ...)`` over the same
:class:`~kbrouter.serve.app.Service` as the HTTP API (one engine per method, shared by all
calls; the same limits and checks).

Transports: stdio (``kbrouter mcp``, for desktop agents that spawn it) and streamable HTTP
(``kbrouter mcp --transport http``, at ``/mcp`` on loopback by default; with ``--api-key-env``
every HTTP request must carry the key as ``Authorization: Bearer KEY`` or ``X-API-Key``, see
:func:`mcp_http_app`). A failing tool call is
an MCP tool error whose message names the problem (unknown KB or method, empty query, busy, the
model server unreachable); the server keeps serving.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from kbrouter.engine.runtime import KBSource
from kbrouter.models.base import ChatModel
from kbrouter.serve.app import ServeConfig, Service, _HTTPError, key_matches

__all__ = ["create_mcp_server", "mcp_http_app"]


def create_mcp_server(
    model: ChatModel,
    registry: KBSource,
    config: ServeConfig | None = None,
    *,
    purpose_models: Mapping[str, ChatModel] | None = None,
) -> Any:
    """An ``mcp.server.mcpserver.MCPServer`` exposing the KBs and the answering engine
    (``purpose_models``: backends for some call purposes, as in
    :class:`~kbrouter.engine.engine.Engine`)."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    service = Service(model, registry, config or ServeConfig(), purpose_models=purpose_models)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        try:
            yield None
        finally:
            service.close()

    server = MCPServer(
        "kbrouter",
        instructions="Step-wise retrieval-augmented answers over typed knowledge bases "
        "(text passages, tables, images with captions). list_kbs shows what can be searched; "
        "search queries one KB; ask answers a question, routing sub-questions to the KBs.",
        lifespan=lifespan,
    )

    def fail(e: _HTTPError) -> ToolError:
        return ToolError(e.message)

    @server.tool(description="The knowledge bases: name, description, modality and size.")
    async def list_kbs() -> str:
        return json.dumps({"kbs": service.kb_list()})

    @server.tool(
        description="Search one knowledge base (by name or alias) for the top-k evidence items "
        "(id, score, title, text; tables as rows)."
    )
    async def search(kb: str, query: str, k: int = 5) -> str:
        if not 0 < k <= 100:
            raise ToolError(f"k must be between 1 and 100, not {k}")
        try:
            return json.dumps(await service.search(kb, query, k))
        except _HTTPError as e:
            raise fail(e) from None

    @server.tool(
        description="Answer a question step by step: route atomic sub-questions to the "
        "knowledge bases, retrieve, answer. Returns the answer and the whole trajectory. "
        "image_base64: an optional image the question is about."
    )
    async def ask(
        question: str,
        method: str | None = None,
        max_steps: int | None = None,
        top_k: int | None = None,
        image_base64: str | None = None,
    ) -> str:
        if max_steps is not None and not 0 <= max_steps <= 10:
            raise ToolError(f"max_steps must be between 0 and 10, not {max_steps}")
        if top_k is not None and not 0 < top_k <= 50:
            raise ToolError(f"top_k must be between 1 and 50, not {top_k}")
        try:
            engine = service.engine(method, max_steps, top_k)
            q, ticket = await service.admit(question, image_base64)
            traj = await service.answer(q, engine, ticket)
        except _HTTPError as e:
            raise fail(e) from None
        return json.dumps({"answer": traj.answer, "trajectory": traj.model_dump(mode="json")})

    return server


def mcp_http_app(server: Any, api_key: str | None = None, host: str = "127.0.0.1") -> Any:
    """The server's streamable-HTTP ASGI app for clients reaching ``host`` (the SDK's
    DNS-rebinding protection accepts only loopback Host headers when it is a loopback address);
    with ``api_key``, a request without that key (``Authorization: Bearer KEY`` or
    ``X-API-Key: KEY``) gets 401 before the MCP layer."""
    app = server.streamable_http_app(host=host)
    if not api_key:
        return app

    async def guarded(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            if not key_matches(
                headers.get("authorization", ""), headers.get("x-api-key", ""), api_key
            ):
                body = json.dumps({"error": {"message": "missing or wrong API key"}}).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b"Bearer"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded
