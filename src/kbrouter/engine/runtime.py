"""The engine's :class:`~kbrouter.policies.base.Runtime`: timing, error capture, replay cache and
retrieval batching across concurrent questions.

One :class:`RunContext` lives for one ``Engine.answer``/``answer_many`` call (it owns the
per-KB micro-batchers, which are bound to the running event loop); each question gets a light
:class:`QuestionRuntime` view of it.

Batching: every KB has a :class:`KBBatcher`. A query waits until either as many queries are
pending as there are questions in flight (nobody else can add one), the batch is full, or a
short window (a few ms) has passed; then the whole batch goes to one ``kb.search`` call in a
worker thread. While a search runs, new queries queue up and form the next batch. When a batched
search raises, its queries are searched again one by one, so a bad query (an undecodable image,
say) fails only its own question.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from kbrouter.engine.cache import FileHasher, ReplayCache, chat_key, manifest_id, search_key
from kbrouter.engine.events import EventCallback, TraceEvent
from kbrouter.errors import ModelUnavailableError, UnknownKBError
from kbrouter.kb.base import KnowledgeBase
from kbrouter.models.base import ChatModel
from kbrouter.policies.base import Purpose
from kbrouter.types import (
    ChatMessage,
    ChatResult,
    Evidence,
    KBInfo,
    ModelCall,
    Query,
    Question,
    Retrieval,
    SamplingParams,
)

log = logging.getLogger(__name__)


class KBSource(Protocol):
    """What the engine needs from a KB registry (``kbrouter.kb.registry.KBRegistry`` fits)."""

    @property
    def infos(self) -> list[KBInfo]: ...

    def resolve(self, name: str) -> str: ...

    def get(self, name: str) -> KnowledgeBase: ...


def merge_params(defaults: SamplingParams, params: SamplingParams | None) -> SamplingParams:
    """``defaults`` overridden by the fields EXPLICITLY set in ``params``.

    So a policy can write ``SamplingParams(max_tokens=64)`` and keep the engine's temperature
    and seed.
    """
    if params is None:
        return defaults
    update = {name: getattr(params, name) for name in params.model_fields_set}
    return defaults.model_copy(update=update) if update else defaults


def _error_text(e: BaseException, limit: int = 500) -> str:
    msg = str(e) or type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


@dataclasses.dataclass
class _Pending:
    query: Query
    future: asyncio.Future[list[Evidence]]


def _deliver(
    p: _Pending, *, result: list[Evidence] | None = None, error: BaseException | None = None
) -> None:
    if p.future.done():
        return
    if error is not None:
        p.future.set_exception(error)
    else:
        p.future.set_result(result or [])


class KBBatcher:
    """Merges concurrent searches of one KB into batched ``kb.search`` calls (one event loop)."""

    def __init__(
        self,
        kb: KnowledgeBase,
        *,
        k: int,
        window: float,
        max_batch: int,
        in_flight: Callable[[], int],
    ) -> None:
        self.kb = kb
        self.k = k
        self.window = window
        self.max_batch = max_batch
        self._in_flight = in_flight
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self.batches: list[int] = []
        """Sizes of the batches sent so far (for tests and benchmarks)."""

    async def search(self, query: Query) -> list[Evidence]:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run(), name=f"kb-batcher-{self.kb.name}")
        fut: asyncio.Future[list[Evidence]] = loop.create_future()
        self._queue.put_nowait(_Pending(query, fut))
        return await fut

    async def _collect(self) -> list[_Pending]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.window
        while len(batch) < self.max_batch:
            while not self._queue.empty() and len(batch) < self.max_batch:
                batch.append(self._queue.get_nowait())
            if len(batch) >= min(self.max_batch, max(1, self._in_flight())):
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [p for p in batch if not p.future.cancelled()]

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            self.batches.append(len(batch))
            try:
                results = await asyncio.to_thread(self._search, [p.query for p in batch])
            except Exception as e:
                if len(batch) == 1:
                    _deliver(batch[0], error=e)
                    continue
                # One bad query (say an undecodable image) must fail only its own question:
                # search the batch again one query at a time. When two single queries in a row
                # fail the same way, the KB itself is failing (down, timing out): the rest get
                # that error at once instead of one more attempt each.
                last: type[BaseException] | None = None
                streak = 0
                for i, p in enumerate(batch):
                    if p.future.done():  # its question was cancelled meanwhile
                        continue
                    if streak >= 2:
                        for q in batch[i:]:
                            _deliver(q, error=e)
                        break
                    try:
                        (res,) = await asyncio.to_thread(self._search, [p.query])
                    except Exception as e1:
                        streak = streak + 1 if type(e1) is last else 1
                        last = type(e1)
                        _deliver(p, error=e1)
                    else:
                        streak, last = 0, None
                        _deliver(p, result=res)
                continue
            for p, res in zip(batch, results, strict=True):
                _deliver(p, result=res)

    def _search(self, queries: list[Query]) -> list[list[Evidence]]:
        results = self.kb.search(queries, self.k)
        if len(results) != len(queries):
            raise RuntimeError(
                f"KB {self.kb.name!r} returned {len(results)} result lists for "
                f"{len(queries)} queries"
            )
        return [list(r) for r in results]

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
            self._worker = None


class RunContext:
    """State shared by the questions of one engine run: model, KBs, cache, batchers."""

    def __init__(
        self,
        *,
        model: ChatModel,
        kbs: KBSource,
        sampling: SamplingParams,
        max_steps: int,
        top_k: int,
        retrieve_k: int,
        use_grammar: bool,
        cache: ReplayCache | None,
        batch_window: float,
        max_batch: int,
        on_event: EventCallback | None,
        max_unavailable: int = 3,
        purpose_models: Mapping[str, ChatModel] | None = None,
    ) -> None:
        self.model = model
        self.purpose_models = dict(purpose_models or {})
        """Backends for some call purposes (e.g. ``read`` with a larger model); the others use
        ``model``."""
        self._use_grammar = use_grammar
        self.kb_source = kbs
        self.sampling = sampling
        self.max_steps = max_steps
        self.top_k = top_k
        self.retrieve_k = retrieve_k
        self.supports_grammar = bool(use_grammar and model.supports_grammar)
        self.cache = cache
        self.batch_window = batch_window
        self.max_batch = max_batch
        self.on_event = on_event
        self.max_unavailable = max_unavailable
        self._unavailable = 0  # model calls in a row that could not reach the server
        self.in_flight = 0
        self.infos = list(kbs.infos)
        self._model_ids = {id(m): _safe_identity(m) for m in (model, *self.purpose_models.values())}
        self._hasher = FileHasher()
        self._batchers: dict[str, KBBatcher] = {}
        self._manifests: dict[str, str | None] = {}

    def batcher(self, kb_name: str, k: int) -> KBBatcher:
        key = f"{kb_name}\x00{k}"
        b = self._batchers.get(key)
        if b is None:
            b = KBBatcher(
                self.kb_source.get(kb_name),
                k=k,
                window=self.batch_window,
                max_batch=self.max_batch,
                in_flight=lambda: self.in_flight,
            )
            self._batchers[key] = b
        return b

    @property
    def batchers(self) -> dict[str, KBBatcher]:
        return dict(self._batchers)

    def manifest(self, kb_name: str) -> str | None:
        if kb_name not in self._manifests:
            try:
                self._manifests[kb_name] = manifest_id(self.kb_source.get(kb_name))
            except Exception:  # a KB that cannot open fails at search time, with a message
                self._manifests[kb_name] = None
        return self._manifests[kb_name]

    # ------------------------------------------------------------------ calls

    def model_for(self, purpose: str) -> ChatModel:
        """The backend that answers calls of ``purpose``."""
        return self.purpose_models.get(purpose, self.model)

    async def chat(
        self, purpose: Purpose, messages: list[ChatMessage], params: SamplingParams | None
    ) -> ModelCall:
        model = self.model_for(purpose)
        p = merge_params(self.sampling, params)
        if p.grammar is not None and not (self._use_grammar and model.supports_grammar):
            p = p.model_copy(update={"grammar": None})
        key = None
        if self.cache is not None:
            key = chat_key(self._model_ids[id(model)], messages, p, self._hasher)
            hit = self.cache.get_chat(key)
            if hit is not None:
                return ModelCall(
                    purpose=purpose,
                    messages=messages,
                    output=hit.text,
                    prompt_tokens=hit.prompt_tokens,
                    completion_tokens=hit.completion_tokens,
                    seconds=hit.seconds,
                    cached=True,
                )
        t0 = time.perf_counter()
        try:
            result: ChatResult = await model.chat(messages, p)
        except asyncio.CancelledError:
            raise
        except ModelUnavailableError as e:
            self._unavailable += 1
            if self._unavailable >= self.max_unavailable:
                raise ModelUnavailableError(
                    f"{e}; {self._unavailable} model calls in a row could not reach the "
                    "server, so the run stops (finished questions are kept: fix the server and "
                    "run the same command again to resume)"
                ) from None
            log.warning("model call (%s) failed: %s", purpose, e)
            return ModelCall(
                purpose=purpose,
                messages=messages,
                output="",
                seconds=time.perf_counter() - t0,
                error=f"{type(e).__name__}: {_error_text(e)}",
            )
        except Exception as e:
            log.warning("model call (%s) failed: %s", purpose, e)
            return ModelCall(
                purpose=purpose,
                messages=messages,
                output="",
                seconds=time.perf_counter() - t0,
                error=f"{type(e).__name__}: {_error_text(e)}",
            )
        self._unavailable = 0
        seconds = time.perf_counter() - t0
        if self.cache is not None and key is not None:
            self.cache.put_chat(key, result.model_copy(update={"seconds": seconds}))
        return ModelCall(
            purpose=purpose,
            messages=messages,
            output=result.text,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            seconds=seconds,
            cached=bool(result.cached),
        )

    async def retrieve(self, kb: str, query: Query, k: int | None) -> Retrieval:
        k = k or self.retrieve_k
        try:
            name = self.kb_source.resolve(kb)
        except UnknownKBError as e:
            return Retrieval(kb=kb, query=query, evidence=[], error=str(e))
        key = None
        if self.cache is not None:
            key = search_key(name, self.manifest(name), query, k, self._hasher)
            hit = self.cache.get_search(key)
            if hit is not None:
                evidence, seconds = hit
                return Retrieval(
                    kb=name, query=query, evidence=evidence, seconds=seconds, cached=True
                )
        t0 = time.perf_counter()
        try:
            evidence = await self.batcher(name, k).search(query)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("search of KB %r failed: %s", name, e)
            return Retrieval(
                kb=name,
                query=query,
                evidence=[],
                seconds=time.perf_counter() - t0,
                error=f"{type(e).__name__}: {_error_text(e)}",
            )
        seconds = time.perf_counter() - t0
        if self.cache is not None and key is not None:
            self.cache.put_search(key, evidence, seconds)
        return Retrieval(kb=name, query=query, evidence=evidence, seconds=seconds)

    async def lookup(self, kb: str, doc_ids: Sequence[str], query: Query) -> Retrieval:
        try:
            name = self.kb_source.resolve(kb)
        except UnknownKBError as e:
            return Retrieval(kb=kb, query=query, evidence=[], error=str(e))
        t0 = time.perf_counter()
        try:
            found = await asyncio.to_thread(self.kb_source.get(name).fetch, list(doc_ids))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return Retrieval(
                kb=name,
                query=query,
                evidence=[],
                seconds=time.perf_counter() - t0,
                error=f"{type(e).__name__}: {_error_text(e)}",
            )
        evidence = [ev for group in found for ev in group]
        missing = [d for d, group in zip(doc_ids, found, strict=True) if not group]
        error = (
            f"no item with id {', '.join(map(repr, missing))} in KB {name!r}" if missing else None
        )
        return Retrieval(
            kb=name, query=query, evidence=evidence, seconds=time.perf_counter() - t0, error=error
        )

    async def aclose(self) -> None:
        for b in self._batchers.values():
            await b.aclose()


def _safe_identity(model: ChatModel) -> dict[str, Any]:
    """The model's content identity (the replay cache key's model part)."""
    try:
        return dict(model.identity())
    except Exception as e:  # an identity that cannot be computed must not stop a run
        log.warning("model identity unavailable (%s); keying the cache on the name", e)
        return {"backend": type(model).__name__, "name": model.name}


class QuestionRuntime:
    """The :class:`~kbrouter.policies.base.Runtime` one question's policy run sees."""

    def __init__(self, ctx: RunContext, index: int | None = None) -> None:
        self._ctx = ctx
        self.index = index

    @property
    def kbs(self) -> list[KBInfo]:
        return self._ctx.infos

    @property
    def supports_images(self) -> bool:
        return bool(self._ctx.model.supports_images)

    @property
    def prompt_variant(self) -> str | None:
        # the router prompt is the route calls' prompt: the variant of the model that makes them
        return self._ctx.model_for("route").prompt_variant

    @property
    def supports_grammar(self) -> bool:
        """Whether GBNF grammars are enforced (backend support and the engine switch)."""
        return self._ctx.supports_grammar

    @property
    def max_steps(self) -> int:
        return self._ctx.max_steps

    @property
    def top_k(self) -> int:
        return self._ctx.top_k

    def resolve_kb(self, name: str) -> str:
        return self._ctx.kb_source.resolve(name)

    async def chat(
        self, purpose: Purpose, messages: list[ChatMessage], params: SamplingParams | None = None
    ) -> ModelCall:
        return await self._ctx.chat(purpose, messages, params)

    async def retrieve(self, kb: str, query: Query, k: int | None = None) -> Retrieval:
        return await self._ctx.retrieve(kb, query, k)

    async def lookup(self, kb: str, doc_ids: Sequence[str], query: Query) -> Retrieval:
        return await self._ctx.lookup(kb, doc_ids, query)

    def emit(self, event: TraceEvent) -> None:
        """Forward a progress event to the engine's ``on_event`` callback (errors are logged)."""
        cb = self._ctx.on_event
        if cb is None:
            return
        try:
            cb(dataclasses.replace(event, index=self.index))
        except Exception:
            log.exception("on_event callback failed")

    def question_started(self, question: Question) -> None:
        self._ctx.in_flight += 1

    def question_finished(self, question: Question) -> None:
        self._ctx.in_flight -= 1
