"""Baseline methods the paper compares R1-Router against (method.md sec. 3).

=================  ===========================================================================
name               what it does (per question)
=================  ===========================================================================
``direct``         one model call, short answer, no retrieval
``cot``            one model call, chain of thought then the answer, no retrieval
``single-kb:<kb>`` retrieve once from one KB with the original question, then answer
``all-kbs``        retrieve once from every KB with the original question (the paper's
                   "fixed multi-KB" retrieval), concatenate the evidence, then answer
``iterretgen``     IterRetGen (Shao et al., 2023): T rounds of retrieval over every KB and
                   generation; round t retrieves with "question + generation of round t-1";
                   the last generation is the answer (default T = 2)
``ircot``          IRCoT (Trivedi et al., 2023): retrieve with the question; then generate the
                   next chain-of-thought sentence from all evidence so far and retrieve with that
                   sentence, until a sentence says "answer is" or the retrieval budget is spent;
                   then answer from all evidence and the reasoning
``r1-router``      :class:`~kbrouter.policies.r1router.R1RouterPolicy` (imported lazily)
``learned-router`` / ``hybrid``   :mod:`kbrouter.policies.learned` (need ``router=DIR``)
``random-kb`` / ``oracle-kb``     :mod:`kbrouter.policies.bounds` (the bounds of routing)
``search-o1`` / ``omnisearch`` / ``cogplanner``   agentic baselines, one module each
                   (:mod:`kbrouter.policies.search_o1`, ``omnisearch``, ``cogplanner``)
=================  ===========================================================================

Every method speaks through the :class:`~kbrouter.policies.base.Runtime` and records its model
calls and retrievals in :class:`~kbrouter.types.Step` objects exactly like R1-Router, so routing
metrics, token counts and timings are comparable across methods. Retrieval rounds are recorded
as steps whose ``action`` names the query and the KBs searched; the call producing the answer is
the trajectory's ``final_call``. All answers use the ``<answer>`` tag format, parsed with
:func:`~kbrouter.policies.parser.parse_answer`. Queries to an image KB carry the question's
image, as in R1-Router.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kbrouter.errors import ConfigError
from kbrouter.policies.base import Policy, Runtime
from kbrouter.policies.parser import parse_answer, strip_tags
from kbrouter.policies.prompts import (
    answer_grammar,
    image_note,
    question_content,
    render_evidence,
)
from kbrouter.policies.readers import TableReader, query_answer, read_tables
from kbrouter.reading.sql import SQLReaderConfig
from kbrouter.types import (
    ChatMessage,
    Evidence,
    Modality,
    ModelCall,
    Query,
    Question,
    Retrieval,
    RouteAction,
    SamplingParams,
    Step,
    Trajectory,
)

log = logging.getLogger(__name__)

__all__ = [
    "AllKBsPolicy",
    "BaselineConfig",
    "CoTPolicy",
    "DirectPolicy",
    "IRCoTConfig",
    "IRCoTPolicy",
    "IterRetGenConfig",
    "IterRetGenPolicy",
    "METHOD_NAMES",
    "SingleKBPolicy",
    "make_policy",
]

# --------------------------------------------------------------------------- prompts
# System prompts and one few-shot pair each; they never depend on the question, so backends
# with prefix caching (llama.cpp) reuse them. Variable content always comes last.

_EX_QUESTION = "Which river flows through the capital of France?"
_EX_EVIDENCE = [
    Evidence(
        kb="text",
        id="ex-1",
        score=1.0,
        title="Paris",
        text="Paris is the capital and largest city of France. The city stands on the Seine.",
    )
]

DIRECT_SYSTEM = (
    "You answer questions from your own knowledge. Give only the answer: a name, a number, a "
    "date or a few words.\n\nReply in exactly this format:\n<answer>the short answer</answer>"
)
DIRECT_EXAMPLE = (f"Question: {_EX_QUESTION}", "<answer>the Seine</answer>")

COT_SYSTEM = (
    "You answer questions from your own knowledge. First reason step by step, then give a "
    "short answer: a name, a number, a date or a few words.\n\nReply in exactly this format:\n"
    "<think>step-by-step reasoning</think>\n<answer>the short answer</answer>"
)
COT_EXAMPLE = (
    f"Question: {_EX_QUESTION}",
    "<think>The capital of France is Paris. The river that flows through Paris is the Seine."
    "</think>\n<answer>the Seine</answer>",
)

EVIDENCE_SYSTEM = (
    "You answer a question using the retrieved evidence (and the image, if one is shown). Use "
    "the facts in the evidence; if it does not contain the answer, give your best short guess."
    "\n\nReply in exactly this format:\n<think>which evidence answers the question and how"
    "</think>\n<answer>a short answer: a name, a number, a date or a few words</answer>"
)
EVIDENCE_EXAMPLE = (
    f"Evidence:\n{render_evidence(_EX_EVIDENCE)}\nQuestion: {_EX_QUESTION}",
    "<think>Evidence 1 says Paris is the capital of France and stands on the Seine.</think>\n"
    "<answer>the Seine</answer>",
)

IRCOT_SYSTEM = (
    "You reason step by step towards the answer of a question, using the retrieved evidence "
    "(and the image, if one is shown). Write ONLY the next sentence of the reasoning: one "
    "short sentence stating one fact. When the reasoning so far is enough to answer, write the "
    'sentence "So the answer is: <short answer>."'
)
IRCOT_EXAMPLES = (
    (
        f"Evidence:\n{render_evidence(_EX_EVIDENCE)}\nQuestion: {_EX_QUESTION}\n"
        "Reasoning so far:\n(none yet)\nNext sentence:",
        "The capital of France is Paris.",
    ),
    (
        f"Evidence:\n{render_evidence(_EX_EVIDENCE)}\nQuestion: {_EX_QUESTION}\n"
        "Reasoning so far:\nThe capital of France is Paris.\nNext sentence:",
        "Paris stands on the Seine, so the answer is: the Seine.",
    ),
)
IRCOT_FINAL_SUFFIX = "Reasoning so far:\n{reasoning}\n"


def _prefix(system: str, *examples: tuple[str, str]) -> list[ChatMessage]:
    msgs = [ChatMessage(role="system", content=system)]
    for user, assistant in examples:
        msgs.append(ChatMessage(role="user", content=user))
        msgs.append(ChatMessage(role="assistant", content=assistant))
    return msgs


def _one_line(text: str) -> str:
    return " ".join(text.split())


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_ANSWER_IS = re.compile(r"answer\s+is", re.I)


def first_sentence(text: str) -> str:
    """The first sentence of a generation (tags removed, first non-empty line)."""
    body = strip_tags(text.replace("\r", ""))
    for line in text.splitlines():
        line = strip_tags(line)
        if line:
            body = line
            break
    return _SENTENCE_END.split(body, maxsplit=1)[0].strip() if body else ""


# --------------------------------------------------------------------------- configs


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaselineConfig(_Cfg):
    """Settings shared by every baseline."""

    answer_max_tokens: int = Field(192, gt=0, description="Token cap of an answer reply.")
    few_shot: bool = Field(
        False,
        description="One worked example before the question. Off by default: on mkqa-mini wtq "
        "the 0.5B model copied the example's reasoning in 32 of 40 answers and answered the "
        "example's 'Paris'/'the Seine' 13 times (direct: 7 of 60).",
    )
    answer_grammar: bool = Field(
        True,
        description="Constrain answer replies to <think>...</think><answer>...</answer> with a "
        "grammar when the backend supports it (IRCoT's reasoning sentences stay free).",
    )
    table_reader: TableReader = Field(
        "sql",
        description="How retrieved tables are read: 'rows' or 'sql' (one model-written SQL "
        "query over the whole tables; see kbrouter.policies.readers).",
    )
    sql_reader: SQLReaderConfig = Field(
        default_factory=SQLReaderConfig, description="Settings of the SQL table reader."
    )


class IterRetGenConfig(BaselineConfig):
    """IterRetGen settings."""

    iterations: int = Field(
        2, ge=1, description="Retrieval-generation rounds T (the paper studies T = 1..7)."
    )
    max_query_chars: int = Field(
        1000, gt=0, description="Cap on the 'question + previous generation' query text."
    )


class IRCoTConfig(BaselineConfig):
    """IRCoT settings."""

    few_shot: bool = Field(
        True, description="One worked example (IRCoT's one-sentence steps need the format)."
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Retrieval rounds, the initial one included (None: the runtime's budget).",
    )
    max_evidence: int = Field(
        15, gt=0, description="Most evidence items kept in the prompt (IRCoT caps at 15)."
    )
    step_max_tokens: int = Field(64, gt=0, description="Token cap of one reasoning sentence.")


# --------------------------------------------------------------------------- base


class _Baseline(Policy):
    """Shared plumbing: config, events, retrieval rounds, evidence answers."""

    config_cls: type[BaselineConfig] = BaselineConfig

    def __init__(self, config: BaselineConfig | None = None, **overrides: Any) -> None:
        data = (config or self.config_cls()).model_dump()
        try:
            self.config = self.config_cls.model_validate({**data, **overrides})
        except ValidationError as e:
            raise ConfigError(f"invalid settings for method {self.name!r}: {e}") from None

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, **self.config.model_dump()}

    def _params(self, max_tokens: int | None = None, **kw: Any) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens or self.config.answer_max_tokens, **kw)

    def _answer_params(self, rt: Runtime) -> SamplingParams:
        """Parameters of a reply in the answer format (grammar-constrained when supported)."""
        if self.config.answer_grammar and getattr(rt, "supports_grammar", False):
            return self._params(grammar=answer_grammar())
        return self._params()

    # ---------------------------------------------------------------- messages

    def _messages(
        self,
        system: str,
        examples: Sequence[tuple[str, str]],
        question: Question,
        text: str,
        rt: Runtime,
    ) -> list[ChatMessage]:
        prefix = _prefix(system, *(examples if self.config.few_shot else ()))
        content = question_content(
            question, text, supports_images=rt.supports_images, note=image_note(rt.kbs, "final")
        )
        return [*prefix, ChatMessage(role="user", content=content)]

    def _evidence_messages(
        self, question: Question, evidence: Sequence[Evidence], rt: Runtime, reasoning: str = ""
    ) -> list[ChatMessage]:
        text = f"Evidence:\n{render_evidence(evidence)}\nQuestion: {_one_line(question.text)}"
        if reasoning:
            text += "\n" + IRCOT_FINAL_SUFFIX.format(reasoning=reasoning).rstrip()
        return self._messages(EVIDENCE_SYSTEM, [EVIDENCE_EXAMPLE], question, text, rt)

    # ---------------------------------------------------------------- retrieval

    @staticmethod
    def _query(question: Question, text: str, kb: str, rt: Runtime) -> Query:
        modality = {k.name: k.modality for k in rt.kbs}.get(kb)
        return Query(text=text, image=question.image if modality == Modality.IMAGE else None)

    async def _round(
        self,
        question: Question,
        text: str,
        kbs: Sequence[str],
        rt: Runtime,
        step: Step,
        think: str = "",
        *,
        with_image: bool = True,
        sub_question: str | None = None,
        read_with: str | None = None,
    ) -> list[Evidence]:
        """One retrieval round: ``text`` to every KB in ``kbs``; top-k of each, in KB order.

        ``with_image``: image KBs get the question's image with the text (False: text only);
        ``sub_question``: what the step records as asked (default ``text``); ``read_with``:
        what the SQL table reader answers from the tables (default the question)."""
        step.action = RouteAction(think=think, sub_question=sub_question or text, kbs=list(kbs))
        self._emit(rt, "route", question, step=step)

        def query(kb: str) -> Query:
            q = self._query(question, text, kb, rt)
            return q if with_image else q.model_copy(update={"image": None})

        results: list[Retrieval] = list(
            await asyncio.gather(*(rt.retrieve(kb, query(kb)) for kb in kbs))
        )
        step.retrievals = results
        self._emit(rt, "retrieve", question, step=step)
        evidence: list[Evidence] = []
        for r in results:
            if r.error:
                self._note(rt, question, step, f"retrieval from {r.kb!r} failed: {r.error}")
            evidence.extend(r.evidence[: rt.top_k])
        if not evidence:
            self._note(rt, question, step, "no evidence retrieved; answering without it")
        if self.config.table_reader == "sql":
            evidence = await read_tables(
                self,
                question,
                read_with or question.text,
                evidence,
                rt,
                step,
                self.config.sql_reader,
            )
        return evidence

    async def _finish(
        self,
        traj: Trajectory,
        call: ModelCall,
        rt: Runtime,
        t0: float,
        fallback: str = "",
    ) -> Trajectory:
        traj.final_call = call
        if call.error:
            traj.error = f"final answer call failed: {call.error}"
            traj.stop_reason = "error"
            traj.answer = fallback
        else:
            traj.answer = parse_answer(call.output)
        traj.seconds = time.perf_counter() - t0
        self._emit(rt, "final", traj.question, trajectory=traj)
        return traj

    def _query_answered(
        self, traj: Trajectory, evidence: list[Evidence], rt: Runtime, t0: float
    ) -> Trajectory | None:
        """``traj`` finished with the SQL reader's one-value result as its answer, when the
        round's evidence gives one (:func:`~kbrouter.policies.readers.query_answer`)."""
        if self.config.table_reader != "sql":
            return None
        value = query_answer(evidence, self.config.sql_reader)
        if value is None:
            return None
        self._note(
            rt,
            traj.question,
            traj.steps[-1],
            f"table reader: the query's result is one value, {value!r}; it is the answer "
            "(no final model call)",
        )
        traj.answer = value
        traj.stop_reason = "answered"
        traj.seconds = time.perf_counter() - t0
        self._emit(rt, "final", traj.question, trajectory=traj)
        return traj

    def _new(self, question: Question) -> Trajectory:
        return Trajectory(question=question, method=self.name, config=self.describe())


