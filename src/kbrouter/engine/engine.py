"""The engine: runs a :class:`~kbrouter.policies.base.Policy` on questions, one or many at once.

Example::

    engine = Engine(load_model("llama-cpp"), KBRegistry.from_config("demo/kbs.toml"),
                    R1RouterPolicy(), EngineConfig(cache_dir=".kbrouter/cache"))
    traj = engine.answer_sync("Who painted the Mona Lisa?")
    trajs = engine.answer_many_sync(questions, concurrency=8)

``answer_many`` runs questions concurrently (bounded by a semaphore), returns trajectories in
input order, and never lets one failing question kill the batch (its trajectory has ``error``
set). Retrievals of concurrent questions are merged into batched ``kb.search`` calls; with
``cache_dir`` set every model call and retrieval is replayed from disk on a re-run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field

from kbrouter.engine.cache import ReplayCache
from kbrouter.engine.events import EventCallback
from kbrouter.engine.runtime import KBSource, QuestionRuntime, RunContext
from kbrouter.errors import ConfigError, ModelUnavailableError
from kbrouter.models.base import ChatModel
from kbrouter.policies.base import Policy, Purpose
from kbrouter.types import Question, SamplingParams, Trajectory

log = logging.getLogger(__name__)

QuestionLike = Question | str
ResultCallback = Callable[[int, Trajectory], None]


class EngineConfig(BaseModel):
    """How the engine runs a policy."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(3, ge=0, description="Retrieval-step budget per question.")
    top_k: int = Field(5, gt=0, description="Evidence items per KB shown to the model.")
    retrieve_k: int = Field(10, gt=0, description="Evidence items requested from each KB.")
    concurrency: int = Field(8, gt=0, description="Questions answered at once by answer_many.")
    seed: int = Field(0, description="Sampling seed (overrides sampling.seed).")
    sampling: SamplingParams = Field(
        default_factory=SamplingParams,
        description="Default decoding settings (greedy); a policy's explicitly set fields win.",
    )
    cache_dir: Path | None = Field(
        None, description="Replay cache folder (model calls + retrievals); None disables it."
    )
    use_grammar: bool = Field(
        True, description="Allow GBNF-constrained decoding on backends that support it."
    )
    batch_window_ms: float = Field(
        5.0, ge=0, description="How long a retrieval waits for others to share its KB batch."
    )
    max_batch: int = Field(64, gt=0, description="Most queries in one kb.search call.")
    max_unavailable: int = Field(
        3,
        ge=1,
        exclude=True,  # operational: never changes an answer, so not part of run records
        description="Model calls in a row that cannot reach the model server after which the "
        "run stops with one ModelUnavailableError (circuit breaker).",
    )

    def effective_sampling(self) -> SamplingParams:
        return self.sampling.model_copy(update={"seed": self.seed})


def check_purposes(purposes: Iterable[str]) -> None:
    """Raise :class:`ConfigError` for a name that is not a model-call purpose."""
    unknown = sorted(set(purposes) - set(get_args(Purpose)))
    if unknown:
        raise ConfigError(
            f"unknown call purpose {unknown[0]!r} for a model; the purposes are "
            f"{', '.join(get_args(Purpose))}"
        )


def _describe(model: ChatModel) -> dict[str, Any]:
    try:
        return dict(model.describe())
    except Exception:
        return {"name": model.name}


