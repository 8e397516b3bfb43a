"""R1-Router: step-wise routing of atomic sub-questions to knowledge bases (method.md §2).

Each step: **route** (the model writes ``<think>/<sub-question>/<ret>``), **retrieve** from every
KB named in ``<ret>`` (the image KB's query carries the question's image), **answer the
sub-question** from the top-k evidence; stop when the router says ``None``/``None`` or the
budget is spent, then write the final answer from the FULL history.

Bad router output is retried a bounded number of times with a corrective message naming the
problem; after that the loop stops gracefully and answers with what is known. Backend failures
never raise: they are recorded in the step notes and the loop falls back the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kbrouter.errors import ModelOutputError
from kbrouter.policies.base import Policy, Runtime
from kbrouter.policies.parser import parse_answer, parse_route
from kbrouter.policies.prompts import Hop, PromptBuilder
from kbrouter.policies.readers import TableReader, read_tables
from kbrouter.reading.images import asks_what_image_shows, identified_entity
from kbrouter.reading.sql import SQLReaderConfig
from kbrouter.types import (
    Evidence,
    Modality,
    Query,
    Question,
    Retrieval,
    RouteAction,
    SamplingParams,
    Step,
    StopReason,
    Trajectory,
)

log = logging.getLogger(__name__)


class R1RouterConfig(BaseModel):
    """Settings of the R1-Router loop (the budget and top-k come from the runtime)."""

    model_config = ConfigDict(extra="forbid")

    max_format_retries: int = Field(
        2, ge=0, description="Re-asks after an unparsable router output before falling back."
    )
    few_shot: bool = Field(
        True, description="One router example per KB plus a stop example in the prompt."
    )
    answer_few_shot: bool = Field(
        False, description="One example in the sub-answer and final prompts."
    )
    use_grammar: bool = Field(
        True,
        description="Constrain router decoding with a GBNF grammar when the backend supports it.",
    )
    min_retrieval_steps: int = Field(
        1,
        ge=0,
        description="Steps that must retrieve before the router may stop. The default 1 keeps "
        "small models from answering without looking anything up (the prompted 0.5B router "
        "stopped at once on half of mkqa-mini); 0 is the paper's setting (it may answer at "
        "once). An early None/None is re-asked with a corrective message; with a grammar the "
        "stop branch is excluded. The one default for `ask` and `eval` alike.",
    )
    image_entity: bool = Field(
        False,
        description="When the question's image matched an image-KB item above the KB's "
        "threshold and the sub-question asks what the image shows, answer it with that item's "
        "title without a model call (noted in the trace). See kbrouter.reading.images.",
    )
    pinned_alone: bool = Field(
        False,
        description="When a search's best hit is an image-to-image match above the image KB's "
        "threshold (pinned), show only the pinned hits of that search: a small model otherwise "
        "names a lower-ranked item.",
    )
    table_reader: TableReader = Field(
        "rows",
        description="How retrieved tables are read: 'rows' (shown as rows) or 'sql' (the model "
        "writes one SQL query, DuckDB runs it over the whole tables, the result is shown; "
        "falls back to the rows). See kbrouter.policies.readers.",
    )
    sql_reader: SQLReaderConfig = Field(
        default_factory=SQLReaderConfig, description="Settings of the SQL table reader."
    )
    route_max_tokens: int = Field(256, gt=0, description="Token cap of a router reply.")
    answer_max_tokens: int = Field(192, gt=0, description="Token cap of a (sub-)answer reply.")


class R1RouterPolicy(Policy):
    """The R1-Router inference loop over a :class:`~kbrouter.policies.base.Runtime`."""

    name = "r1router"
    config_cls: type[R1RouterConfig] = R1RouterConfig

    def __init__(self, config: R1RouterConfig | None = None, **overrides: Any) -> None:
        base = config if config is not None else self.config_cls.model_validate(overrides)
        if config is not None and overrides:
            base = self.config_cls.model_validate({**config.model_dump(), **overrides})
        self.config = base
        self._builders: dict[tuple, PromptBuilder] = {}

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, **self.config.model_dump()}

    def prompts(self, rt: Runtime) -> PromptBuilder:
        """The prompt builder for this runtime's KBs and backend (built once, then reused)."""
        key = (tuple(kb.model_dump_json() for kb in rt.kbs), rt.supports_images)
        builder = self._builders.get(key)
        if builder is None:
            builder = PromptBuilder(
                rt.kbs,
                supports_images=rt.supports_images,
                few_shot=self.config.few_shot,
                answer_few_shot=self.config.answer_few_shot,
            )
            self._builders[key] = builder
        return builder

    # ------------------------------------------------------------------ loop

    async def run(self, question: Question, rt: Runtime) -> Trajectory:
        t0 = time.perf_counter()
        prompts = self.prompts(rt)
        traj = Trajectory(question=question, method=self.name, config=self.describe())
        history: list[Hop] = []
        stop_reason: StopReason = "budget"

        for index in range(rt.max_steps):
            step = Step(index=index)
            traj.steps.append(step)
            action = await self._route(question, history, rt, prompts, step)
            if action is None:  # fallback: notes say why
                stop_reason = (
                    "error" if any(c.error for c in step.route_calls) else "format_fallback"
                )
                break
            step.action = action
            self._emit(rt, "route", question, step=step)
            if action.is_stop:
                stop_reason = "answered" if history else "no_retrieval"
                break
            assert action.sub_question is not None

            step.retrievals = await self._retrieve(question, action, rt, len(history))
            self._emit(rt, "retrieve", question, step=step)
            evidence: list[Evidence] = []
            for r in step.retrievals:
                if r.error:
                    self._note(rt, question, step, f"retrieval from {r.kb!r} failed: {r.error}")
                evidence.extend(self._shown(r, rt))
            if not evidence:
                self._note(rt, question, step, "no evidence retrieved; answering without it")
            entity = (
                identified_entity(step.retrievals)
                if self.config.image_entity and asks_what_image_shows(action.sub_question)
                else None
            )
            if entity is not None:
                assert entity.title is not None
                step.sub_answer = entity.title
                self._note(
                    rt,
                    question,
                    step,
                    f"image identified by an image-to-image match ({entity.score:.2f}): "
                    f"{entity.title}; answered without a model call",
                )
                history.append(Hop(action.sub_question, step.sub_answer, tuple(action.kbs)))
                self._emit(rt, "sub_answer", question, step=step)
                continue
            if self.config.table_reader == "sql":
                evidence = await read_tables(
                    self, question, action.sub_question, evidence, rt, step, self.config.sql_reader
                )

            messages = prompts.sub_answer_messages(question, action.sub_question, evidence)
            call = await rt.chat("sub_answer", messages, self._answer_params())
            step.answer_call = call
            if call.error:
                self._note(rt, question, step, f"sub-answer call failed: {call.error}")
                stop_reason = "error"
                break
            step.sub_answer = parse_answer(call.output)
            history.append(Hop(action.sub_question, step.sub_answer, tuple(action.kbs)))
            self._emit(rt, "sub_answer", question, step=step)
        else:
            self._note(
                rt,
                question,
                traj.steps[-1] if traj.steps else None,
                f"retrieval budget of {rt.max_steps} steps spent; answering",
            )

        traj.stop_reason = stop_reason
        final = await rt.chat(
            "final", prompts.final_messages(question, history), self._answer_params()
        )
        traj.final_call = final
        if final.error:
            traj.error = f"final answer call failed: {final.error}"
            traj.stop_reason = "error"
            traj.answer = history[-1].answer if history else ""
        else:
            traj.answer = parse_answer(final.output)
        traj.seconds = time.perf_counter() - t0
        self._emit(rt, "final", question, trajectory=traj)
        return traj

    # ------------------------------------------------------------------ pieces

    async def _route(
        self,
        question: Question,
        history: list[Hop],
        rt: Runtime,
        prompts: PromptBuilder,
        step: Step,
    ) -> RouteAction | None:
        """Route with bounded format retries; None means fall back (the notes say why)."""
        base = prompts.route_messages(question, history)
        messages = base
        params = self._route_params(
            rt, prompts, allow_stop=step.index >= self.config.min_retrieval_steps
        )
        attempts = self.config.max_format_retries + 1
        for attempt in range(attempts):
            call = await rt.chat("route", messages, params)
            step.route_calls.append(call)
            if call.error:
                self._note(rt, question, step, f"router call failed: {call.error}; stopping")
                return None
            try:
                action = parse_route(call.output, rt.resolve_kb)
                if action.is_stop and step.index < self.config.min_retrieval_steps:
                    raise ModelOutputError(
                        "nothing has been retrieved yet; ask one sub-question and name a "
                        "knowledge base instead of None"
                    )
                return action
            except ModelOutputError as e:
                problem = str(e)
            if attempt + 1 < attempts:
                self._note(
                    rt,
                    question,
                    step,
                    f"router output rejected ({problem}); retry {attempt + 1} of "
                    f"{self.config.max_format_retries}",
                )
                messages = prompts.corrective_messages(base, call.output, problem)
            else:
                self._note(
                    rt,
                    question,
                    step,
                    f"router output rejected ({problem}); no retries left, answering with "
                    "what is known",
                )
        return None

    async def _retrieve(
        self, question: Question, action: RouteAction, rt: Runtime, hop: int
    ) -> list[Retrieval]:
        """Search the KBs the action names (``hop``: the 0-based index of this retrieval)."""
        assert action.sub_question is not None
        modality = {kb.name: kb.modality for kb in rt.kbs}

        def query_for(kb: str) -> Query:
            image = question.image if modality.get(kb) == Modality.IMAGE else None
            return Query(text=action.sub_question or "", image=image)

        return list(await asyncio.gather(*(rt.retrieve(kb, query_for(kb)) for kb in action.kbs)))

    def _shown(self, retrieval: Retrieval, rt: Runtime) -> list[Evidence]:
        """The evidence of one retrieval that the sub-answer prompt shows: the top-k (only the
        pinned image matches when ``pinned_alone`` and the best hit is one)."""
        top = retrieval.evidence[: rt.top_k]
        if self.config.pinned_alone and top and top[0].metadata.get("pinned"):
            return [e for e in top if e.metadata.get("pinned")]
        return top

    def _route_params(
        self, rt: Runtime, prompts: PromptBuilder, *, allow_stop: bool = True
    ) -> SamplingParams:
        # Only explicitly set fields override the engine's sampling defaults.
        if self.config.use_grammar and getattr(rt, "supports_grammar", False):
            grammar = prompts.route_grammar(allow_stop=allow_stop)
            return SamplingParams(max_tokens=self.config.route_max_tokens, grammar=grammar)
        return SamplingParams(max_tokens=self.config.route_max_tokens)

    def _answer_params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.config.answer_max_tokens)

    # ------------------------------------------------------------------ events