# --------------------------------------------------------------------------- no retrieval


class DirectPolicy(_Baseline):
    """Answer directly, no retrieval, no reasoning."""

    name = "direct"

    async def run(self, question: Question, rt: Runtime) -> Trajectory:
        t0 = time.perf_counter()
        traj = self._new(question)
        traj.stop_reason = "no_retrieval"
        msgs = self._messages(
            DIRECT_SYSTEM, [DIRECT_EXAMPLE], question, f"Question: {_one_line(question.text)}", rt
        )
        call = await rt.chat("final", msgs, self._answer_params(rt))
        return await self._finish(traj, call, rt, t0)


class CoTPolicy(_Baseline):
    """Chain-of-thought answer, no retrieval."""

    name = "cot"

    async def run(self, question: Question, rt: Runtime) -> Trajectory:
        t0 = time.perf_counter()
        traj = self._new(question)
        traj.stop_reason = "no_retrieval"
        msgs = self._messages(
            COT_SYSTEM, [COT_EXAMPLE], question, f"Question: {_one_line(question.text)}", rt
        )
        call = await rt.chat("final", msgs, self._answer_params(rt))
        return await self._finish(traj, call, rt, t0)


# --------------------------------------------------------------------------- static retrieval


class SingleKBPolicy(_Baseline):
    """Retrieve once from one KB with the original question, then answer."""

    def __init__(self, kb: str, config: BaselineConfig | None = None, **overrides: Any) -> None:
        if not kb or not kb.strip():
            raise ConfigError("method 'single-kb' needs a KB name: single-kb:<name>")
        self.kb = kb.strip()
        self.name = f"single-kb:{self.kb}"
        super().__init__(config, **overrides)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "kb": self.kb}

    async def run(self, question: Question, rt: Runtime) -> Trajectory:
        t0 = time.perf_counter()
        kb = rt.resolve_kb(self.kb)  # UnknownKBError names the known KBs
        traj = self._new(question)
        step = Step(index=0)
        traj.steps.append(step)
        evidence = await self._round(question, question.text, [kb], rt, step)
        if (answered := self._query_answered(traj, evidence, rt, t0)) is not None:
            return answered
        call = await rt.chat(
            "final", self._evidence_messages(question, evidence, rt), self._answer_params(rt)
        )
        return await self._finish(traj, call, rt, t0)