class Engine:
    """Runs ``policy`` with ``model`` over ``kbs``.

    Args:
        model: the chat backend.
        kbs: a KB registry (``infos``, ``resolve(name)``, ``get(name)``).
        policy: the method (R1-Router, a baseline, ...).
        config: engine settings (defaults: 3 steps, top-5 of 10, greedy, seed 0, no cache).
        on_event: optional callback receiving :class:`~kbrouter.engine.events.TraceEvent`
            progress events (for live traces); exceptions in it are logged, not raised.
        purpose_models: backends for some call purposes (``route``, ``sub_answer``,
            ``final``, ``generate``, ``read``), e.g. ``{"read": larger_model}`` to write the SQL
            table reader's queries with a larger model while ``model`` routes and answers. The
            prompts follow ``model`` (its image support and recorded router prompt); a grammar
            is sent only to a backend that enforces it.
    """

    def __init__(
        self,
        model: ChatModel,
        kbs: KBSource,
        policy: Policy,
        config: EngineConfig | None = None,
        *,
        on_event: EventCallback | None = None,
        purpose_models: Mapping[str, ChatModel] | None = None,
    ) -> None:
        check_purposes(purpose_models or {})
        self.purpose_models = dict(purpose_models or {})
        self.model = model
        self.kbs = kbs
        self.policy = policy
        self.config = config or EngineConfig()
        self.on_event = on_event
        self._cache: ReplayCache | None = None
        self.last_context: RunContext | None = None
        """The context of the latest run (batch sizes per KB, for tests and benchmarks)."""

    @property
    def cache(self) -> ReplayCache | None:
        if self._cache is None and self.config.cache_dir is not None:
            self._cache = ReplayCache(self.config.cache_dir)
        return self._cache

    def describe(self) -> dict[str, Any]:
        """Config facts recorded in every trajectory's ``config``."""
        model = _describe(self.model)
        out = {
            **self.policy.describe(),
            "model": model,
            "engine": self.config.model_dump(mode="json", exclude={"cache_dir"}),
        }
        if self.purpose_models:
            out["purpose_models"] = {
                purpose: _describe(m) for purpose, m in sorted(self.purpose_models.items())
            }
        return out

    def _context(self, on_event: EventCallback | None) -> RunContext:
        cfg = self.config
        ctx = RunContext(
            model=self.model,
            kbs=self.kbs,
            sampling=cfg.effective_sampling(),
            max_steps=cfg.max_steps,
            top_k=cfg.top_k,
            retrieve_k=cfg.retrieve_k,
            use_grammar=cfg.use_grammar,
            cache=self.cache,
            batch_window=cfg.batch_window_ms / 1000.0,
            max_batch=cfg.max_batch,
            on_event=on_event if on_event is not None else self.on_event,
            max_unavailable=cfg.max_unavailable,
            purpose_models=self.purpose_models,
        )
        self.last_context = ctx
        return ctx

    async def _run_one(self, ctx: RunContext, question: Question, index: int | None) -> Trajectory:
        rt = QuestionRuntime(ctx, index)
        t0 = time.perf_counter()
        rt.question_started(question)
        try:
            traj = await self.policy.run(question, rt)
        except (asyncio.CancelledError, ModelUnavailableError):
            raise  # the breaker tripped: the whole run stops
        except Exception as e:
            log.exception("policy %s failed on question %r", self.policy.name, question.text[:80])
            traj = Trajectory(
                question=question,
                method=self.policy.name,
                stop_reason="error",
                error=f"{type(e).__name__}: {e}",
            )
        finally:
            rt.question_finished(question)
        traj.seconds = time.perf_counter() - t0
        traj.config = {**traj.config, **self.describe()}
        return traj

    async def answer(
        self, question: QuestionLike, *, on_event: EventCallback | None = None
    ) -> Trajectory:
        """Answer one question (a :class:`Question` or its text)."""
        q = _as_question(question)
        ctx = self._context(on_event)
        try:
            return await self._run_one(ctx, q, None)
        finally:
            await ctx.aclose()

    async def answer_many(
        self,
        questions: Sequence[QuestionLike],
        concurrency: int | None = None,
        on_result: ResultCallback | None = None,
        *,
        on_event: EventCallback | None = None,
    ) -> list[Trajectory]:
        """Answer many questions concurrently; trajectories come back in input order.

        Args:
            questions: questions or question texts.
            concurrency: questions in flight at once (default ``config.concurrency``).
            on_result: called as ``on_result(index, trajectory)`` as each question finishes
                (e.g. to write results incrementally); its exceptions are logged.
            on_event: progress events (overrides the engine's callback for this run).
        """
        qs = [_as_question(q) for q in questions]
        limit = concurrency or self.config.concurrency
        if limit <= 0:
            raise ValueError(f"concurrency must be positive, got {limit}")
        sem = asyncio.Semaphore(limit)
        ctx = self._context(on_event)
        results: list[Trajectory | None] = [None] * len(qs)

        async def one(i: int, q: Question) -> None:
            async with sem:
                traj = await self._run_one(ctx, q, i)
            results[i] = traj
            if on_result is not None:
                try:
                    on_result(i, traj)
                except Exception:
                    log.exception("on_result callback failed for question %d", i)

        try:
            async with asyncio.TaskGroup() as tg:  # one fatal error cancels the others
                for i, q in enumerate(qs):
                    tg.create_task(one(i, q))
        except BaseExceptionGroup as group:
            first = group.exceptions[0]
            raise first.with_traceback(first.__traceback__) from None
        finally:
            await ctx.aclose()
        return [t for t in results if t is not None]

    def answer_sync(self, question: QuestionLike, **kwargs: Any) -> Trajectory:
        """Blocking :meth:`answer` (runs its own event loop)."""
        return asyncio.run(self.answer(question, **kwargs))

    def answer_many_sync(
        self,
        questions: Sequence[QuestionLike],
        concurrency: int | None = None,
        on_result: ResultCallback | None = None,
        **kwargs: Any,
    ) -> list[Trajectory]:
        """Blocking :meth:`answer_many` (runs its own event loop)."""
        return asyncio.run(self.answer_many(questions, concurrency, on_result, **kwargs))

    def close(self) -> None:
        """Close the replay cache (the model is owned by the caller)."""
        if self._cache is not None:
            self._cache.close()
            self._cache = None


def _as_question(q: QuestionLike) -> Question:
    if isinstance(q, Question):
        return q
    if isinstance(q, str):
        return Question(text=q)
    raise TypeError(f"expected a Question or a string, got {type(q).__name__}")
