"""Search-o1 (Li et al., 2025, "Search-o1: Agentic Search-Enhanced Large Reasoning Models") as a
policy on the engine.

The loop (released code: ``sunnynexus/Search-o1``, ``scripts/run_search_o1.py``):

1. The model reasons about the question and, when it lacks a fact, writes a search query
   inline between ``<|begin_search_query|>`` and ``<|end_search_query|>`` (generation stops
   there).
2. The query is searched; a separate **Reason-in-Documents** call gets the previous reasoning
   steps, the current query and the retrieved documents and writes only the helpful facts after
   ``**Final Information**`` (or "No helpful information found."; the marker is accepted
   without its bold, as small models write it).
3. That refined text is inserted into the reasoning between ``<|begin_search_result|>`` and
   ``<|end_search_result|>`` and the model continues, until it answers or the search limit is
   reached (then it is told it may not search any more and must answer). A repeated query gets
   "You have searched this query. Please refer to previous results." instead of a search.

What follows the original: the tags, the loop, the refinement step and its output marker, the
search limit with the same guard messages, the repeated-query guard. What is adapted:

* **Search over a registry of typed KBs**: the original has one web search; here a query goes
  to every configured KB at once (the union is "the search engine"; a query to an image KB
  carries the question's image, as everywhere in kbrouter) and the top-k of each KB are the
  "searched documents".
* **Continuing the reasoning in a chat API**: the original appends the result to the raw prompt
  so the model continues its own text; chat backends cannot continue an assistant turn, so the
  reasoning so far (with the inserted results) is given back in the user turn with "continue".
* **Answer format**: ``<answer>...</answer>`` instead of ``\\boxed{}`` (kbrouter's one answer
  format, grammar-constrained where the backend supports grammars).
* **Defaults**: the original allows 10 searches, 10 documents per search and 15 turns; here the
  search limit is the engine's step budget and the documents are its top-k, so Search-o1 is
  compared with the other methods at the same budget (``max_searches`` overrides). The
  original's temperature-0.7 sampling is replaced by the engine's greedy decoding.
* **Small models**: a reply with neither a query nor an answer is re-asked with a corrective
  message (``max_format_retries``), then the method falls back to answering from what it has
  found, recorded in the trace.
"""

from __future__ import annotations

import re
import time
from typing import Any

from pydantic import Field

from kbrouter.policies.base import Runtime
from kbrouter.policies.baselines import BaselineConfig, _Baseline, _one_line
from kbrouter.policies.prompts import render_evidence
from kbrouter.types import ChatMessage, Evidence, Question, RouteAction, SamplingParams, Step

__all__ = ["SearchO1Config", "SearchO1Policy"]

BEGIN_QUERY, END_QUERY = "<|begin_search_query|>", "<|end_search_query|>"
BEGIN_RESULT, END_RESULT = "<|begin_search_result|>", "<|end_search_result|>"
NO_INFO = "No helpful information found."
LIMIT_MSG = "The maximum search limit is exceeded. You are not allowed to search."
REPEAT_MSG = "You have searched this query. Please refer to previous results."
RETRY_MSG = (
    f"(That reply could not be used: write a search query as {BEGIN_QUERY}...{END_QUERY}, or "
    "the answer as <answer>...</answer>.)"
)

SYSTEM = (
    "You are a reasoning assistant with the ability to perform searches to help you answer "
    "the user's question accurately. You have special tools:\n\n"
    f"- To perform a search: write {BEGIN_QUERY} your query here {END_QUERY}.\n"
    f"Then, the system will search the knowledge bases and analyse the results, then provide "
    f"you with helpful information in the format {BEGIN_RESULT} ...search results... "
    f"{END_RESULT}.\n\n"
    "You can repeat the search process multiple times if necessary. The maximum number of "
    "search attempts is limited to {limit}.\n\n"
    "Once you have all the information you need, continue your reasoning and finish with "
    "the answer in exactly this format: <answer>a short answer: a name, a number, a date or a "
    "few words</answer>\n\n"
    'Example:\nQuestion: "Alice David is the voice of Lara Croft in a video game developed by '
    'which company?"\nAssistant thinking steps:\n- I need to find out who voices Lara Croft '
    f"in the video game.\n- Then find out which company developed that video game.\n\n"
    f"Assistant:\n{BEGIN_QUERY}Alice David Lara Croft voice{END_QUERY}\n\n"
    "(System returns processed information from the search results)\n\n"
    "Assistant continues reasoning with the new information...\n\n"
    "Remember:\n- Use the search tags to request a search.\n- When done searching, continue "
    "your reasoning and end with <answer>...</answer>."
)

