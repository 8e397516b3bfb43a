"""The HTTP API: kbrouter behind a service, on the same engine as the CLI.

``create_app(model, registry, config)`` builds a FastAPI app (OpenAPI at ``/openapi.json``):

``GET /healthz``, ``GET /readyz``
    Liveness; readiness (200 once every KB is open and the model answered a one-token call).
``GET /v1/kbs``, ``POST /v1/search``
    The KBs (names, descriptions, modality, aliases, size); one KB searched directly.
``POST /v1/answer``
    A question (optional image, method, budget, top-k) as JSON (image base64) or as
    ``multipart/form-data`` (image as a file part) -> the answer and the full trajectory;
    with ``"stream": true`` or ``Accept: text/event-stream`` the steps arrive as server-sent
    events (:mod:`kbrouter.serve.events`). A client that disconnects cancels its
    question's remaining model calls.
``GET /v1/models``, ``POST /v1/chat/completions``
    OpenAI-compatible: ``model`` picks the method (``kbrouter/r1-router``, ...); image parts of
    the last user message become the question image; ``stream: true`` sends
    ``chat.completion.chunk`` events ending in ``[DONE]``; the trajectory is in the response's
    ``kbrouter`` field (non-streaming) or the last chunk's.
``GET /v1/images/{kb}/{doc_id}``
    The picture of an image-KB item (looked up by id, never by a client path).
``GET /`` (the trace viewer), ``GET /v1/results[/{name}[/{question id}]]``
    A plain HTML/JS page (package data, no build step) to ask a question and watch its steps
    arrive, compare two methods, and browse the evaluation results directories the server was
    started with (by name; a trajectory as the viewer shows it, no server paths).

Request bodies over ``ServeConfig.max_body_bytes`` are refused (413) before anything parses them.
One engine per (method, budget, top-k) is shared by all requests; at most
``ServeConfig.max_concurrent`` questions run at once (429 beyond). With an API key configured,
requests need ``Authorization: Bearer <key>`` or ``X-API-Key`` (constant-time comparison; the key
is never logged).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from kbrouter.engine.engine import Engine, EngineConfig
from kbrouter.engine.runtime import KBSource
from kbrouter.errors import KBRouterError, ModelUnavailableError, UnknownKBError
from kbrouter.models.base import ChatModel
from kbrouter.serve.events import evidence_json, sse_events, trajectory_view
from kbrouter.types import (
    ChatMessage,
    Evidence,
    Query,
    Question,
    SamplingParams,
    TraceEvent,
    Trajectory,
)

log = logging.getLogger(__name__)

__all__ = ["AnswerRequest", "AnswerUpload", "SearchRequest", "ServeConfig", "create_app"]


class ServeConfig(BaseModel):
    """Settings of the service."""

    model_config = ConfigDict(extra="forbid")

    default_method: str = Field("r1-router", description="Method when a request names none.")
    methods: list[str] = Field(
        default_factory=lambda: ["r1-router", "all-kbs", "iterretgen", "direct"],
        description="Methods offered (``/v1/models``); learned-router and hybrid need a router.",
    )
    router: str | None = Field(None, description="Saved learned router (learned-router, hybrid).")
    max_steps: int = Field(3, ge=0, le=10, description="Default retrieval-step budget.")
    top_k: int = Field(5, gt=0, le=50, description="Default evidence items per KB shown.")
    max_concurrent: int = Field(8, gt=0, description="Questions in flight; more get 429.")
    max_question_chars: int = Field(4000, gt=0, description="Longest question accepted.")
    max_image_bytes: int = Field(10_000_000, gt=0, description="Largest image upload (bytes).")
    max_image_pixels: int = Field(40_000_000, gt=0, description="Largest image (pixels).")
    max_body_bytes: int = Field(
        16_000_000,
        gt=0,
        description="Largest request body, checked before anything is parsed (413 beyond).",
    )
    api_key: SecretStr | None = Field(None, description="Required key (None: no auth).")
    results_dirs: list[str] = Field(
        default_factory=list,
        description="Evaluation results directories the trace viewer may browse (by name only).",
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector for OpenInference spans (None: no tracing); see "
        "kbrouter.serve.tracing.",
    )


class AnswerRequest(BaseModel):
    """``POST /v1/answer``."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(..., min_length=1)
    image_base64: str | None = Field(None, description="The question image, base64.")
    method: str | None = None
    max_steps: int | None = Field(None, ge=0, le=10)
    top_k: int | None = Field(None, gt=0, le=50)
    stream: bool = False


