"""Test doubles for kbrouter's policies and engine. FOR TESTS ONLY — never a default anywhere.

:class:`ScriptedChatModel` is the DSPy ``DummyLM`` idea: a chat backend whose replies are
scripted (a list returned in order, or a function of the messages), which records every request
and can be told to fail at chosen calls. :class:`StaticKB` and :class:`StaticKBRegistry` are an
instant in-memory knowledge base and registry for engine unit tests and overhead benchmarks.
Real behaviour is tested against real KBs and the real embedded model elsewhere.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from kbrouter.errors import ModelError, UnknownKBError
from kbrouter.kb.base import KnowledgeBase
from kbrouter.models.base import ChatModel
from kbrouter.types import (
    ChatMessage,
    ChatResult,
    Evidence,
    KBInfo,
    Modality,
    Query,
    SamplingParams,
    kb_key,
)

Script = Sequence[str] | Callable[[list[ChatMessage]], str]


class ScriptedChatModel(ChatModel):
    """A scripted chat model (tests only).

    Args:
        outputs: replies returned in call order, or a function ``messages -> reply``.
        fail_at: 0-based call numbers at which :class:`~kbrouter.errors.ModelError` is raised
            (a failing call still counts and is recorded, but consumes no scripted output).
        supports_images: whether the fake claims to see image parts.
        supports_grammar: whether the fake claims to enforce GBNF grammars.
        latency: seconds each call sleeps (``asyncio.sleep``), to exercise concurrency.
        name: model name recorded in trajectories and cache keys.

    Every request is appended to :attr:`requests` as ``(messages, params)``. When a list script
    runs out, the call raises :class:`ModelError` (a test asking for more calls than it
    scripted is a bug in the test or in the code under test).
    """

    def __init__(
        self,
        outputs: Script,
        *,
        fail_at: Iterable[int] = (),
        supports_images: bool = False,
        supports_grammar: bool = False,
        latency: float = 0.0,
        name: str = "scripted",
    ) -> None:
        self._outputs: Script = outputs if callable(outputs) else list(outputs)
        self._next = 0
        self.fail_at = set(fail_at)
        self.supports_images = supports_images
        self.supports_grammar = supports_grammar
        self.latency = latency
        self.name = name
        self.requests: list[tuple[list[ChatMessage], SamplingParams]] = []
        self.calls = 0
        self.max_in_flight = 0
        self._in_flight = 0

    async def chat(
        self, messages: list[ChatMessage], params: SamplingParams | None = None
    ) -> ChatResult:
        call = self.calls
        self.calls += 1
        self.requests.append((list(messages), params or SamplingParams()))
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
            if call in self.fail_at:
                raise ModelError(f"scripted failure at call {call}")
            if callable(self._outputs):
                text = self._outputs(list(messages))
            else:
                if self._next >= len(self._outputs):
                    raise ModelError(
                        f"script exhausted: call {call} but only {len(self._outputs)} outputs"
                    )
                text = self._outputs[self._next]
                self._next += 1
        finally:
            self._in_flight -= 1
        prompt_words = sum(len(m.text().split()) for m in messages)
        return ChatResult(
            text=text,
            prompt_tokens=prompt_words,
            completion_tokens=len(text.split()),
            model=self.name,
            finish_reason="stop",
        )


class StaticKB(KnowledgeBase):
    """An instant in-memory KB (tests and overhead benchmarks only).

    ``search`` ranks the given evidence by how many query words occur in each item's text
    (ties keep the given order) and returns the top ``k``. Every call is recorded in
    :attr:`search_calls` as the list of query texts, so tests can check batching.
    """

    def __init__(
        self,
        name: str,
        evidence: Sequence[Evidence] = (),
        *,
        description: str = "",
        modality: Modality = Modality.TEXT,
        aliases: Sequence[str] = (),
        k: int = 5,
        fail: bool = False,
    ) -> None:
        self.info = KBInfo(
            name=name,
            description=description or f"{modality.value} knowledge base {name}",
            modality=modality,
            aliases=list(aliases),
        )
        self.evidence = list(evidence)
        self.k = k
        self.fail = fail
        self.search_calls: list[list[str]] = []
        self.queries: list[Query] = []
        self._lock = threading.Lock()

    def search(self, queries: Sequence[Query], k: int | None = None) -> list[list[Evidence]]:
        with self._lock:
            self.search_calls.append([q.text for q in queries])
            self.queries.extend(queries)
        if self.fail:
            raise RuntimeError(f"search failed in KB {self.name!r}")
        k = k or self.k
        out: list[list[Evidence]] = []
        for q in queries:
            words = {w.strip("?.,!").lower() for w in q.text.split()}
            scored = []
            for i, ev in enumerate(self.evidence):
                hits = sum(1 for w in ev.text.lower().split() if w.strip("?.,!") in words)
                scored.append((-hits, i, ev))
            scored.sort(key=lambda t: (t[0], t[1]))
            out.append(
                [ev.model_copy(update={"score": float(-h)}) for h, _, ev in scored[:k] if h < 0]
            )
        return out

    def __len__(self) -> int:
        return len(self.evidence)

    def fetch(self, doc_ids: Sequence[str]) -> list[list[Evidence]]:
        """The given evidence whose ``metadata["doc_id"]`` (else id) matches, in order."""

        def doc(ev: Evidence) -> str:
            return str(ev.metadata.get("doc_id", ev.id))

        return [[e for e in self.evidence if doc(e) == str(d)] for d in doc_ids]


class StaticKBRegistry:
    """A registry over given :class:`KnowledgeBase` objects (``infos``/``resolve``/``get``).

    Name resolution is case- and space-insensitive over names and aliases, like the real
    registry.
    """

    def __init__(self, kbs: Sequence[KnowledgeBase]) -> None:
        self._kbs = {kb.name: kb for kb in kbs}
        self._names: dict[str, str] = {}
        for kb in kbs:
            for n in [kb.name, *kb.info.aliases]:
                self._names[kb_key(n)] = kb.name

    @property
    def infos(self) -> list[KBInfo]:
        return [kb.info for kb in self._kbs.values()]

    def resolve(self, name: str) -> str:
        key = kb_key(name)
        if key not in self._names:
            raise UnknownKBError(name, list(self._kbs))
        return self._names[key]

    def get(self, name: str) -> KnowledgeBase:
        return self._kbs[self.resolve(name)]


def demo_registry(
    index_dir: str | Path,
    *,
    config: str | Path | None = None,
    lexical_only: bool = True,
    build: bool = True,
) -> Any:
    """A real :class:`~kbrouter.kb.registry.KBRegistry` over the repo's demo data (tests only).

    The demo ``kbs.toml`` is used with its index placed in ``index_dir``; with
    ``lexical_only`` every KB uses BM25 and no image encoder, so the build takes well under a
    second and loads no neural model (real KBs, real indexes, cheap enough for unit tests).
    """
    import tomllib

    from kbrouter.config import DEMO_CONFIG, parse_registry
    from kbrouter.kb.registry import KBRegistry

    path = Path(config) if config is not None else DEMO_CONFIG
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    data["index_dir"] = str(Path(index_dir).resolve())
    if lexical_only:
        for kb in data["kb"]:
            kb.setdefault("retrieval", {})["mode"] = "bm25"
            if kb.get("modality") == "image":
                kb["image_encoder"] = None
    reg = KBRegistry(parse_registry(data, path.parent.resolve(), str(path)))
    if build:
        reg.build(progress=False)
    return reg


def lexical_demo_config(folder: str | Path) -> Path:
    """A ``kbs.toml`` in ``folder`` for the demo text and table KBs, BM25 only, with its index
    in ``folder/index`` (not built): cheap KBs for tests that run the CLI in a subprocess."""
    from kbrouter.config import DEMO_CONFIG

    folder = Path(folder)
    demo = DEMO_CONFIG.parent
    cfg = folder / "kbs.toml"
    cfg.write_text(
        f"""
index_dir = "{folder / "index"}"
[[kb]]
name = "text"
description = "Encyclopedia passages."
modality = "text"
aliases = ["Text Retriever"]
source = {{ path = "{demo / "text.jsonl"}" }}
retrieval = {{ mode = "bm25" }}
[[kb]]
name = "tables"
description = "Fact tables with numbers."
modality = "table"
source = {{ manifest = "{demo / "tables.jsonl"}" }}
retrieval = {{ mode = "bm25" }}
""",
        encoding="utf-8",
    )
    return cfg


class LiveServer:
    """An ASGI app served by uvicorn in a background thread on a free port of 127.0.0.1 (tests
    and benchmarks only): ``with LiveServer(app) as s: ... s.url``."""

    def __init__(self, app: Any, *, timeout: float = 20.0) -> None:
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.timeout = timeout
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
