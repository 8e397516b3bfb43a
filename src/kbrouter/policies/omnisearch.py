"""OmniSearch (Li et al., 2024, "Benchmarking Multimodal Retrieval Augmented Generation with
Dynamic VQA Dataset and Self-adaptive Planning Agent") as a policy on the engine.

The loop (released code: ``Alibaba-NLP/OmniSearch``, ``src/Omnisearch_gpt``): a planning agent
converses with the retrieval system. Each planner turn is a ``<Thought>``, a ``<Sub-Question>``
and a ``<Search>`` action, one of *Text Retrieval: query*, *Image Retrieval with Input Image*
(reverse image search) or *Image Retrieval with Text Query: query*; the system answers with the
retrieved content (for text retrieval, a sub-question solver first answers the sub-question from
the documents); the planner revises its plan from that feedback and either asks the next
sub-question or ends with ``<End>`` and ``Final Answer: ...``; at most 5 turns.

What follows the original: the turn format and markers, the three actions and their order of
precedence when parsing, the solver for text retrieval, the plan revised in one conversation, a
final answer extracted after ``Final Answer:``. What is adapted to a registry of typed KBs:

* **Actions onto KBs**: *Text Retrieval* searches every text and table KB with the query (the
  original's web text search returns pages of any kind); *Image Retrieval with Input Image*
  searches the image KBs with the question's image (image-to-image, plus the query's text if
  any: the original's reverse image search); *Image Retrieval with Text Query* searches the
  image KBs by text alone (their captions). Without a question image the input-image action is
  not offered.
* **Feedback**: text retrieval feeds back the solver's answer (``solver``, as the GPT version;
  off: the documents themselves, as the Qwen version); image retrieval feeds back the matched
  items' titles and captions ("Description: ...").
* **Tables**: retrieved tables go through the engine's table reader (``table_reader``: the SQL
  reader answers the sub-question from them by default, as for every method here).
* **Budget**: the original's 5 turns become the engine's step budget (``max_turns`` overrides),
  so OmniSearch is compared with the other methods at the same budget; greedy decoding.
* **Small models**: a turn with neither an action nor a final answer is re-asked once with a
  corrective message; then the method answers from the feedback so far (recorded). The prompt
  describes the parts in prose, without fill-in text (the 0.5B copied "one sub-question" and
  "a short answer" verbatim); a copied format label ("One sub-question: ...") is stripped, and a
  sub-question, query or final answer that is only a copied placeholder counts as missing (the
  sub-question then falls back to the query).
"""

from __future__ import annotations

import re
import time
from typing import Any

from pydantic import Field

from kbrouter.policies.base import Runtime
from kbrouter.policies.baselines import BaselineConfig, _Baseline, _one_line
from kbrouter.policies.parser import parse_answer
from kbrouter.policies.prompts import render_evidence
from kbrouter.types import (
    ChatMessage,
    Modality,
    Question,
    SamplingParams,
    Step,
)

__all__ = ["OmniSearchConfig", "OmniSearchPolicy"]

TEXT, INPUT_IMAGE, TEXT_IMAGE = (
    "Text Retrieval",
    "Image Retrieval with Input Image",
    "Image Retrieval with Text Query",
)

SYSTEM = (
    "You are a question-answering assistant that can retrieve information. Break the question "
    "into sub-questions and solve them step by step. For each sub-question choose one "
    "retrieval method:\n"
    f"- {TEXT}: <query> searches text passages and tables.\n"
    "{image_actions}"
    "Each step is three tagged parts: after <Thought> say what you know and what you still "
    "need; after <Sub-Question> write the sub-question itself; after <Search> write the "
    f"retrieval method and its query (e.g. {TEXT}: ...). Then wait for the retrieved "
    "information. When you can answer, write <Thought> with how the information answers the "
    "question, then <End>, then Final Answer: followed by the answer in a few words (a name, "
    "a number, a date).\n\n"
    "Do not analyse the image with your own knowledge: retrieve. You can find the answers with "
    "the retrieval methods."
)
IMAGE_ACTIONS = (
    f"- {INPUT_IMAGE}: finds items that look like the question's image (reverse image search)."
    f"\n- {TEXT_IMAGE}: <query> searches images by their captions.\n"
)
TEXT_IMAGE_ONLY = f"- {TEXT_IMAGE}: <query> searches images by their captions.\n"

SOLVER_SYSTEM = (
    "Answer the sub-question from the retrieved documents in a few words. If they do not say, "
    "write: not found.\n\nReply in exactly this format:\n<answer>...</answer>"
)