class AnswerUpload(BaseModel):
    """``POST /v1/answer`` as ``multipart/form-data``: the same fields as form fields, and the
    image as a file part named ``image``."""

    question: str
    image: bytes | None = Field(None, json_schema_extra={"format": "binary"})
    method: str | None = None
    max_steps: int | None = Field(None, ge=0, le=10)
    top_k: int | None = Field(None, gt=0, le=50)
    stream: bool = False


async def _answer_request(request: Request) -> tuple[AnswerRequest, bytes | None]:
    """The answer request from a JSON or a multipart body (400 naming what is wrong)."""
    from pydantic import ValidationError

    ctype = request.headers.get("content-type", "")
    upload: bytes | None = None
    try:
        if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            try:
                form = await request.form(max_files=1, max_fields=16)
            except Exception as e:  # noqa: BLE001 - a malformed multipart body
                raise _HTTPError(400, f"malformed multipart body: {e}") from None
            fields: dict[str, Any] = {}
            for key, value in form.multi_items():
                if key == "image" and not isinstance(value, str):
                    upload = await value.read()
                elif key == "image":
                    raise _HTTPError(400, "the 'image' part must be a file upload")
                elif isinstance(value, str):
                    fields[key] = value
                else:
                    raise _HTTPError(400, f"unexpected file part {key!r}")
            if "image_base64" in fields:
                raise _HTTPError(400, "send the image as a file part named 'image'")
            req = AnswerRequest.model_validate(fields)
        else:
            raw = await request.body()
            req = AnswerRequest.model_validate_json(raw or b"null")
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
        )
        raise _HTTPError(422, f"invalid answer request: {problems}") from None
    return req, upload


