"""CogPlanner (Yu, Yang and Chen, 2025; arXiv 2501.15470, the "MRAG Planning" task) as a policy
on the engine.

What the paper states (abstract level: no code or prompt text was available to us, so the
prompts here are our own): an MLLM planner that, at every step, **decides whether to
reformulate the query** and **which retrieval strategy to use** (none, text or image), and
iterates until it stops retrieving; it is evaluated in a *parallel* paradigm (both decisions in
one reply) and a *sequential* one (first the reformulation, then the retrieval decision, as two
calls). Implemented here, on a registry of typed KBs:

1. **Reformulate** (sequential: its own call): ``<reformulate>yes|no</reformulate>`` and, if
   yes, ``<query>...</query>`` — the query for this step (the question at first; later a
   refined query that asks for what is still missing).
2. **Retrieve** (sequential: a second call): ``<retrieval>none|text|image</retrieval>``; text
   searches every text and table KB, image searches the image KBs (with the question's image
   when there is one, else by caption text). ``none`` ends the loop.
3. The evidence of each step is kept; at the end one answer call reads all of it.

Adapted: the step budget is the engine's (``max_steps`` overrides), greedy decoding, our answer
format, tables read by the engine's table reader (``table_reader``, as every method here).
Bounded retries with a corrective message on malformed decisions, then a graceful fallback
(reformulation: keep the current query; retrieval: stop), recorded in the trace.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import Field

from kbrouter.policies.base import Runtime
from kbrouter.policies.baselines import BaselineConfig, _Baseline, _one_line
from kbrouter.policies.prompts import render_evidence
from kbrouter.types import (
    ChatMessage,
    Evidence,
    Modality,
    ModelCall,
    Question,
    RouteAction,
    SamplingParams,
    Step,
)

__all__ = ["CogPlannerConfig", "CogPlannerPolicy"]

SYSTEM = (
    "You plan retrieval for answering a question. At each step you decide whether to "
    "reformulate the search query and which retrieval to use: none (enough information, answer "
    "now), text (passages and tables) or image (images with captions{image})."
)
REFORMULATE = (
    "Should the search query be reformulated for this step? Reply in exactly this format:\n"
    "<reformulate>yes or no</reformulate>\n<query>the new query (only if yes)</query>"
)
RETRIEVE = (
    "Which retrieval does this step need? Reply in exactly this format:\n"
    "<retrieval>none, text or image</retrieval>"
)
PARALLEL = (
    "Decide both for this step. Reply in exactly this format:\n"
    "<reformulate>yes or no</reformulate>\n<query>the new query (only if yes)</query>\n"
    "<retrieval>none, text or image</retrieval>"
)

_TAG = {
    t: re.compile(rf"<{t}>\s*(.*?)\s*</{t}>", re.S | re.I)
    for t in ("reformulate", "query", "retrieval")
}


class CogPlannerConfig(BaselineConfig):
    """CogPlanner settings (see the module docstring)."""

    paradigm: Literal["sequential", "parallel"] = Field(
        "sequential",
        description="sequential: reformulation and retrieval decided in two calls; parallel: "
        "in one.",
    )
    max_steps: int | None = Field(
        None, ge=1, description="Planning steps that may retrieve; None: the engine's budget."
    )
    max_format_retries: int = Field(1, ge=0, description="Re-asks after a malformed decision.")
    plan_max_tokens: int = Field(96, gt=0, description="Token cap of a planning reply.")


def _tag(text: str, name: str) -> str | None:
    m = _TAG[name].search(text)
    return _one_line(m.group(1)) if m else None


class CogPlannerPolicy(_Baseline):
    """CogPlanner's iterative reformulate-and-retrieve planning (see the module docstring)."""

    name = "cogplanner"
    config_cls = CogPlannerConfig
    config: CogPlannerConfig

    async def run(self, question: Question, rt: Runtime) -> Any:
        t0 = time.perf_counter()
        traj = self._new(question)
        limit = rt.max_steps if self.config.max_steps is None else self.config.max_steps
        image_kbs = [k.name for k in rt.kbs if k.modality == Modality.IMAGE]
        text_kbs = [k.name for k in rt.kbs if k.modality != Modality.IMAGE]
        query = question.text
        pool: list[Evidence] = []
        traj.stop_reason = "budget"
        for index in range(limit + 1):
            step = Step(index=index)
            traj.steps.append(step)
            if index >= limit:  # no planning call whose decision could not be carried out
                self._note(rt, question, step, f"step budget of {limit} spent; answering")
                break
            state = self._state(question, query, pool, index)
            if self.config.paradigm == "parallel":
                reply = await self._decide(question, state, PARALLEL, rt, step, _parallel_ok)
                new_query, choice = _reformulation(reply), _retrieval(reply)
            else:
                reply = await self._decide(question, state, REFORMULATE, rt, step, _reform_ok)
                new_query = _reformulation(reply)
                if new_query:
                    query = new_query
                    state = self._state(question, query, pool, index)
                reply = await self._decide(question, state, RETRIEVE, rt, step, _retrieve_ok)
                choice = _retrieval(reply)
            if new_query:
                query = new_query
            if choice is None:
                self._note(rt, question, step, "no usable retrieval decision; answering")
                traj.stop_reason = "format_fallback"
                break
            if (choice == "image" and not image_kbs) or (choice == "text" and not text_kbs):
                self._note(rt, question, step, f"no {choice} KB configured; answering")
                choice = "none"
            if choice == "none":
                step.action = RouteAction(think=f"cogplanner: answer (query {query!r})")
                self._emit(rt, "route", question, step=step)
                traj.stop_reason = "answered" if pool else "no_retrieval"
                break
            kbs = image_kbs if choice == "image" else text_kbs
            # image KBs are searched with the question's image, text and table KBs with text
            pool.extend(await self._round(question, query, kbs, rt, step, f"cogplanner: {choice}"))
        msgs = self._evidence_messages(question, pool, rt)
        call = await rt.chat("final", msgs, self._answer_params(rt))
        return await self._finish(traj, call, rt, t0)

    # ------------------------------------------------------------------ pieces

    def _state(self, question: Question, query: str, pool: list[Evidence], index: int) -> str:
        found = render_evidence(pool[-8:]) if pool else "(nothing yet)"
        return (
            f"Question: {_one_line(question.text)}\nCurrent query: {query}\nStep: {index + 1}\n"
            f"Retrieved so far:\n{found}"
        )

    async def _decide(
        self,
        question: Question,
        state: str,
        ask: str,
        rt: Runtime,
        step: Step,
        ok: Any,
    ) -> str:
        """One planning call (bounded corrective retries); the reply text ("" when unusable)."""
        image = ", searched with the question's image" if question.image is not None else ""
        system = SYSTEM.replace("{image}", image)
        messages = self._messages(system, [], question, f"{state}\n\n{ask}", rt)
        for attempt in range(self.config.max_format_retries + 1):
            call: ModelCall = await rt.chat("route", messages, self._plan_params(rt, ask))
            step.route_calls.append(call)
            if call.error:
                self._note(rt, question, step, f"planning call failed: {call.error}")
                return ""
            if ok(call.output):
                return call.output
            if attempt < self.config.max_format_retries:
                self._note(rt, question, step, "malformed planning reply; asking again")
                messages = [
                    *messages,
                    ChatMessage(role="assistant", content=call.output or "(empty)"),
                    ChatMessage(role="user", content=f"That reply could not be used. {ask}"),
                ]
        return ""

    def _plan_params(self, rt: Runtime, ask: str) -> SamplingParams:
        if self.config.answer_grammar and getattr(rt, "supports_grammar", False):
            return self._params(self.config.plan_max_tokens, grammar=_grammar(ask))
        return self._params(self.config.plan_max_tokens)