_FINAL = re.compile(r"Final Answer\s*:?\s*(.+)", re.I | re.S)
_SUBQ = re.compile(r"<Sub-Question>\s*\n?(.*?)(?:\n|<Search>|$)", re.S)
# format words small models copy in front of (or instead of) the content
_SUBQ_LABEL = re.compile(r"^\s*(?:(?:one|the|my|next)\s+)?sub-?question\b(?:\s+is)?\s*:?\s*", re.I)
_PLACEHOLDER = re.compile(  # the whole text is copied format text
    r"\s*(?:a short answer\b.*|the answer in a few words.*|your query|\.\.\.|<query>)\s*", re.I
)


def _content(text: str | None) -> str | None:
    """``text`` without a copied format label ("One sub-question: ..."); None if nothing is
    left or it is a copied placeholder ("your query", "a short answer ...")."""
    if text is None:
        return None
    text = _SUBQ_LABEL.sub("", text).strip()
    return None if not text or _PLACEHOLDER.fullmatch(text) else text


class OmniSearchConfig(BaselineConfig):
    """OmniSearch settings (the original's defaults noted; see the module docstring)."""

    max_turns: int | None = Field(
        None, ge=1, description="Planner turns that may retrieve (original: 5); None: budget."
    )
    solver: bool = Field(
        True, description="Answer each text sub-question from its documents (GPT version)."
    )
    max_format_retries: int = Field(1, ge=0, description="Re-asks after an unusable turn.")
    plan_max_tokens: int = Field(
        320, gt=0, description="Token cap of a planner turn (its grammar allows ~300 tokens)."
    )


def planner_grammar(input_image: bool, allow_search: bool = True) -> str:
    """GBNF for a planner turn: a thought, then a search step or the end with a final answer."""
    actions = [f'"{TEXT}: " q', f'"{TEXT_IMAGE}: " q']
    if input_image:
        actions.insert(1, f'"{INPUT_IMAGE}"')
    search = '"<Sub-Question>\\n" line "\\n<Search>\\n" ( ' + " | ".join(actions) + " )"
    end = '"<End>\\nFinal Answer: " line'
    body = f"( {search} | {end} )" if allow_search else end
    return "\n".join(
        [
            f'root ::= "<Thought>\\n" thought "\\n" {body}',
            "thought ::= [^<\\n] [^<]{0,400}",
            "line ::= [^<\\n ] [^<\\n]{0,159}",
            "q ::= [^<\\n ] [^<\\n]{0,159}",
        ]
    )


def parse_turn(text: str) -> tuple[str, str | None, str, str | None]:
    """``(kind, sub_question, query, final)`` of a planner turn: kind is ``final``, one of the
    three actions, or ``""`` (unusable). Precedence as in the original: final answer first."""
    m = _FINAL.search(text)
    final = _content(_one_line(m.group(1)).strip()) if m else None
    if final:
        return "final", None, "", final
    sub = _SUBQ.search(text)
    sub_question = _content(_one_line(sub.group(1))) if sub else None
    search = text.split("<Search>", 1)[1] if "<Search>" in text else text
    for action in (INPUT_IMAGE, TEXT, TEXT_IMAGE):  # the original's order of matching
        i = search.find(action)
        if i >= 0:
            rest = search[i + len(action) :]
            query = _content(rest.splitlines()[0].lstrip(" :")) if rest.strip() else None
            query = (query or "").replace(":", " ").replace('"', " ").replace(">", " ")
            return action, sub_question, _one_line(query).strip(), None
    return "", sub_question, "", None