class AllKBsPolicy(_Baseline):
    """Retrieve once from every KB with the original question, concatenate, answer."""

    name = "all-kbs"

    async def run(self, question: Question, rt: Runtime) -> Trajectory:
        t0 = time.perf_counter()
        traj = self._new(question)
        step = Step(index=0)
        traj.steps.append(step)
        kbs = [kb.name for kb in rt.kbs]
        evidence = await self._round(question, question.text, kbs, rt, step)
        if (answered := self._query_answered(traj, evidence, rt, t0)) is not None:
            return answered
        call = await rt.chat(
            "final", self._evidence_messages(question, evidence, rt), self._answer_params(rt)
        )
        return await self._finish(traj, call, rt, t0)


# --------------------------------------------------------------------------- iterative


class IterRetGenPolicy(_Baseline):
    """IterRetGen: alternate retrieval (over every KB) and generation for T rounds.

    Round 1 retrieves with the question; round t > 1 with the question followed by round
    t-1's generation (reasoning and answer, tags removed). Each round's generation sees that
    round's evidence only. Rounds 1..T-1 are recorded as steps with a ``generate`` call
    (``sub_answer`` = that round's answer); round T's generation is the ``final_call``.
    """

    name = "iterretgen"
    config_cls = IterRetGenConfig
    config: IterRetGenConfig

    async def run(self, question: Question, rt: Runtime) -> Trajectory:
        t0 = time.perf_counter()
        traj = self._new(question)
        kbs = [kb.name for kb in rt.kbs]
        query = question.text
        last_answer = ""
        rounds = self.config.iterations
        for t in range(rounds):
            step = Step(index=t)
            traj.steps.append(step)
            evidence = await self._round(question, query, kbs, rt, step)
            msgs = self._evidence_messages(question, evidence, rt)
            if t == rounds - 1:
                call = await rt.chat("final", msgs, self._answer_params(rt))
                return await self._finish(traj, call, rt, t0, fallback=last_answer)
            call = await rt.chat("generate", msgs, self._answer_params(rt))
            step.answer_call = call
            if call.error:
                self._note(
                    rt,
                    question,
                    step,
                    f"generation failed: {call.error}; next round "
                    "retrieves with the question alone",
                )
                query = question.text
                continue
            step.sub_answer = last_answer = parse_answer(call.output)
            self._emit(rt, "sub_answer", question, step=step)
            generation = strip_tags(call.output)
            query = f"{_one_line(question.text)} {generation}"[: self.config.max_query_chars]
        raise AssertionError("unreachable: the last round returns")  # pragma: no cover