REFINE_SYSTEM = (
    "**Task Instruction:**\n\nYou are tasked with reading and analysing the searched documents "
    "based on the following inputs: **Previous Reasoning Steps**, **Current Search Query**, "
    "and **Searched Documents**. Your objective is to extract relevant and helpful information "
    "for the **Current Search Query** from the **Searched Documents** and integrate it "
    "seamlessly into the **Previous Reasoning Steps** to continue reasoning for the original "
    "question.\n\n**Output Format:**\n- If the documents provide helpful information for the "
    'current search query: start your response with "**Final Information**" and then the '
    'helpful facts, in one or two sentences.\n- If they do not: write "**Final Information**'
    f'" and then "{NO_INFO}"'
)

_QUERY = re.compile(re.escape(BEGIN_QUERY) + r"(.*?)(?:" + re.escape(END_QUERY) + r"|$)", re.S)
# the marker at a line start, bold or not ("**Final Information**", "Final Information:"; small
# models drop the bold); the last one counts
_FINAL_INFO = re.compile(r"^[ \t*#]*Final Information[ \t*:]*(.*)", re.M | re.S | re.I)


class SearchO1Config(BaselineConfig):
    """Search-o1 settings (the original's defaults are noted; see the module docstring)."""

    max_searches: int | None = Field(
        None,
        ge=0,
        description="Search limit (original: 10); None: the engine's step budget.",
    )
    refine: bool = Field(
        True, description="Run the Reason-in-Documents step (original: always on)."
    )
    max_format_retries: int = Field(
        1, ge=0, description="Re-asks after a reply with neither a query nor an answer."
    )
    reason_max_tokens: int = Field(256, gt=0, description="Token cap of a reasoning turn.")
    refine_max_tokens: int = Field(160, gt=0, description="Token cap of a refinement reply.")
    max_doc_chars: int = Field(
        700, gt=0, description="Characters of each document shown (original: 3000)."
    )


def reasoning_grammar(allow_search: bool) -> str:
    """GBNF for a reasoning turn: free reasoning, then a search query or the answer."""
    ends = f'( "{BEGIN_QUERY}" q "{END_QUERY}" | answer )' if allow_search else "answer"
    return "\n".join(
        [
            f"root ::= think {ends}",
            "think ::= [^<]{0,500}",
            "q ::= [^<\\n] [^<\\n]{0,159}",
            'answer ::= "<answer>" [^<\\n ] [^<\\n]{0,199} "</answer>"',
        ]
    )