class OmniSearchPolicy(_Baseline):
    """OmniSearch's self-adaptive planning agent (see the module docstring)."""

    name = "omnisearch"
    config_cls = OmniSearchConfig
    config: OmniSearchConfig

    async def run(self, question: Question, rt: Runtime) -> Any:
        t0 = time.perf_counter()
        traj = self._new(question)
        limit = rt.max_steps if self.config.max_turns is None else self.config.max_turns
        has_image = question.image is not None
        image_kbs = [k.name for k in rt.kbs if k.modality == Modality.IMAGE]
        text_kbs = [k.name for k in rt.kbs if k.modality != Modality.IMAGE]
        actions = IMAGE_ACTIONS if has_image else TEXT_IMAGE_ONLY
        system = SYSTEM.replace("{image_actions}", actions if image_kbs else "")
        messages = self._messages(system, [], question, f"Question: {question.text}", rt)
        failures = turns = 0
        feedback_log: list[str] = []
        while True:
            step = Step(index=len(traj.steps))
            traj.steps.append(step)
            can_search = turns < limit
            params = self._plan_params(rt, has_image and bool(image_kbs), can_search)
            call = await rt.chat("route", messages, params)
            step.route_calls.append(call)
            if call.error:
                self._note(rt, question, step, f"planner call failed: {call.error}; answering")
                traj.stop_reason = "error"
                break
            kind, sub_question, query, final = parse_turn(call.output)
            if kind == "final":
                traj.steps.pop()  # the answering turn is the final call
                traj.final_call = call
                traj.answer = final or ""
                traj.stop_reason = "answered" if turns else "no_retrieval"
                traj.seconds = time.perf_counter() - t0
                self._emit(rt, "final", question, trajectory=traj)
                return traj
            if not kind or (kind == INPUT_IMAGE and not has_image):
                failures += 1
                if failures > self.config.max_format_retries:
                    self._note(rt, question, step, "no usable planner turn; answering")
                    traj.stop_reason = "format_fallback"
                    break
                self._note(rt, question, step, "planner turn has no action; asking again")
                messages = [
                    *messages,
                    ChatMessage(role="assistant", content=call.output or "(empty)"),
                    ChatMessage(
                        role="user",
                        content="That turn could not be used. Write <Thought>, <Sub-Question> "
                        "and <Search> with one retrieval method, or <End> and Final Answer:.",
                    ),
                ]
                continue
            if not can_search:
                self._note(rt, question, step, f"turn budget of {limit} spent; answering")
                traj.stop_reason = "budget"
                break
            turns += 1
            sub_question = sub_question or query or question.text
            feedback = await self._act(
                question, kind, sub_question, query, text_kbs, image_kbs, rt, step
            )
            feedback_log.append(f"{sub_question} -> {feedback}")
            messages = [
                *messages,
                ChatMessage(role="assistant", content=call.output),
                ChatMessage(role="user", content=feedback),
            ]
        # the budget is spent or the planner is unusable: the final answer from the feedback
        text = f"Question: {question.text}\nWhat the retrieval found:\n" + (
            "\n".join(feedback_log) or "(nothing)"
        )
        msgs = self._messages(
            "Answer the question from what the retrieval found. Reply in exactly this format:"
            "\n<think>...</think>\n<answer>a short answer</answer>",
            [],
            question,
            text,
            rt,
        )
        call = await rt.chat("final", msgs, self._answer_params(rt))
        return await self._finish(traj, call, rt, t0)

    async def _act(
        self,
        question: Question,
        kind: str,
        sub_question: str,
        query: str,
        text_kbs: list[str],
        image_kbs: list[str],
        rt: Runtime,
        step: Step,
    ) -> str:
        """Run one action (recorded in ``step``); the feedback message for the planner."""
        if kind == TEXT:
            kbs, with_image = text_kbs, False
        else:
            kbs, with_image = image_kbs, kind == INPUT_IMAGE
        evidence = await self._round(
            question,
            query or sub_question,
            kbs,
            rt,
            step,
            with_image=with_image,
            sub_question=sub_question,
            read_with=sub_question,
        )
        if not evidence:
            step.sub_answer = "No relevant information found."
        elif kind == TEXT and self.config.solver:
            msgs = [
                ChatMessage(role="system", content=SOLVER_SYSTEM),
                ChatMessage(
                    role="user",
                    content=f"Documents:\n{render_evidence(evidence)}\n{sub_question} Answer:",
                ),
            ]
            call = await rt.chat("sub_answer", msgs, self._params())
            step.answer_call = call
            step.sub_answer = "not found" if call.error else parse_answer(call.output)
        else:
            step.sub_answer = "; ".join(
                f"Description: {e.title or e.id}. {_one_line(e.text)[:200]}" for e in evidence
            )
        self._emit(rt, "sub_answer", question, step=step)
        if kind == TEXT:
            return f"Contents of retrieved documents: {step.sub_answer}"
        return f"Retrieved images: {step.sub_answer}"

    def _plan_params(self, rt: Runtime, input_image: bool, can_search: bool) -> SamplingParams:
        if self.config.answer_grammar and getattr(rt, "supports_grammar", False):
            return self._params(
                self.config.plan_max_tokens, grammar=planner_grammar(input_image, can_search)
            )
        return self._params(self.config.plan_max_tokens)
