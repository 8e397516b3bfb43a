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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kbrouter.errors import ModelOutputError
from kbrouter.policies.base import Policy, Runtime
from kbrouter.policies.continuation import (
    anchored_sub_question,
    asks_whole_question,
    continuation_reason,
    is_copied_text,
    is_entity_answer,
    is_refusal,
)
from kbrouter.policies.parser import parse_answer
from kbrouter.policies.prompts import (
    ROUTER_PROMPTS,
    Hop,
    PromptBuilder,
    RouterPrompt,
    answer_grammar,
)
from kbrouter.policies.readers import TableReader, query_answer, read_tables
from kbrouter.reading.images import IDENTIFY_QUESTION, asks_what_image_shows, identified_entity
from kbrouter.reading.margin import within_margin
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
    router_prompt: Literal["auto", "full", "compact", "terse"] = Field(
        "auto",
        description="Router prompt variant: 'full' (the decomposition rules, few-shot turns per "
        "few_shot), 'compact' (format + KB list, no examples: what trained routers are "
        "fine-tuned on), 'terse' (the compact prompt with a shorter reply: no think block, and "
        "only <ret>KB</ret> to search with the question as asked) or 'auto' (the variant the "
        "model records it was trained with, e.g. in an exported GGUF's metadata; else 'full').",
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
        True,
        description="When the question's image matched an image-KB item above the KB's "
        "threshold and the sub-question asks what the image shows, answer it with that item's "
        "title without a model call (noted in the trace). See kbrouter.reading.images.",
    )
    identify_first: bool = Field(
        True,
        description="With image_entity: the first step that searched image KBs alone and "
        "matched the question's image identifies it even when its sub-question asks more "
        "(recorded as 'What does the image show?'); the router then continues from the entity.",
    )
    pinned_alone: bool = Field(
        True,
        description="When a search's best hit is an image-to-image match above the image KB's "
        "threshold (pinned), show only the pinned hits of that search: a small model otherwise "
        "names a lower-ranked item. relevance_margin does the same for a pinned best hit, so "
        "this matters only with the margin off.",
    )
    skip_identified_image: bool = Field(
        True,
        description="Once the question's image is identified (image_entity), later steps do not "
        "search image KBs again: their queries carry the same image and return the same match. "
        "The route grammar narrows to the other KBs; without a grammar an image KB is re-asked "
        "(no effect when image KBs are all there is). On by default together with "
        "carry_identified, which keeps an answer in the identified item's caption readable "
        "(alone it lost one such mkqa-mini question): together they gained +6.4 +- 3.0 "
        "F1-Recall paired on 60 mkqa-mini questions (top-5; 5 better, 0 worse) and the demo "
        "5 -> 6 of 8. See benchmarks/results/answers/README.md.",
    )
    identified_note: bool = Field(
        False,
        description="Once the question's image is identified, the route prompt (the 'full' "
        "variant) says what it shows instead of asking to identify it (both the 0.5B and the "
        "1.5B kept copying 'What is shown in the image?' into later sub-questions). Off by "
        "default: with the 0.5B it sent second hops back to the image KB ('ask about Flag of "
        "Australia') and lost the make demo question (demo 4 -> 2.5 of 8). The 'compact' "
        "prompt of trained routers keeps the text they were trained on. See "
        "benchmarks/results/answers/README.md.",
    )
    carry_identified: bool = Field(
        True,
        description="Once the question's image is identified, later steps that search other KBs "
        "also show the identified image-KB item (its title and caption, last) to the sub-answer "
        "call, so an answer in the caption stays readable when the image KB is not searched "
        "again (skip_identified_image).",
    )
    relevance_margin: float | None = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Show only a search's items whose relevance is at least (1 - margin) x its "
        "best (None: the top-k as retrieved); hybrid searches compare the dense cosine, and a "
        "pinned image match stands alone. The default 0.25 is the value calibrated on training "
        "questions (benchmarks/bench_margin.py); on 60 mkqa-mini questions it gained +5.0 +- 3.7 "
        "F1-Recall at top-5 (the engine's default) and made no measurable difference at top-2 "
        "(benchmarks/results/answers/, section 4). See kbrouter.reading.margin.",
    )
    continue_after_entity: bool = Field(
        True,
        description="Multi-hop continuation: when the router stops right after a hop whose "
        "answer names an entity while the question asks about more than that (content words "
        "no sub-question or answer covers), ask it to go on (at most max_continuations times "
        "per question). See kbrouter.policies.continuation.",
    )
    max_continuations: int = Field(
        1, ge=0, description="Continuation checks per question (continue_after_entity)."
    )
    continue_min_uncovered: int = Field(
        2,
        ge=1,
        description="Uncovered question content words that make a stop premature "
        "(continue_after_entity).",
    )
    replace_copied_sub_question: bool = Field(
        True,
        description="A routed sub-question of several sentences (the router copied its think "
        "text or an instruction: 'None in the image. I must identify it first, ...') is "
        "replaced by the question, anchored on the last hop's answer when that names an "
        "entity (noted in the trace). See kbrouter.policies.continuation.is_copied_text.",
    )
    answer_from_question_hop: bool = Field(
        True,
        description="When the last sub-question asked the whole question (e.g. a continuation "
        "anchored on the entity found, or a learned router's first hop), its answer is the "
        "final answer without a final model call (the 0.5B otherwise repeats an earlier hop's "
        "answer).",
    )
    table_reader: TableReader = Field(
        "sql",
        description="How retrieved tables are read: 'rows' (shown as rows) or 'sql' (the model "
        "writes one SQL query, DuckDB runs it over the whole tables, the result is shown; "
        "falls back to the rows). See kbrouter.policies.readers.",
    )
    sql_reader: SQLReaderConfig = Field(
        default_factory=SQLReaderConfig, description="Settings of the SQL table reader."
    )
    answer_grammar: bool = Field(
        True,
        description="Constrain sub-answer and final replies to <think>...</think><answer>..."
        "</answer> with a grammar when the backend supports it (kbrouter.policies.prompts."
        "answer_grammar).",
    )
    route_max_tokens: int = Field(256, gt=0, description="Token cap of a router reply.")
    answer_max_tokens: int = Field(192, gt=0, description="Token cap of a (sub-)answer reply.")