class SearchO1Policy(_Baseline):
    """Search-o1's inline-search loop with Reason-in-Documents (see the module docstring)."""

    name = "search-o1"
    config_cls = SearchO1Config
    config: SearchO1Config

    async def run(self, question: Question, rt: Runtime) -> Any:
        t0 = time.perf_counter()
        traj = self._new(question)
        kbs = [kb.name for kb in rt.kbs]
        limit = rt.max_steps if self.config.max_searches is None else self.config.max_searches
        reasoning = ""  # the model's reasoning so far, results inserted
        searched: set[str] = set()
        searches = 0
        failures = repeats = 0
        while True:
            step = Step(index=len(traj.steps))
            traj.steps.append(step)
            can_search = searches < limit
            msgs = self._turn(question, reasoning, limit, rt)
            call = await rt.chat("route", msgs, self._reason_params(rt, can_search))
            step.route_calls.append(call)
            if call.error:
                self._note(rt, question, step, f"reasoning call failed: {call.error}; answering")
                traj.stop_reason = "error"
                break
            text = call.output
            query_match = _QUERY.search(text)
            answer_at = text.find("<answer>")
            if answer_at >= 0 and (query_match is None or answer_at < query_match.start()):
                # this reasoning turn answers: it is the final call, not a step
                traj.steps.pop()
                traj.stop_reason = "answered" if searches else "no_retrieval"
                return await self._finish(traj, call, rt, t0)
            if query_match is None or not query_match.group(1).strip():
                failures += 1
                if failures <= self.config.max_format_retries:
                    self._note(
                        rt,
                        question,
                        step,
                        "reply has neither a search query nor an <answer>; asking again",
                    )
                    reasoning += f"{_one_line(text)}\n{RETRY_MSG}\n"
                    continue
                self._note(rt, question, step, "no usable reply; answering from what was found")
                traj.stop_reason = "format_fallback"
                break
            before = text[: query_match.start()].strip()
            query = _one_line(query_match.group(1))
            reasoning += f"{before}\n{BEGIN_QUERY}{query}{END_QUERY}\n"
            if not can_search:
                self._note(rt, question, step, f"search limit of {limit} reached")
                reasoning += f"{BEGIN_RESULT}{LIMIT_MSG}{END_RESULT}\n"
                traj.stop_reason = "budget"
                break
            if query.casefold() in searched:
                repeats += 1
                if repeats > self.config.max_format_retries:
                    self._note(rt, question, step, f"query {query!r} repeated again; answering")
                    traj.stop_reason = "format_fallback"
                    break
                self._note(rt, question, step, f"repeated query {query!r}: not searched again")
                reasoning += f"{BEGIN_RESULT}{REPEAT_MSG}{END_RESULT}\n"
                step.action = RouteAction(think=_one_line(before), sub_question=query, kbs=[])
                continue
            searched.add(query.casefold())
            searches += 1
            evidence = await self._round(question, query, kbs, rt, step, think=_one_line(before))
            info = await self._refine(question, reasoning, query, evidence, rt, step)
            step.sub_answer = info
            self._emit(rt, "sub_answer", question, step=step)
            reasoning += f"{BEGIN_RESULT}{info}{END_RESULT}\n"
        # out of searches or no usable reply: one answer call from the reasoning so far
        msgs = self._turn(question, reasoning, limit, rt, must_answer=True)
        call = await rt.chat("final", msgs, self._answer_only_params(rt))
        return await self._finish(traj, call, rt, t0)

    # ------------------------------------------------------------------ pieces

    def _turn(
        self,
        question: Question,
        reasoning: str,
        limit: int,
        rt: Runtime,
        must_answer: bool = False,
    ) -> list[ChatMessage]:
        text = f"Question: {_one_line(question.text)}"
        if reasoning:
            text += f"\n\nYour reasoning so far (with search results):\n{reasoning.strip()}\n\n"
            text += "Continue your reasoning."
        if must_answer:
            text += f"\n{LIMIT_MSG} Give the answer now as <answer>...</answer>."
        return self._messages(SYSTEM.replace("{limit}", str(limit)), [], question, text, rt)

    async def _refine(
        self,
        question: Question,
        reasoning: str,
        query: str,
        evidence: list[Evidence],
        rt: Runtime,
        step: Step,
    ) -> str:
        docs = render_evidence(evidence, max_chars=self.config.max_doc_chars)
        if not self.config.refine:
            return docs or NO_INFO
        steps = [s for s in reasoning.strip().splitlines() if s.strip()]
        if len(steps) > 5:  # the original keeps the first step, the last four, and the queries
            keep = {0, *range(len(steps) - 4, len(steps))}
            steps = [s if i in keep or BEGIN_QUERY in s else "..." for i, s in enumerate(steps)]
        previous = "\n".join(f"Step {i + 1}: {s}" for i, s in enumerate(steps)) or "(none)"
        user = (
            f"**Previous Reasoning Steps:**\n{previous}\n\n**Current Search Query:**\n{query}\n\n"
            f"**Searched Documents:**\n{docs or '(nothing found)'}"
        )
        msgs = [
            ChatMessage(role="system", content=REFINE_SYSTEM),
            ChatMessage(role="user", content=user),
        ]
        call = await rt.chat("read", msgs, self._params(self.config.refine_max_tokens))
        step.read_calls.append(call)
        if call.error:
            self._note(rt, question, step, f"Reason-in-Documents failed: {call.error}")
            return NO_INFO
        found = list(_FINAL_INFO.finditer(call.output))
        info = _one_line(found[-1].group(1) if found else "")
        if not info:
            self._note(rt, question, step, "Reason-in-Documents reply has no Final Information")
            return NO_INFO
        return info

    def _reason_params(self, rt: Runtime, can_search: bool) -> SamplingParams:
        grammar = None
        if self.config.answer_grammar and getattr(rt, "supports_grammar", False):
            grammar = reasoning_grammar(can_search)
        # generation stops at the end tag, as in the original
        extra: dict[str, Any] = {"grammar": grammar} if grammar else {}
        return self._params(self.config.reason_max_tokens, stop=[END_QUERY], **extra)

    def _answer_only_params(self, rt: Runtime) -> SamplingParams:
        if self.config.answer_grammar and getattr(rt, "supports_grammar", False):
            return self._params(grammar=reasoning_grammar(False))
        return self._params()
