"""Prompts of the step-wise loop, built from the KB registry.

Three prompts, each ``system`` (+ fixed few-shot turns) followed by ONE variable user turn:

- **route**: the paper's decomposition rules with the KB list and guidance generalised from the
  registry (names, descriptions, modalities), optionally one few-shot example per KB plus a
  stop example (the 0.5B model keeps the tag format only with them). The ``compact`` variant
  (:data:`ROUTER_PROMPTS`) is a short format statement and the KB list with no examples: the
  prompt a trained router is fine-tuned on (it needs no examples, and every route call gets
  cheaper). The ``terse`` variant is the compact prompt with a shorter reply: no think block,
  the KB first, and a sub-question only when it is not the question as asked (a stop is
  ``<ret>None</ret>``): fewer generated tokens, which are most of a trained router's route call
  on a CPU;
- **sub-answer**: the top-k evidence, tagged by KB (passages, compact tables, image captions),
  and the sub-question (+ the question's image when the backend sees images);
- **final answer**: the question (+ image) and the full history of sub-questions and answers.

The system prompt and few-shot turns depend only on the registry and the backend's image
support, never on the question, so llama.cpp reuses its KV cache for the common prefix; all
variable content comes last. System prompt texts live in ``prompts/*.txt``.

:func:`route_grammar` gives a GBNF grammar for the router format (``<ret>`` restricted to the
KB names or ``None``) for backends that enforce grammars.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from kbrouter.policies.parser import format_route, parse_route
from kbrouter.types import (
    ChatMessage,
    ContentPart,
    Evidence,
    ImagePart,
    KBInfo,
    Modality,
    Question,
    RouteAction,
    TextPart,
)

__all__ = [
    "ROUTER_PROMPTS",
    "detect_router_prompt",
    "terse_question",
    "Hop",
    "PromptBuilder",
    "load_prompt",
    "render_evidence",
    "render_history",
    "question_content",
    "route_grammar",
]


ROUTER_PROMPTS = ("full", "compact", "terse")
"""Router prompt variants: ``full`` (the decomposition rules, with few-shot turns unless
``few_shot`` is off), ``compact`` (format + KB list, no examples; for trained routers) and
``terse`` (the compact prompt with the terse reply format: no think block, the KB first, and no
sub-question tag to stop or to search with the question as asked; for trained routers)."""

RouterPrompt = Literal["full", "compact", "terse"]

_ROUTER_SYSTEM = {
    "full": "router_system",
    "compact": "router_compact_system",
    "terse": "router_terse_system",
}


def detect_router_prompt(messages: Sequence[ChatMessage]) -> RouterPrompt | None:
    """Which router prompt variant a router step's messages were built with: ``compact``,
    ``terse`` or ``full`` (by the first line of the system prompt, which the variants do not
    share), or None when the messages carry none (e.g. the paper's released step file)."""
    if not messages or messages[0].role != "system" or not isinstance(messages[0].content, str):
        return None
    first = messages[0].content.lstrip().split("\n", 1)[0].strip()
    for variant, name in _ROUTER_SYSTEM.items():
        if first and first == load_prompt(name).lstrip().split("\n", 1)[0].strip():
            return variant  # type: ignore[return-value]
    return None


def terse_question(messages: Sequence[ChatMessage] | Sequence[Mapping[str, Any]]) -> str | None:
    """The question as asked of a ``terse`` router step's messages (what a reply without a
    sub-question searches with), else None. Reads the ``Question:`` line the builder writes
    first in the user turn; takes :class:`ChatMessage` objects or role/content dicts (TRL's
    prompt column)."""
    msgs = [
        m if isinstance(m, ChatMessage) else ChatMessage(role=m["role"], content=m["content"])
        for m in messages
        if isinstance(m, ChatMessage) or (isinstance(m, Mapping) and "role" in m)
    ]
    if detect_router_prompt(msgs) != "terse":
        return None
    user = next((m for m in reversed(msgs) if m.role == "user"), None)
    if user is None:
        return None
    content = user.content
    text = (
        content
        if isinstance(content, str)
        else "".join(p.text for p in content if isinstance(p, TextPart))
    )
    first = text.lstrip().split("\n", 1)[0]
    if not first.startswith("Question:"):
        return None
    return first[len("Question:") :].strip() or None


def load_prompt(name: str) -> str:
    """The text of ``prompts/<name>.txt`` shipped with the package."""
    return (
        resources.files("kbrouter.policies")
        .joinpath("prompts", f"{name}.txt")
        .read_text(encoding="utf-8")
        .strip()
    )


@dataclass(frozen=True)
class Hop:
    """One completed step of the history: a sub-question, where it was asked, its answer."""

    sub_question: str
    answer: str
    kbs: tuple[str, ...] = ()
    identified: bool = False
    """The hop identified the question's image (an image-to-image match named it; the answer
    is the matched item's title)."""


# --------------------------------------------------------------------------- rendering


def render_evidence(
    evidence: Sequence[Evidence], *, max_chars: int = 700, max_table_rows: int = 12
) -> str:
    """Numbered evidence lines tagged by KB: ``(1) [kb] Title: text``.

    Tables are rendered compactly with :meth:`~kbrouter.types.Table.render`; image evidence
    shows its caption/description text, and an image-to-image match with the question's image
    (``metadata["pinned"]``) says so, since a text-only model cannot compare the pictures.
    """
    if not evidence:
        return "(no evidence was found)"
    lines = []
    for i, ev in enumerate(evidence, 1):
        head = f"({i}) [{ev.kb}]"
        if ev.metadata.get("pinned"):
            # An image-to-image match: text-only models cannot see either picture, so say it.
            head += " (this picture matches the question's image)"
        if ev.title:
            head += f" {' '.join(ev.title.split())}:"
        if ev.table is not None:
            body = "\n" + ev.table.render(max_rows=max_table_rows, max_cell_chars=40)
        else:
            body = " " + " ".join(ev.text.split())
            if len(body) > max_chars:
                body = body[: max_chars - 1].rstrip() + "…"
        lines.append(head + body)
    return "\n".join(lines)


def render_history(history: Sequence[Hop]) -> str:
    """``Sub-question i: ... / Answer i: ...`` lines (``(none yet)`` when empty)."""
    if not history:
        return "(none yet)"
    lines = []
    for i, hop in enumerate(history, 1):
        lines.append(f"Sub-question {i}: {hop.sub_question}")
        lines.append(f"Answer {i}: {hop.answer or '(no answer found)'}")
    return "\n".join(lines)


def _image_kbs(kbs: Sequence[KBInfo]) -> list[str]:
    return [kb.name for kb in kbs if kb.modality == Modality.IMAGE]


def image_note(kbs: Sequence[KBInfo], purpose: str) -> str:
    """What a text-only model is told when the question has an image it cannot see."""
    if purpose == "route":
        names = _image_kbs(kbs)
        if names:
            where = " or ".join(f'"{n}"' for n in names)
            return (
                "[An image is attached to this question, but you cannot see it. Ask about what "
                f"the image shows with the {where} knowledge base, which searches with the "
                "image itself.]"
            )
        return "[An image is attached to this question, but you cannot see it.]"
    return "[An image is attached to the question, but you cannot see it; rely on the text.]"


def identified_image_note(entity: str) -> str:
    """The route note once an image search has identified the question's image: what it shows,
    instead of :func:`image_note`'s request to identify it (which small models keep obeying,
    asking "What is shown in the image?" again at every later step)."""
    name = " ".join(entity.split())
    return (
        f"[An image is attached to this question. An image search has identified it: it shows "
        f"{name}. Do not ask again what the image shows; ask about {name}.]"
    )


def question_content(
    question: Question, text: str, *, supports_images: bool, note: str | None = None
) -> str | list[ContentPart]:
    """User content carrying ``text`` and, if the question has an image, that image (as an
    :class:`~kbrouter.types.ImagePart` for image-capable backends, else ``note`` appended)."""
    if question.image is None:
        return text
    if supports_images:
        return [ImagePart(path=question.image), TextPart(text=text)]
    return f"{text}\n{note}" if note else text


# --------------------------------------------------------------------------- few-shot

# (question, has_image, history, think, sub_question) per modality; two variants each so that
# two KBs of the same modality get different examples.
_EXAMPLES: dict[Modality, list[tuple[str, bool, list[Hop], str, str]]] = {
    Modality.TEXT: [
        (
            "In which country was the director of the film Titanic (1997) born?",
            False,
            [Hop("Who directed the film Titanic (1997)?", "James Cameron")],
            "Titanic was directed by James Cameron. I still need his country of birth, "
            "which is general knowledge.",
            "In which country was James Cameron born?",
        ),
        (
            "Who wrote the novel that the film Blade Runner is based on?",
            False,
            [],
            "I need the novel behind Blade Runner first; this is general knowledge.",
            "Which novel is the film Blade Runner based on?",
        ),
    ],
    Modality.IMAGE: [
        (
            "In what year was the building in the image completed?",
            True,
            [],
            "I do not know what the image shows. I must identify it first, "
            "which needs a search with the image.",
            "What is shown in the image?",
        ),
        (
            "Which country is the animal in the image native to?",
            True,
            [],
            "I must first find out which animal the image shows.",
            "What animal is shown in the image?",
        ),
    ],
    Modality.TABLE: [
        (
            "How many gold medals did Norway win at the 2018 Winter Olympics?",
            False,
            [],
            "This is a statistic, which is best found in a table.",
            "How many gold medals did Norway win at the 2018 Winter Olympics?",
        ),
        (
            "What was the population of the largest city of Australia in 2021?",
            False,
            [Hop("What is the largest city of Australia?", "Sydney")],
            "The largest city is Sydney. Its population is a number, found in a table.",
            "What was the population of Sydney in 2021?",
        ),
    ],
}

_STOP_EXAMPLE = (
    "Which river flows through the capital of France?",
    [
        Hop("What is the capital of France?", "Paris"),
        Hop("Which river flows through Paris?", "the Seine"),
    ],
    "The capital is Paris and the Seine flows through Paris. I can answer now.",
)

_GUIDANCE = {
    Modality.TEXT: "general, non-visual knowledge about people, places, events and things",
    Modality.IMAGE: "anything visual, and identifying what the question's image shows",
    Modality.TABLE: "numbers, statistics, rankings, records and other tabular facts",
}


# --------------------------------------------------------------------------- builder


class PromptBuilder:
    """Builds the messages of every call of the loop for one KB registry and backend.

    Args:
        kbs: the registry's KBs, in config order.
        supports_images: whether the backend sees image parts (else a text note is used).
        few_shot: add one router example per KB plus a stop example (small models keep the
            tag format only with them).
        answer_few_shot: add one example each to the sub-answer and final prompts (off by
            default: the 0.5B model was seen copying the example's answer).
        router_prompt: ``full``, ``compact`` or ``terse`` (see :data:`ROUTER_PROMPTS`; only
            ``full`` has few-shot turns).
        identified_note: once a hop of the history identified the question's image
            (:attr:`Hop.identified`), the ``full`` route prompt says what the image shows
            (:func:`identified_image_note`) instead of asking to identify it. The ``compact``
            and ``terse`` prompts keep their text: trained routers were fine-tuned on it.
    """

    def __init__(
        self,
        kbs: Sequence[KBInfo],
        *,
        supports_images: bool,
        few_shot: bool = True,
        answer_few_shot: bool = False,
        router_prompt: RouterPrompt = "full",
        identified_note: bool = False,
    ) -> None:
        if not kbs:
            raise ValueError("a PromptBuilder needs at least one knowledge base")
        if router_prompt not in ROUTER_PROMPTS:
            raise ValueError(
                f"unknown router prompt {router_prompt!r}; expected one of {ROUTER_PROMPTS}"
            )
        self.router_prompt = router_prompt
        self.kbs = list(kbs)
        self.supports_images = supports_images
        self.few_shot = few_shot
        self.answer_few_shot = answer_few_shot
        self.identified_note = identified_note
        self._route_prefix = self._build_route_prefix()
        self._sub_prefix = self._build_sub_answer_prefix()
        self._final_prefix = self._build_final_prefix()

    # ---------------------------------------------------------------- route

    def router_system_prompt(self) -> str:
        kb_list = "\n".join(f"- {kb.name}: {' '.join(kb.description.split())}" for kb in self.kbs)
        if self.router_prompt != "full":
            kb_list = "\n".join(
                f"- {kb.name} ({kb.modality.value}): {' '.join(kb.description.split())}"
                for kb in self.kbs
            )
            return load_prompt(_ROUTER_SYSTEM[self.router_prompt]).format(kb_list=kb_list)
        guidance = []
        for modality, what in _GUIDANCE.items():
            names = [kb.name for kb in self.kbs if kb.modality == modality]
            if names:
                guidance.append(f"- {what}: {' or '.join(names)}")
        guidance.append(
            "- write None in <ret> only together with None in <sub-question>, when you can "
            "answer the original question"
        )
        return load_prompt("router_system").format(kb_list=kb_list, kb_guidance="\n".join(guidance))

    def _route_user_text(self, text: str, has_image: bool, history: Sequence[Hop]) -> str:
        parts = [f"Question: {' '.join(text.split())}"]
        if has_image and not self.supports_images:
            entity = next((h.answer for h in history if h.identified and h.answer.strip()), None)
            if entity is not None and self.identified_note and self.router_prompt == "full":
                parts.append(identified_image_note(entity))
            else:
                parts.append(image_note(self.kbs, "route"))
        # No "(none yet)" placeholder before the first hop: the 0.5B model copied it as its
        # sub-question ("None yet?"), searched for it and answered with it.
        if history:
            parts.append(f"Answers found so far:\n{render_history(history)}")
            parts.append("What is the next sub-question, and which knowledge base answers it?")
        else:
            parts.append("What is the first sub-question, and which knowledge base answers it?")
        return "\n".join(parts)

    def _build_route_prefix(self) -> list[ChatMessage]:
        msgs = [ChatMessage(role="system", content=self.router_system_prompt())]
        if not self.few_shot or self.router_prompt != "full":
            return msgs
        # The stop example comes first: small models copy the most recent example most.
        q, hist, think = _STOP_EXAMPLE
        msgs.append(ChatMessage(role="user", content=self._route_user_text(q, False, hist)))
        msgs.append(ChatMessage(role="assistant", content=format_route(RouteAction(think=think))))
        used: dict[Modality, int] = {}
        for kb in self.kbs:
            variants = _EXAMPLES[kb.modality]
            i = used.get(kb.modality, 0)
            used[kb.modality] = i + 1
            q, has_image, hist, think, sub_q = variants[i % len(variants)]
            msgs.append(ChatMessage(role="user", content=self._route_user_text(q, has_image, hist)))
            action = RouteAction(think=think, sub_question=sub_q, kbs=[kb.name])
            msgs.append(ChatMessage(role="assistant", content=format_route(action)))
        return msgs

    def route_messages(self, question: Question, history: Sequence[Hop]) -> list[ChatMessage]:
        """System + few-shot (fixed) then the question and the history so far."""
        text = self._route_user_text(question.text, question.image is not None, history)
        content = question_content(question, text, supports_images=self.supports_images)
        return [*self._route_prefix, ChatMessage(role="user", content=content)]

    def corrective_messages(
        self, messages: Sequence[ChatMessage], bad_output: str, problem: str
    ) -> list[ChatMessage]:
        """``messages`` + the rejected reply + a user turn naming the problem."""
        names = ", ".join(kb.name for kb in self.kbs)
        if self.router_prompt == "terse":
            shape = (
                "<ret>a knowledge base name</ret> to search with the question as asked, or "
                "<ret>a knowledge base name</ret><sub-question>one question</sub-question>, "
                "or <ret>None</ret> to stop"
            )
        else:
            shape = (
                "<think>your reasoning</think><sub-question>one question, or None"
                "</sub-question><ret>a knowledge base name, or None</ret>"
            )
        fix = (
            f"Your reply could not be used: {problem}. Reply again in exactly this format: "
            f"{shape}. The knowledge base names are: {names}."
        )
        return [
            *messages,
            ChatMessage(role="assistant", content=bad_output or "(empty reply)"),
            ChatMessage(role="user", content=fix),
        ]

    # ---------------------------------------------------------------- sub-answer

    def _build_sub_answer_prefix(self) -> list[ChatMessage]:
        msgs = [ChatMessage(role="system", content=load_prompt("sub_answer_system"))]
        if self.answer_few_shot:
            ev = [
                Evidence(
                    kb=self.kbs[0].name,
                    id="ex-1",
                    score=1.0,
                    title="James Cameron",
                    text="James Francis Cameron (born August 16, 1954) is a Canadian "
                    "filmmaker, born in Kapuskasing, Ontario.",
                )
            ]
            msgs.append(
                ChatMessage(
                    role="user",
                    content=self._sub_user_text("In which country was James Cameron born?", ev),
                )
            )
            msgs.append(
                ChatMessage(
                    role="assistant",
                    content="<think>Evidence 1 says he was born in Kapuskasing, Ontario, which "
                    "is in Canada.</think>\n<answer>Canada</answer>",
                )
            )
        return msgs

    @staticmethod
    def _sub_user_text(sub_question: str, evidence: Sequence[Evidence]) -> str:
        return f"Evidence:\n{render_evidence(evidence)}\nSub-question: {sub_question}"

    def sub_answer_messages(
        self, question: Question, sub_question: str, evidence: Sequence[Evidence]
    ) -> list[ChatMessage]:
        """System (+ example) then the evidence and the sub-question (+ the question image)."""
        text = self._sub_user_text(sub_question, evidence)
        content = question_content(
            question,
            text,
            supports_images=self.supports_images,
            note=image_note(self.kbs, "sub_answer"),
        )
        return [*self._sub_prefix, ChatMessage(role="user", content=content)]

    # ---------------------------------------------------------------- final answer

    def _build_final_prefix(self) -> list[ChatMessage]:
        msgs = [ChatMessage(role="system", content=load_prompt("final_system"))]
        if self.answer_few_shot:
            q, hist, _ = _STOP_EXAMPLE
            msgs.append(ChatMessage(role="user", content=self._final_user_text(q, hist)))
            msgs.append(
                ChatMessage(
                    role="assistant",
                    content="<think>The capital of France is Paris, and the Seine flows through "
                    "Paris.</think>\n<answer>the Seine</answer>",
                )
            )
        return msgs

    @staticmethod
    def _final_user_text(text: str, history: Sequence[Hop]) -> str:
        # Only hops that found an answer, and no placeholder when none did: a small model
        # copies "(none yet)" or "(no answer found)" as its final answer.
        found = [h for h in history if h.answer.strip()]
        parts = [f"Question: {' '.join(text.split())}"]
        if found:
            parts.append(f"Answers found so far:\n{render_history(found)}")
        parts.append("What is the answer to the question?")
        return "\n".join(parts)

    def final_messages(self, question: Question, history: Sequence[Hop]) -> list[ChatMessage]:
        """System (+ example) then the question (+ image) and the FULL history."""
        text = self._final_user_text(question.text, history)
        content = question_content(
            question, text, supports_images=self.supports_images, note=image_note(self.kbs, "final")
        )
        return [*self._final_prefix, ChatMessage(role="user", content=content)]

    # ---------------------------------------------------------------- grammar

    def route_grammar(
        self, *, allow_stop: bool = True, kb_names: Sequence[str] | None = None
    ) -> str:
        """The router grammar over this builder's KBs (or only ``kb_names``), in the reply format
        of this builder's router prompt."""
        names = list(kb_names) if kb_names is not None else [kb.name for kb in self.kbs]
        return route_grammar(names, allow_stop=allow_stop, terse=self.router_prompt == "terse")

    def parse_route(
        self, text: str, resolve: Callable[[str], str], question: Question
    ) -> RouteAction:
        """:func:`~kbrouter.policies.parser.parse_route` for this builder's reply format (the
        ``terse`` format may leave out the sub-question: the question as asked)."""
        terse = question.text if self.router_prompt == "terse" else None
        return parse_route(text, resolve, question=terse)


#: longest reasoning an answer reply may carry under :func:`answer_grammar`
ANSWER_THINK_CHARS = 400


def answer_grammar() -> str:
    """A GBNF grammar for (sub-)answer replies: an optional ``<think>...</think>`` then a
    non-empty one-line ``<answer>...</answer>``. Unconstrained, the 0.5B model often stops after
    the think block and leaves no answer (18% of all-kbs' mkqa-mini answers); forcing the think
    block instead cost the learned router 5 points (26.4 -> 21.1 on the e2e subset: the model
    answers best directly, and a forced think argued it into another answer)."""
    return "\n".join(
        [
            'root ::= ( "<think>" think "</think>" nl )? "<answer>" ans "</answer>"',
            f"think ::= [^<]{{0,{ANSWER_THINK_CHARS}}}",
            "ans ::= [^<\\n ] [^<\\n]{0,199}",
            'nl ::= "\\n"?',
        ]
    )


def _gbnf_literal(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: longest reasoning the router grammar lets through (small models otherwise loop until the
#: token cap and the reply has no tags); sub-questions are capped at 200 characters
THINK_CHARS = 400


def route_grammar(kb_names: Sequence[str], *, allow_stop: bool = True, terse: bool = False) -> str:
    """A GBNF grammar for the router output: think, then either ``None``/``None`` (only if
    ``allow_stop``) or one sub-question ending in ``?`` (so a bare ``None`` cannot pair with a
    KB name; without the stop branch it may not start with ``None`` or a space either) and one or
    more comma-separated KB names from ``kb_names``.

    ``terse``: the ``terse`` reply format: no think block, the KB first, then an optional
    sub-question (without it the search uses the question as asked); a stop is
    ``<ret>None</ret>``."""
    if not kb_names:
        raise ValueError("route_grammar needs at least one KB name")
    kb_alts = " | ".join(_gbnf_literal(n) for n in kb_names)
    branches = "( stop | go )" if allow_stop else "go"
    # without the stop branch a sub-question may not start with "None" or a space (small
    # models write "None, None, ..." until the token cap); "Name ...", "Nobel ..." may
    not_none = '( [^<\\n\\t\\r?N ] | "N" [^o<\\n?] | "No" [^n<\\n?] | "Non" [^e<\\n?] )'
    subq = '[^<\\n?]{1,200} "?"' if allow_stop else f'{not_none} [^<\\n?]{{0,196}} "?"'

    root = f"root ::= {branches}" if terse else f'root ::= "<think>" think "</think>" nl {branches}'
    return "\n".join(
        [
            root,
            f"think ::= [^<]{{0,{THINK_CHARS}}}",
            'stop ::= "<ret>None</ret>"'
            if terse
            else 'stop ::= "<sub-question>None</sub-question>" nl "<ret>None</ret>"',
            'go ::= "<ret>" kbs "</ret>" ( "\\n<sub-question>" subq "</sub-question>" )?'
            if terse
            else 'go ::= "<sub-question>" subq "</sub-question>" nl "<ret>" kbs "</ret>"',
            f"subq ::= {subq}",
            'kbs ::= kb ( ", " kb )*',
            f"kb ::= {kb_alts}",
            'nl ::= "\\n"?',
        ]
    )