class _BodyLimit:
    """ASGI middleware: a request body larger than ``limit`` bytes is refused with 413 before
    any handler parses it (by Content-Length, or while reading a chunked body)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(send)
            return
        body: list[dict] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                body.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(send)
                return
            body.append(message)
            if not message.get("more_body"):
                break

        async def replay() -> dict:
            return body.pop(0) if body else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        payload = json.dumps(
            {"error": {"message": f"the request body exceeds {self.limit} bytes"}}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


class SearchRequest(BaseModel):
    """``POST /v1/search``."""

    model_config = ConfigDict(extra="forbid")

    kb: str
    query: str = Field(..., min_length=1)
    k: int = Field(5, gt=0, le=100)
    image_base64: str | None = None


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def key_matches(authorization: str, x_api_key: str, want: str) -> bool:
    """Whether a request's ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` header carries
    the key ``want`` (compared in constant time)."""
    got = authorization[7:] if authorization.lower().startswith("bearer ") else x_api_key
    return hmac.compare_digest(got.encode(), want.encode())


class Service:
    """What the app's handlers share: model, KBs, engines, limits, uploaded images."""

    def __init__(
        self,
        model: ChatModel,
        registry: KBSource,
        config: ServeConfig,
        tracer: Any = None,
        purpose_models: Mapping[str, ChatModel] | None = None,
    ) -> None:
        from kbrouter.engine.engine import check_purposes

        check_purposes(purpose_models or {})
        self.model, self.registry, self.config = model, registry, config
        self.purpose_models = dict(purpose_models or {})
        self._owns_tracer = tracer is None and bool(config.otlp_endpoint)
        if self._owns_tracer:
            from kbrouter.serve import tracing

            tracer = tracing.tracer_from_endpoint(
                str(config.otlp_endpoint), model_name=_model_name(model)
            )
        self.tracer = tracer
        self.engines: dict[tuple[str, int, int], Engine] = {}
        self.slots = asyncio.Semaphore(config.max_concurrent)
        self.in_flight = 0
        self.ready = False
        self.not_ready_reason = "starting"
        self._checked = time.monotonic()
        self._tmp = tempfile.TemporaryDirectory(prefix="kbrouter-serve-")
        self.upload_dir = Path(self._tmp.name)

    async def start(self) -> None:
        try:
            for info in self.registry.infos:
                self.registry.get(info.name)  # opens the index (a clear error if broken)
            self.engine(None, None, None)  # the default method, built before the first request
            for model in (self.model, *self.purpose_models.values()):
                await model.chat(
                    [ChatMessage(role="user", content="ping")], SamplingParams(max_tokens=1)
                )
        except Exception as e:  # noqa: BLE001 - readiness reports it
            self.not_ready_reason = f"{type(e).__name__}: {e}"
            log.error("not ready: %s", self.not_ready_reason)
            return
        self.ready = True
        self.not_ready_reason = ""

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        try:
            if self._owns_tracer:  # a tracer passed in is its owner's to close
                self.tracer.close()
        finally:
            self._tmp.cleanup()

    def engine(self, method: str | None, max_steps: int | None, top_k: int | None) -> Engine:
        from kbrouter.policies.baselines import make_policy

        name = (method or self.config.default_method).strip()
        if name.startswith("kbrouter/"):
            name = name[len("kbrouter/") :]
        if name not in self.config.methods:
            raise _HTTPError(
                400, f"unknown method {name!r}; this server offers {', '.join(self.config.methods)}"
            )
        key = (name, self.config.max_steps if max_steps is None else max_steps,
               self.config.top_k if top_k is None else top_k)  # fmt: skip
        engine = self.engines.get(key)
        if engine is None:
            options: dict[str, Any] = {}
            if name in ("learned-router", "hybrid"):
                options["router"] = self.config.router
            try:
                policy = make_policy(name, **options)
            except KBRouterError as e:
                raise _HTTPError(400, str(e)) from None
            engine = Engine(
                self.model,
                self.registry,
                policy,
                EngineConfig(max_steps=key[1], top_k=key[2]),
                purpose_models=self.purpose_models,
            )
            self.engines[key] = engine
        return engine

    def save_image(self, data: str | bytes) -> Path:
        """Decode, check and store an uploaded image; its path for the question."""
        from PIL import Image, UnidentifiedImageError

        if isinstance(data, str):
            if data.startswith("data:"):
                data = data.split(",", 1)[-1]
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise _HTTPError(400, "the image is not valid base64") from None
        else:
            raw = data
        if len(raw) > self.config.max_image_bytes:
            raise _HTTPError(
                413, f"image of {len(raw)} bytes exceeds {self.config.max_image_bytes}"
            )
        try:
            # only plain raster formats: never EPS/PS (Ghostscript) or other exotic decoders
            with Image.open(io.BytesIO(raw), formats=["PNG", "JPEG", "WEBP", "GIF", "BMP"]) as im:
                w, h = im.size
                if w * h > self.config.max_image_pixels:
                    raise _HTTPError(413, f"image of {w}x{h} pixels is too large")
                im.verify()
                fmt = (im.format or "png").lower()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise _HTTPError(
                400, f"the upload is not a decodable image ({type(e).__name__})"
            ) from None
        path = self.upload_dir / f"{uuid.uuid4().hex}.{'jpg' if fmt == 'jpeg' else fmt}"
        path.write_bytes(raw)
        return path

    def question(self, text: str, image: str | bytes | None) -> Question:
        text = text.strip()
        if not text:
            raise _HTTPError(400, "the question is empty")
        if len(text) > self.config.max_question_chars:
            raise _HTTPError(
                413, f"the question exceeds {self.config.max_question_chars} characters"
            )
        return Question(
            text=text,
            image=self.save_image(image) if image else None,
            id=uuid.uuid4().hex[:12],
        )

    async def ticket(self) -> _Ticket:
        """A slot for one question, taken at once or a 429 (no await between the check and
        the take, so two requests cannot both pass)."""
        if self.slots.locked():
            raise _HTTPError(429, f"busy: {self.config.max_concurrent} questions in flight")
        await self.slots.acquire()
        self.in_flight += 1
        return _Ticket(self)

    async def admit(self, text: str, image: str | bytes | None) -> tuple[Question, _Ticket]:
        """Take a slot, then store the question (and its upload); both are released together."""
        ticket = await self.ticket()
        try:
            question = self.question(text, image)
        except BaseException:
            ticket.release()
            raise
        ticket.image = question.image
        return question, ticket

    def kb_list(self) -> list[dict[str, Any]]:
        """Name, description, modality, size and index facts of every KB."""
        out = []
        for info in self.registry.infos:
            try:
                size: int | None = len(self.registry.get(info.name))
            except (KBRouterError, NotImplementedError, TypeError):
                size = None
            out.append({**info.model_dump(mode="json"), "size": size})
        return out

    async def search(
        self, kb: str, query: str, k: int, image_base64: str | None = None
    ) -> dict[str, Any]:
        """One KB's top-``k`` evidence for ``query`` (and an optional image)."""
        try:
            name = self.registry.resolve(kb)
        except UnknownKBError as e:
            raise _HTTPError(400, str(e)) from None
        if not query.strip():
            raise _HTTPError(400, "the query is empty")
        image = self.save_image(image_base64) if image_base64 else None
        try:
            [hits] = await asyncio.to_thread(
                self.registry.get(name).search, [Query(text=query, image=image)], k
            )
        except KBRouterError as e:
            raise _HTTPError(400, str(e)) from None
        finally:
            if image is not None:
                image.unlink(missing_ok=True)
        return {"kb": name, "evidence": [evidence_json(e, _image_url(e)) for e in hits]}

    async def run(self, question: Question, engine: Engine, on_event: Any = None) -> Trajectory:
        """``engine.answer`` (inside OpenInference spans when tracing is on); 503 when the
        model server cannot be reached."""
        try:
            if self.tracer is not None:
                return await self.tracer.answer(engine, question, on_event)
            return await engine.answer(question, on_event=on_event)
        except ModelUnavailableError as e:
            raise _HTTPError(503, f"the model server cannot be reached: {e}") from None

    async def answer(
        self, question: Question, engine: Engine, ticket: _Ticket, on_event: Any = None
    ) -> Trajectory:
        """Answer an admitted question on the shared engine and release its slot; a 503 when
        the model is unreachable or the answer failed on a model error."""
        try:
            traj = await self.run(question, engine, on_event)
        finally:
            ticket.release()
        if traj.error and traj.stop_reason == "error":
            raise _HTTPError(503, f"answering failed: {traj.error}")
        return traj

    async def maybe_recheck(self) -> None:
        """Re-run the readiness check (at most every 5 s) while not ready."""
        now = time.monotonic()
        if not self.ready and now - self._checked > 5.0:
            self._checked = now
            await self.start()