class IRCoTPolicy(_Baseline):
    """IRCoT: interleave chain-of-thought sentences with retrieval.

    Step 0 retrieves from every KB with the question. Then each step generates the next
    reasoning sentence (a ``generate`` call recorded in ``route_calls``) from all evidence so
    far (deduplicated, at most ``max_evidence`` items, newest rounds kept) and the sentences so
    far; a sentence containing "answer is" ends the reasoning (recorded as a stop action);
    otherwise it becomes the next retrieval query, while the retrieval budget (``max_steps``
    rounds including the first) lasts. The final call answers from all evidence and the
    reasoning.
    """

    name = "ircot"
    config_cls = IRCoTConfig
    config: IRCoTConfig

    def _pool(self, rounds: list[list[Evidence]]) -> list[Evidence]:
        seen: set[tuple[str, str]] = set()
        pool: list[Evidence] = []
        for ev in (e for r in rounds for e in r):
            key = (ev.kb, ev.id)
            if key not in seen:
                seen.add(key)
                pool.append(ev)
        return pool[-self.config.max_evidence :]

    async def run(self, question: Question, rt: Runtime) -> Trajectory:
        t0 = time.perf_counter()
        traj = self._new(question)
        kbs = [kb.name for kb in rt.kbs]
        budget = self.config.max_steps or rt.max_steps
        step = Step(index=0)
        traj.steps.append(step)
        rounds = [await self._round(question, question.text, kbs, rt, step)]
        sentences: list[str] = []
        traj.stop_reason = "budget"
        while True:
            step = Step(index=len(traj.steps))
            reasoning = "\n".join(sentences) if sentences else "(none yet)"
            text = (
                f"Evidence:\n{render_evidence(self._pool(rounds))}\n"
                f"Question: {_one_line(question.text)}\n"
                f"Reasoning so far:\n{reasoning}\nNext sentence:"
            )
            msgs = self._messages(IRCOT_SYSTEM, IRCOT_EXAMPLES, question, text, rt)
            call = await rt.chat("generate", msgs, self._params(self.config.step_max_tokens))
            step.route_calls.append(call)
            traj.steps.append(step)
            if call.error:
                self._note(rt, question, step, f"reasoning call failed: {call.error}; answering")
                traj.stop_reason = "error"
                break
            sentence = first_sentence(call.output)
            if not sentence:
                self._note(rt, question, step, "empty reasoning sentence; answering")
                step.action = RouteAction()
                traj.stop_reason = "format_fallback"
                break
            sentences.append(sentence)
            if _ANSWER_IS.search(sentence):
                step.action = RouteAction(think=sentence)
                self._emit(rt, "route", question, step=step)
                traj.stop_reason = "answered"
                break
            if len(rounds) >= budget:
                step.action = RouteAction(think=sentence)
                self._note(
                    rt, question, step, f"retrieval budget of {budget} rounds spent; answering"
                )
                break
            rounds.append(await self._round(question, sentence, kbs, rt, step, think=sentence))
        msgs = self._evidence_messages(
            question, self._pool(rounds), rt, reasoning="\n".join(sentences) or "(none)"
        )
        call = await rt.chat("final", msgs, self._answer_params(rt))
        return await self._finish(traj, call, rt, t0)