#: The reading path of the paper's loop (and of kbrouter before the evidence-to-answers
#: settings became the default): tables shown as rows, no image identification, no
#: multi-hop continuation, the final answer always written by a model call.
PAPER_READING: dict[str, Any] = {
    "image_entity": False,
    "identify_first": False,
    "skip_identified_image": False,
    "identified_note": False,
    "carry_identified": False,
    "pinned_alone": False,
    "continue_after_entity": False,
    "answer_from_question_hop": False,
    "table_reader": "rows",
    "relevance_margin": None,
    "replace_copied_sub_question": False,
}


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

    def router_prompt(self, rt: Runtime) -> RouterPrompt:
        """The router prompt variant used with this runtime's model (``auto`` resolved)."""
        if self.config.router_prompt != "auto":
            return self.config.router_prompt
        variant = getattr(rt, "prompt_variant", None)
        return variant if variant in ROUTER_PROMPTS else "full"

    def prompts(self, rt: Runtime) -> PromptBuilder:
        """The prompt builder for this runtime's KBs and backend (built once, then reused)."""
        variant = self.router_prompt(rt)
        key = (tuple(kb.model_dump_json() for kb in rt.kbs), rt.supports_images, variant)
        builder = self._builders.get(key)
        if builder is None:
            builder = PromptBuilder(
                rt.kbs,
                supports_images=rt.supports_images,
                few_shot=self.config.few_shot,
                answer_few_shot=self.config.answer_few_shot,
                router_prompt=variant,
                identified_note=self.config.identified_note,
            )
            self._builders[key] = builder
        return builder

    # ------------------------------------------------------------------ loop

    async def run(self, question: Question, rt: Runtime) -> Trajectory:
        t0 = time.perf_counter()
        prompts = self.prompts(rt)
        traj = Trajectory(
            question=question,
            method=self.name,
            config={**self.describe(), "router_prompt_used": prompts.router_prompt},
        )
        history: list[Hop] = []
        stop_reason: StopReason = "budget"
        continued = 0
        # the image-KB item whose match named what the question's image shows, once one did
        identified: Evidence | None = None
        just_identified = False  # ... at the latest hop
        image_kbs = {kb.name for kb in rt.kbs if kb.modality == Modality.IMAGE}

        for index in range(rt.max_steps):
            step = Step(index=index)
            traj.steps.append(step)
            keep_going = self._keep_going(question, history, continued)
            skip = (
                frozenset(image_kbs)
                if identified is not None and self.config.skip_identified_image
                else frozenset()
            )
            action = await self._route(
                question, history, rt, prompts, step, keep_going=keep_going, exclude=skip
            )
            if step.continued:
                continued += 1
            if (
                self.config.replace_copied_sub_question
                and action is not None
                and not action.is_stop
                and is_copied_text(action.sub_question or "")
                and not is_copied_text(question.text)  # a question of several sentences
                and not asks_whole_question(question.text, action.sub_question or "")
            ):
                action = self._whole_question(question, history, action, rt, step)
            anchor = step.continued or just_identified
            if keep_going is not None and anchor and action is not None and not action.is_stop:
                # a continued step, or the step after the image was identified: a sub-question
                # that does not name the entity found is anchored on it
                action = self._anchor(question, history, action, rt, step)
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
            entity = identified_entity(step.retrievals) if self.config.image_entity else None
            asked = asks_what_image_shows(action.sub_question)
            # identifying first drops what the step's other KBs found, so only a step that
            # searched image KBs alone is answered by the identification
            only_images = all(r.kb in image_kbs for r in step.retrievals)
            first = self.config.identify_first and identified is None and only_images
            if entity is not None and (asked or first):
                assert entity.title is not None
                identified, just_identified = entity, True
                step.sub_answer = entity.title
                asked_text = action.sub_question if asked else IDENTIFY_QUESTION
                self._note(
                    rt,
                    question,
                    step,
                    f"image identified by an image-to-image match ({entity.score:.2f}): "
                    f"{entity.title}; answered without a model call"
                    + (
                        ""
                        if asked
                        else f" (the sub-question asks more than what the image shows, so this "
                        f"step answers {IDENTIFY_QUESTION!r} and the question goes on)"
                    ),
                )
                history.append(Hop(asked_text, step.sub_answer, tuple(action.kbs), identified=True))
                self._emit(rt, "sub_answer", question, step=step)
                continue
            if self.config.table_reader == "sql":
                evidence = await read_tables(
                    self, question, action.sub_question, evidence, rt, step, self.config.sql_reader
                )
                # before carry_identified adds the identified image item: a one-value result
                # of a table step answers it by itself (as measured)
                value = query_answer(evidence, self.config.sql_reader)
                if value is not None:
                    step.sub_answer = value
                    self._note(
                        rt,
                        question,
                        step,
                        f"table reader: the query's result is one value, {value!r}; it answers "
                        "the sub-question without a model call",
                    )
                    just_identified = False
                    history.append(Hop(action.sub_question, value, tuple(action.kbs)))
                    self._emit(rt, "sub_answer", question, step=step)
                    continue

            if (
                self.config.carry_identified
                and identified is not None
                and step.retrievals
                and not any(r.kb in image_kbs for r in step.retrievals)
            ):
                evidence = [*evidence, identified]
                self._note(
                    rt,
                    question,
                    step,
                    f"the identified image item {identified.title!r} is shown with this "
                    "step's evidence (carry_identified)",
                )
            messages = prompts.sub_answer_messages(question, action.sub_question, evidence)
            call = await rt.chat("sub_answer", messages, self._answer_params(rt))
            step.answer_call = call
            if call.error:
                self._note(rt, question, step, f"sub-answer call failed: {call.error}")
                stop_reason = "error"
                break
            step.sub_answer = parse_answer(call.output)
            just_identified = False
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
        if (
            self.config.answer_from_question_hop
            and history
            and asks_whole_question(question.text, history[-1].sub_question)
            and history[-1].answer.strip()
            and not is_refusal(history[-1].answer)
        ):
            traj.answer = history[-1].answer.strip()
            self._note(
                rt,
                question,
                traj.steps[-1] if traj.steps else None,
                "the last sub-question asked the whole question; its answer is the final "
                "answer (no final model call)",
            )
            traj.seconds = time.perf_counter() - t0
            self._emit(rt, "final", question, trajectory=traj)
            return traj
        final = await rt.chat(
            "final", prompts.final_messages(question, history), self._answer_params(rt)
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

    def _keep_going(self, question: Question, history: list[Hop], continued: int) -> str | None:
        """Why a stop at the coming step would be premature (multi-hop continuation), if so."""
        if not self.config.continue_after_entity or continued >= self.config.max_continuations:
            return None
        return continuation_reason(
            question.text, history, min_uncovered=self.config.continue_min_uncovered
        )

    def _anchor(
        self,
        question: Question,
        history: list[Hop],
        action: RouteAction,
        rt: Runtime,
        step: Step,
    ) -> RouteAction:
        """A continuing sub-question that names the entity found (see continuation.py)."""
        assert action.sub_question is not None
        anchored = anchored_sub_question(question.text, action.sub_question, history[-1].answer)
        if anchored is None:
            return action
        self._note(
            rt,
            question,
            step,
            f"after an entity hop: the sub-question {action.sub_question!r} does not name "
            f"{history[-1].answer.strip()!r}; asking {anchored!r}",
        )
        return action.model_copy(update={"sub_question": anchored})

    def _whole_question(
        self,
        question: Question,
        history: list[Hop],
        action: RouteAction,
        rt: Runtime,
        step: Step,
    ) -> RouteAction:
        """The question (anchored on the last hop's entity, if any) in place of a sub-question
        that copied text (``replace_copied_sub_question``)."""
        text = " ".join(question.text.split())
        if history and is_entity_answer(history[-1].answer):
            text = f"{text} ({history[-1].answer.strip()})"
        self._note(
            rt,
            question,
            step,
            f"the sub-question {action.sub_question!r} is several sentences (copied text), not "
            f"one question; asking {text!r}",
        )
        return action.model_copy(update={"sub_question": text})

    async def _route(
        self,
        question: Question,
        history: list[Hop],
        rt: Runtime,
        prompts: PromptBuilder,
        step: Step,
        *,
        keep_going: str | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> RouteAction | None:
        """Route with bounded format retries; None means fall back (the notes say why).

        ``keep_going``: why a stop now would be premature (see :meth:`_keep_going`); a stop is
        then re-asked once with that message and without the grammar's stop branch.
        ``exclude``: KBs the router may not name at this step (see ``skip_identified_image``)."""
        base = prompts.route_messages(question, history)
        messages = base
        hooked = self.allowed_kbs(question, len(history))
        allowed = self._narrowed(hooked, exclude, rt)
        if allowed is not hooked:
            assert allowed is not None
            self._note(
                rt,
                question,
                step,
                f"the question's image is identified: {', '.join(sorted(exclude))} left out "
                f"at this step (a search would return the same match); choosing among "
                f"{', '.join(allowed)}",
            )
        params = self._route_params(
            rt, prompts, allow_stop=step.index >= self.config.min_retrieval_steps, kbs=allowed
        )
        failures = 0
        stopped: RouteAction | None = None  # the router's own stop, if continuation was asked
        while True:
            call = await rt.chat("route", messages, params)
            step.route_calls.append(call)
            if call.error:
                self._note(rt, question, step, f"router call failed: {call.error}; stopping")
                return None
            try:
                action = prompts.parse_route(call.output, rt.resolve_kb, question)
                if action.is_stop and step.index < self.config.min_retrieval_steps:
                    raise ModelOutputError(
                        "nothing has been retrieved yet; ask one sub-question and name a "
                        "knowledge base instead of None"
                    )
                if allowed is not None and not action.is_stop and set(action.kbs) - set(allowed):
                    raise ModelOutputError(
                        f"search the {' or '.join(allowed)} knowledge base at this step"
                    )
                if action.is_stop and keep_going is not None and stopped is None:
                    self._note(rt, question, step, f"multi-hop continuation: {keep_going}")
                    stopped = action
                    # re-asked with the same prompt and no stop branch (a corrective turn
                    # makes small models copy the message instead of routing)
                    params = self._route_params(rt, prompts, allow_stop=False, kbs=allowed)
                    if not params.grammar:
                        messages = prompts.corrective_messages(base, call.output, keep_going)
                    continue
                step.continued = stopped is not None and not action.is_stop
                return action
            except ModelOutputError as e:
                problem = str(e)
            failures += 1
            if failures <= self.config.max_format_retries:
                self._note(
                    rt,
                    question,
                    step,
                    f"router output rejected ({problem}); retry {failures} of "
                    f"{self.config.max_format_retries}",
                )
                messages = prompts.corrective_messages(base, call.output, problem)
            elif stopped is not None:
                self._note(
                    rt,
                    question,
                    step,
                    f"router output rejected ({problem}); no retries left, keeping its stop",
                )
                return stopped
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
        if self.config.relevance_margin is not None:
            return within_margin(top, self.config.relevance_margin)
        return top

    @staticmethod
    def _narrowed(
        allowed: list[str] | None, exclude: frozenset[str], rt: Runtime
    ) -> list[str] | None:
        """``allowed`` (None: every KB) without ``exclude``; ``allowed`` itself when that
        removes nothing or would leave nothing."""
        names = allowed if allowed is not None else [kb.name for kb in rt.kbs]
        kept = [name for name in names if name not in exclude]
        return kept if kept and len(kept) < len(names) else allowed

    def allowed_kbs(self, question: Question, hop: int) -> list[str] | None:
        """The KBs the router may name at retrieval ``hop`` (0-based) of ``question``; None =
        every KB. The prompt is unchanged: the grammar (and, without one, the parse check)
        narrows the choice. Used by training-data synthesis to keep a teacher on the gold KBs
        (:class:`kbrouter.train.synth.GoldKBRouter`); the base policy never narrows."""
        return None

    def _route_params(
        self,
        rt: Runtime,
        prompts: PromptBuilder,
        *,
        allow_stop: bool = True,
        kbs: list[str] | None = None,
    ) -> SamplingParams:
        # Only explicitly set fields override the engine's sampling defaults.
        if self.config.use_grammar and getattr(rt, "supports_grammar", False):
            grammar = prompts.route_grammar(allow_stop=allow_stop, kb_names=kbs)
            return SamplingParams(max_tokens=self.config.route_max_tokens, grammar=grammar)
        return SamplingParams(max_tokens=self.config.route_max_tokens)

    def _answer_params(self, rt: Runtime) -> SamplingParams:
        if self.config.answer_grammar and getattr(rt, "supports_grammar", False):
            return SamplingParams(
                max_tokens=self.config.answer_max_tokens, grammar=answer_grammar()
            )
        return SamplingParams(max_tokens=self.config.answer_max_tokens)

    # ------------------------------------------------------------------ events