class _Ticket:
    """One question's slot and uploaded image; released once, whichever path ends first."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.image: Path | None = None
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.service.in_flight -= 1
        self.service.slots.release()
        if self.image is not None:
            self.image.unlink(missing_ok=True)


def _image_url(ev: Evidence) -> str | None:
    if ev.image_path is None:
        return None
    return f"/v1/images/{quote(ev.kb, safe='')}/{quote(ev.doc_id, safe='')}"


STATIC = Path(__file__).resolve().parent / "static"
VIEWER_FILES = {
    "index.html": "text/html",
    "viewer.js": "text/javascript",
    "viewer.css": "text/css",
}


def _results_index(dirs: list[str]) -> dict[str, Path]:
    """Configured results directories by a unique name (the folder name, numbered if needed)."""
    out: dict[str, Path] = {}
    for d in dirs:
        path = Path(d).resolve()
        name, n = path.name or "results", 2
        while name in out:
            name, n = f"{path.name}-{n}", n + 1
        out[name] = path
    return out


def _results_summary(name: str, path: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    return {
        "name": name,
        "method": summary.get("method"),
        "dataset": summary.get("dataset"),
        "questions": summary.get("questions", 0),
        "f1_recall": summary.get("f1_recall"),
    }


def _records(index: dict[str, Path], name: str) -> list[dict[str, Any]]:
    from kbrouter.eval.harness import load_results

    if name not in index:
        offered = ", ".join(index) or "none"
        raise _HTTPError(404, f"no results {name!r}; this server offers {offered}")
    return load_results(index[name])


def _result_item(r: dict[str, Any]) -> dict[str, Any]:
    traj = r.get("trajectory") or {}
    kbs = sorted(
        {x["kb"] for s in traj.get("steps", []) for x in s.get("retrievals", []) if x.get("kb")}
    )
    stage = (r.get("attribution") or {}).get("stage")
    f1 = (r.get("scores") or {}).get("f1_recall", 0.0)
    return {
        "id": str(r.get("id")),
        "question": r.get("question") or traj.get("question", {}).get("text", ""),
        "prediction": r.get("prediction", ""),
        "f1_recall": f1,
        "correct": stage == "correct" if stage else f1 >= 0.5,
        "stage": stage,
        "kbs": kbs,
    }


def _model_name(model: ChatModel) -> str:
    try:
        return str(model.describe().get("name") or type(model).__name__)
    except Exception:  # noqa: BLE001 - a name for spans only
        return type(model).__name__


def create_app(
    model: ChatModel,
    registry: KBSource,
    config: ServeConfig | None = None,
    *,
    tracer: Any = None,
    purpose_models: Mapping[str, ChatModel] | None = None,
) -> FastAPI:
    """The FastAPI app serving ``model`` over ``registry`` (see the module docstring).

    ``tracer``: an :class:`~kbrouter.serve.tracing.OpenInferenceTracer` (else one is built when
    ``config.otlp_endpoint`` is set; else no spans). ``purpose_models``: backends for some call
    purposes, as in :class:`~kbrouter.engine.engine.Engine` (readiness pings them too)."""
    cfg = config or ServeConfig()
    service = Service(model, registry, cfg, tracer, purpose_models)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="kbrouter",
        description="Step-wise retrieval-augmented answers across several knowledge bases.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes)

    @app.exception_handler(_HTTPError)
    async def _http_error(request: Request, exc: _HTTPError) -> JSONResponse:
        return JSONResponse({"error": {"message": exc.message}}, status_code=exc.status)

    async def auth(request: Request) -> None:
        if cfg.api_key is None:
            return
        got = request.headers.get("authorization", ""), request.headers.get("x-api-key", "")
        if not key_matches(*got, cfg.api_key.get_secret_value()):
            raise _HTTPError(401, "missing or wrong API key")

    guarded = [Depends(auth)]

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        await service.maybe_recheck()
        if service.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "reason": service.not_ready_reason}, status_code=503)

    @app.get("/v1/kbs", dependencies=guarded)
    async def kbs() -> dict[str, Any]:
        return {"kbs": service.kb_list()}

    @app.post("/v1/search", dependencies=guarded)
    async def search(req: SearchRequest) -> dict[str, Any]:
        return await service.search(req.kb, req.query, req.k, req.image_base64)

    @app.get("/v1/images/{kb}/{doc_id:path}", dependencies=guarded)
    async def image(kb: str, doc_id: str) -> FileResponse:
        try:
            name = registry.resolve(kb)
            found = registry.get(name).fetch([doc_id])[0]
        except (UnknownKBError, NotImplementedError):
            raise _HTTPError(404, f"no image {doc_id!r} in KB {kb!r}") from None
        paths = [e.image_path for e in found if e.image_path is not None]
        if not paths or not Path(paths[0]).is_file():
            raise _HTTPError(404, f"no image {doc_id!r} in KB {kb!r}")
        return FileResponse(paths[0])

    run = service.run

    def stream(question: Question, engine: Engine, ticket: _Ticket) -> Any:
        converter = sse_events(question.id or "", _image_url)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def on_event(te: TraceEvent) -> None:
            for ev in converter.events(te):
                queue.put_nowait(ev)

        async def produce() -> None:
            try:
                traj = await run(question, engine, on_event)
                for ev in converter.final(traj):
                    queue.put_nowait(ev)
            except _HTTPError as e:
                queue.put_nowait(
                    {"event": "error", "data": {"question_id": question.id, "message": e.message}}
                )
            finally:
                queue.put_nowait(None)

        async def events() -> AsyncIterator[dict[str, Any]]:
            task = asyncio.create_task(produce())
            try:
                while (ev := await queue.get()) is not None:
                    yield {"event": ev["event"], "data": json.dumps(ev["data"])}
            finally:  # a disconnected client cancels its remaining model calls
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                ticket.release()

        # the background task releases the slot even if the stream never started
        return EventSourceResponse(events(), background=BackgroundTask(ticket.release))

    @app.post(
        "/v1/answer",
        dependencies=guarded,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": AnswerRequest.model_json_schema()},
                    "multipart/form-data": {"schema": AnswerUpload.model_json_schema()},
                },
            }
        },
    )
    async def answer(request: Request) -> Any:
        req, upload = await _answer_request(request)
        engine = service.engine(req.method, req.max_steps, req.top_k)
        question, ticket = await service.admit(req.question, upload or req.image_base64)
        if req.stream or "text/event-stream" in request.headers.get("accept", ""):
            return stream(question, engine, ticket)
        traj = await service.answer(question, engine, ticket)
        return _json_with_trajectory({"answer": traj.answer}, "trajectory", traj)

    results = _results_index(cfg.results_dirs)

    @app.get("/", include_in_schema=False)
    async def viewer_page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/viewer/{name}", include_in_schema=False)
    async def viewer_file(name: str) -> FileResponse:
        if name not in VIEWER_FILES:  # a fixed set of package files, never a client path
            raise _HTTPError(404, f"no viewer file {name!r}")
        return FileResponse(STATIC / name, media_type=VIEWER_FILES[name])

    @app.get("/v1/results", dependencies=guarded)
    async def results_dirs() -> dict[str, Any]:
        return {"results": [_results_summary(n, d) for n, d in results.items()]}

    @app.get("/v1/results/{name}", dependencies=guarded)
    async def results_items(name: str) -> dict[str, Any]:
        records = await asyncio.to_thread(_records, results, name)
        items = [_result_item(r) for r in records]
        return {**_results_summary(name, results[name]), "items": items}

    @app.get("/v1/results/{name}/{qid:path}", dependencies=guarded)
    async def results_item(name: str, qid: str) -> dict[str, Any]:
        for r in await asyncio.to_thread(_records, results, name):
            if str(r.get("id")) == qid and r.get("trajectory"):
                traj = Trajectory.model_validate(r["trajectory"])
                return trajectory_view(traj, _image_url, golds=r.get("golds"))
        raise _HTTPError(404, f"no question {qid!r} in results {name!r}")

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        now = int(time.time())
        return {
            "object": "list",
            "data": [
                {"id": f"kbrouter/{m}", "object": "model", "created": now, "owned_by": "kbrouter"}
                for m in cfg.methods
            ],
        }

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            raise _HTTPError(400, "the body is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise _HTTPError(400, "a chat request needs 'messages' (a list)")
        text, image = _last_user(body["messages"])
        engine = service.engine(str(body.get("model") or cfg.default_method), None, None)
        question, ticket = await service.admit(text, image)
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:20]}"
        model_id = f"kbrouter/{engine.policy.name}"
        if body.get("stream"):

            async def chunks() -> AsyncIterator[str]:
                try:
                    traj = await run(question, engine)
                except _HTTPError as e:
                    yield json.dumps({"error": {"message": e.message}})
                    yield "[DONE]"
                    return
                finally:
                    ticket.release()
                base = {"id": cid, "object": "chat.completion.chunk", "created": created}
                base["model"] = model_id
                first = {"index": 0, "delta": {"role": "assistant", "content": traj.answer}}
                yield json.dumps({**base, "choices": [{**first, "finish_reason": None}]})
                last = {"index": 0, "delta": {}, "finish_reason": "stop"}
                extra = {"kbrouter": {"trajectory": traj.model_dump(mode="json")}}
                yield json.dumps({**base, "choices": [last], **extra})
                yield "[DONE]"

            return EventSourceResponse(chunks(), background=BackgroundTask(ticket.release))
        try:
            traj = await run(question, engine)
        finally:
            ticket.release()
        if traj.error and traj.stop_reason == "error":
            raise _HTTPError(503, f"answering failed: {traj.error}")
        return _json_with_trajectory(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": traj.answer},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": traj.prompt_tokens,
                    "completion_tokens": traj.completion_tokens,
                    "total_tokens": traj.prompt_tokens + traj.completion_tokens,
                },
            },
            "kbrouter",
            traj,
            nest="trajectory",
        )

    return app


def _json_with_trajectory(
    payload: dict[str, Any], key: str, traj: Trajectory, nest: str | None = None
) -> Response:
    """``payload`` plus ``key: trajectory`` (or ``key: {nest: trajectory}``) as a JSON response.

    The trajectory is written by pydantic-core (``model_dump_json``) and spliced into the
    encoded payload: several times cheaper than ``model_dump`` + ``json.dumps`` of the nested
    dicts, which was most of the server's own CPU per answered request."""
    head = json.dumps(payload)  # a dict: its encoding ends with "}"
    body = traj.model_dump_json()
    if nest is not None:
        body = f'{{"{nest}":{body}}}'
    sep = "," if payload else ""
    return Response(
        content=f'{head[:-1]}{sep}"{key}":{body}}}'.encode(), media_type="application/json"
    )


def _last_user(messages: list[Any]) -> tuple[str, str | None]:
    """The text and the first image (data URL or base64) of the last user message."""
    for m in reversed(messages):
        if not isinstance(m, dict) or m.get("role") != "user":
            continue
        content = m.get("content")
        if isinstance(content, str):
            return content, None
        if isinstance(content, list):
            texts, image = [], None
            for part in content:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif part.get("type") == "image_url" and image is None:
                    url = (part.get("image_url") or {}).get("url", "")
                    if not str(url).startswith("data:"):
                        raise _HTTPError(400, "image parts must be data: URLs (base64)")
                    image = str(url)
            return " ".join(texts), image
        raise _HTTPError(400, "a user message needs content (text or parts)")
    raise _HTTPError(400, "the request has no user message")