# --------------------------------------------------------------------------- registry

METHOD_NAMES = (
    "direct",
    "cot",
    "single-kb:<kb>",
    "all-kbs",
    "iterretgen",
    "ircot",
    "r1-router",
    "learned-router",
    "hybrid",
    "random-kb",
    "oracle-kb",
    "oracle-evidence",
    "search-o1",
    "omnisearch",
    "cogplanner",
)
"""Method names accepted by :func:`make_policy`."""

_SIMPLE: dict[str, type[_Baseline]] = {
    "direct": DirectPolicy,
    "cot": CoTPolicy,
    "all-kbs": AllKBsPolicy,
    "iterretgen": IterRetGenPolicy,
    "ircot": IRCoTPolicy,
}


def _routed_policies() -> dict[str, type[Policy]]:
    # imported lazily: the learned router pulls in scikit-learn
    from kbrouter.policies.bounds import OracleEvidencePolicy, OracleKBPolicy, RandomKBPolicy
    from kbrouter.policies.cogplanner import CogPlannerPolicy
    from kbrouter.policies.learned import HybridPolicy, LearnedRouterPolicy
    from kbrouter.policies.omnisearch import OmniSearchPolicy
    from kbrouter.policies.search_o1 import SearchO1Policy

    return {
        "search-o1": SearchO1Policy,
        "omnisearch": OmniSearchPolicy,
        "cogplanner": CogPlannerPolicy,
        "learned-router": LearnedRouterPolicy,
        "hybrid": HybridPolicy,
        "random-kb": RandomKBPolicy,
        "oracle-kb": OracleKBPolicy,
        "oracle-evidence": OracleEvidencePolicy,
    }


def make_policy(name: str, **kw: Any) -> Policy:
    """The policy for a method name (see :data:`METHOD_NAMES`); ``kw`` are its settings.

    Raises :class:`~kbrouter.errors.ConfigError` for an unknown name or invalid settings.
    """
    key = name.strip().lower()
    if key.startswith("single-kb:"):
        return SingleKBPolicy(name.strip()[len("single-kb:") :], **kw)
    if key in ("r1-router", "r1router", "r1_router"):
        from kbrouter.policies.r1router import R1RouterPolicy

        try:
            return R1RouterPolicy(**kw)
        except ValidationError as e:
            raise ConfigError(f"invalid settings for method 'r1-router': {e}") from None
    routed = _routed_policies()
    if key in routed:
        try:
            return routed[key](**kw)
        except ValidationError as e:
            raise ConfigError(f"invalid settings for method {key!r}: {e}") from None
    cls = _SIMPLE.get(key)
    if cls is None:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}")
    return cls(**kw)