def _reformulation(reply: str) -> str | None:
    if (_tag(reply, "reformulate") or "").lower().startswith("yes"):
        return _tag(reply, "query") or None
    return None


def _retrieval(reply: str) -> str | None:
    value = (_tag(reply, "retrieval") or "").lower()
    for choice in ("none", "text", "image"):
        if value.startswith(choice):
            return choice
    return None


def _reform_ok(reply: str) -> bool:
    value = (_tag(reply, "reformulate") or "").lower()
    return value.startswith("no") or (value.startswith("yes") and bool(_tag(reply, "query")))


def _retrieve_ok(reply: str) -> bool:
    return _retrieval(reply) is not None


def _parallel_ok(reply: str) -> bool:
    return _reform_ok(reply) and _retrieve_ok(reply)


def _grammar(ask: str) -> str:
    reform = '"<reformulate>" ( "no</reformulate>" | "yes</reformulate>\\n<query>" q "</query>" )'
    retrieve = '"<retrieval>" ( "none" | "text" | "image" ) "</retrieval>"'
    if ask is REFORMULATE:
        root = reform
    elif ask is RETRIEVE:
        root = retrieve
    else:
        root = f'{reform} "\\n" {retrieve}'
    return f"root ::= {root}\nq ::= [^<\\n ] [^<\\n]{{0,159}}"
