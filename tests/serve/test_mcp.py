"""``kbrouter mcp`` over stdio, driven by the official MCP SDK's own client: the demo KBs (BM25)
and a local OpenAI-compatible chat server (tests/models/chat_server.py) as the model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo"
sys.path.insert(0, str(REPO / "tests" / "models"))

pytest.importorskip("mcp")


@pytest.fixture(scope="module")
def fake_server():
    from chat_server import ChatServer

    with ChatServer() as server:
        yield server


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kbrouter.testing import lexical_demo_config

    return lexical_demo_config(tmp_path_factory.mktemp("mcp"))


def _text(result) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


def test_mcp_stdio_tools_with_the_sdk_client(config: Path, fake_server):
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    exe = Path(sys.executable).parent / "kbrouter"
    params = StdioServerParameters(
        command=str(exe),
        args=["mcp", "--kbs", str(config), "--model", f"openai:fake@{fake_server.base_url}"],
        env={"HF_HUB_OFFLINE": "1"},
    )

    async def session() -> None:
        async with Client(params, read_timeout_seconds=120) as client:
            tools = await client.list_tools()
            assert {t.name for t in tools.tools} == {"list_kbs", "search", "ask"}

            kbs = json.loads(_text(await client.call_tool("list_kbs", {})))["kbs"]
            assert [(k["name"], k["modality"]) for k in kbs] == [
                ("text", "text"),
                ("tables", "table"),
            ]
            assert all(k["size"] for k in kbs)

            query = {"kb": "Text Retriever", "query": "Canberra capital", "k": 3}
            hits = json.loads(_text(await client.call_tool("search", query)))
            assert hits["kb"] == "text" and len(hits["evidence"]) == 3
            assert "canberra" in [e["id"] for e in hits["evidence"]]

            bad = await client.call_tool("search", {"kb": "nope", "query": "x"})
            assert bad.is_error and "nope" in _text(bad)
            bad = await client.call_tool("ask", {"question": "q", "method": "no-such-method"})
            assert bad.is_error and "unknown method 'no-such-method'" in _text(bad)

            # the fake model echoes: router replies are unusable, so the run falls back and
            # the final answer is the echo of the final prompt (the whole engine path runs)
            got = json.loads(
                _text(await client.call_tool("ask", {"question": "What is the capital of Peru?"}))
            )
            assert got["answer"].startswith("echo:")
            traj = got["trajectory"]
            assert traj["question"]["text"] == "What is the capital of Peru?"
            assert traj["method"] == "r1router" and traj["stop_reason"] == "format_fallback"

    anyio.run(session)


def test_mcp_streamable_http_with_the_sdk_client(tmp_path):
    """Over streamable HTTP with an API key: a request without it is refused (401) before the
    MCP layer; the SDK client sending it as a bearer token uses every tool."""
    import httpx
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    from kbrouter.serve.mcp import create_mcp_server, mcp_http_app
    from kbrouter.testing import LiveServer, ScriptedChatModel, demo_registry

    def reply(messages) -> str:
        if "<ret>" in messages[0].text():
            return "<think>t</think><sub-question>None</sub-question><ret>None</ret>"
        return "<answer>Canberra</answer>"

    registry = demo_registry(tmp_path / "index")
    server = create_mcp_server(ScriptedChatModel(reply), registry)

    async def session(url: str) -> None:
        keyed = httpx2.AsyncClient(headers={"Authorization": "Bearer mcp-key"}, timeout=60)
        transport = streamable_http_client(f"{url}/mcp", http_client=keyed)
        async with keyed, Client(transport, read_timeout_seconds=60) as client:
            hits = json.loads(
                _text(await client.call_tool("search", {"kb": "tables", "query": "Canberra"}))
            )
            assert hits["kb"] == "tables" and hits["evidence"]
            got = json.loads(
                _text(
                    await client.call_tool(
                        "ask", {"question": "What is the capital of Australia?", "method": "direct"}
                    )
                )
            )
            assert got["answer"] == "Canberra" and got["trajectory"]["method"] == "direct"
            bad = await client.call_tool("ask", {"question": "q", "max_steps": 99})
            assert bad.is_error and "max_steps" in _text(bad)

    try:
        with LiveServer(mcp_http_app(server, "mcp-key")) as live:
            for headers in ({}, {"X-API-Key": "wrong"}):
                r = httpx.post(f"{live.url}/mcp", json={"jsonrpc": "2.0"}, headers=headers)
                assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
            anyio.run(session, live.url)
    finally:
        registry.close()
