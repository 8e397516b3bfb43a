"""Parsing the router's and the answerer's tagged outputs. Pure functions.

Router output::

    <think>what is still missing</think>
    <sub-question>one atomic question, or None</sub-question>
    <ret>one KB name (or several, comma-separated), or None</ret>

The ``terse`` router format (trained routers, :data:`~kbrouter.policies.prompts.ROUTER_PROMPTS`)
has no think block and names the KB first; a sub-question follows only when it is not the
question as asked::

    <ret>one KB name, or None</ret>
    <sub-question>one atomic question (optional)</sub-question>

(:func:`parse_route` with ``question=`` reads it; :func:`format_route` with ``terse=`` writes it.)

Answer output::

    <think>...</think><answer>the answer</answer>

Like the released R1-Router code, tags are found case-insensitively with a non-greedy search,
so text around them is tolerated; in addition a missing closing tag is tolerated (the content
then ends at the next tag or at the end of the text) and tags may contain stray spaces
(``< ret >``, ``</ Sub-Question>``). Problems raise
:class:`~kbrouter.errors.ModelOutputError` whose message says precisely what is wrong; the
policy quotes it in its corrective message to the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from kbrouter.errors import ModelOutputError, UnknownKBError
from kbrouter.types import RouteAction

__all__ = ["parse_route", "parse_answer", "parse_think", "format_route", "strip_tags"]

_TAG_NAMES = {
    "think": r"think",
    "sub-question": r"sub[\s_-]*question",
    "ret": r"ret(?:riever)?",
    "answer": r"answer",
}
_ANY_TAG = re.compile(r"<\s*/?\s*(?:think|sub[\s_-]*question|ret(?:riever)?|answer)\s*>", re.I)
_NONE_WORDS = {"none", "null", "n/a", "no", "nothing", ""}
_KB_SPLIT = re.compile(r"\s*[,;|\n]\s*")


def _open(tag: str) -> re.Pattern[str]:
    return re.compile(r"<\s*" + _TAG_NAMES[tag] + r"\s*>", re.I)


def _close(tag: str) -> re.Pattern[str]:
    return re.compile(r"<\s*/\s*" + _TAG_NAMES[tag] + r"\s*>", re.I)


def _find(text: str, tag: str, start: int = 0) -> tuple[str, int] | None:
    """Content of the first ``<tag>`` at or after ``start`` and the index just after it.

    The content ends at the matching close tag, or (close tag missing) at the next known tag or
    the end of the text.
    """
    m = _open(tag).search(text, start)
    if m is None:
        return None
    body_start = m.end()
    close = _close(tag).search(text, body_start)
    nxt = _ANY_TAG.search(text, body_start)
    if close is not None and (nxt is None or nxt.start() >= close.start()):
        return text[body_start : close.start()], close.end()
    end = nxt.start() if nxt is not None else len(text)
    return text[body_start:end], end


def _clean(s: str) -> str:
    s = " ".join(s.split())
    # Drop wrapping brackets/quotes the model sometimes copies from the format description.
    while len(s) >= 2 and (s[0], s[-1]) in {("[", "]"), ('"', '"'), ("'", "'"), ("`", "`")}:
        s = s[1:-1].strip()
    return s


def _is_none(s: str) -> bool:
    return _clean(s).strip(" .").lower() in _NONE_WORDS


def strip_tags(text: str) -> str:
    """The text with every known tag removed and whitespace collapsed."""
    return " ".join(_ANY_TAG.sub(" ", text).split())


def parse_think(text: str) -> str:
    """The ``<think>`` content, or ``""`` (a missing ``</think>`` is tolerated)."""
    found = _find(text, "think")
    return _clean(found[0]) if found else ""


def parse_route(
    text: str, resolve: Callable[[str], str], *, question: str | None = None
) -> RouteAction:
    """Parse a router output into a :class:`RouteAction`.

    Args:
        text: the raw model output.
        resolve: maps a KB name or alias to its canonical name, raising
            :class:`~kbrouter.errors.UnknownKBError` for unknown names (e.g.
            ``Runtime.resolve_kb``).
        question: the question as asked, for the ``terse`` format: an output with a ``<ret>``
            tag but no ``<sub-question>`` tag searches with it (None: the tag is required).

    Raises:
        ModelOutputError: no ``<sub-question>`` or ``<ret>`` tag, an empty sub-question, an
            unknown KB, or ``None`` in only one of the two tags.
    """
    if not isinstance(text, str):
        raise ModelOutputError(f"router output is not text: {type(text).__name__}")
    think_found = _find(text, "think")
    think = _clean(think_found[0]) if think_found else ""
    after_think = think_found[1] if think_found else 0
    sq = _find(text, "sub-question", after_think) or _find(text, "sub-question")
    if sq is None and question is not None and question.strip():
        ret_only = _find(text, "ret", after_think)
        if ret_only is not None:
            # terse: <ret>KB</ret> alone searches with the question as asked (None: stop)
            sq = (question if not _is_none(ret_only[0]) else "None", after_think)
    if sq is None:
        if _open("answer").search(text):
            raise ModelOutputError(
                "expected <sub-question> and <ret> tags but found an <answer> tag; to stop, "
                "write <sub-question>None</sub-question><ret>None</ret>"
            )
        raise ModelOutputError("missing <sub-question>...</sub-question> tag")
    sub_q_raw, sq_end = sq
    ret = _find(text, "ret", sq_end) or _find(text, "ret")
    if ret is None:
        raise ModelOutputError("missing <ret>...</ret> tag after the sub-question")
    ret_raw = ret[0]

    sub_q = _clean(sub_q_raw)
    sq_none = _is_none(sub_q)
    ret_none = _is_none(ret_raw)
    if sq_none and ret_none:
        return RouteAction(think=think, sub_question=None, kbs=[])
    if sq_none:
        if not sub_q:
            raise ModelOutputError(
                f"the sub-question is empty but <ret> names {_clean(ret_raw)!r}; write one "
                "question, or None in both tags to stop"
            )
        raise ModelOutputError(
            f"<sub-question> is None but <ret> is {_clean(ret_raw)!r}; None must be in both "
            "tags or in neither"
        )
    if ret_none:
        raise ModelOutputError(
            f"<ret> is None but the sub-question is {sub_q!r}; name a knowledge base for it, "
            "or write None in both tags to stop"
        )

    ret_clean = _clean(ret_raw).strip(" .")
    try:  # the whole content may be one name (KB names may contain commas)
        parts = [resolve(ret_clean)]
    except UnknownKBError:
        parts = [_clean(p).strip(" .") for p in _KB_SPLIT.split(ret_clean)]
    kbs: list[str] = []
    for name in parts:
        if not name:
            continue
        if _is_none(name):
            raise ModelOutputError(f"<ret> mixes None with knowledge base names: {ret_clean!r}")
        try:
            canonical = resolve(name)
        except UnknownKBError as e:
            raise ModelOutputError(str(e)) from None
        if canonical not in kbs:
            kbs.append(canonical)
    if not kbs:
        raise ModelOutputError(f"<ret> names no knowledge base: {ret_raw!r}")
    return RouteAction(think=think, sub_question=sub_q, kbs=kbs)


def parse_answer(text: str, *, strict: bool = False) -> str:
    """The ``<answer>`` content of an answer output.

    Without an ``<answer>`` tag, falls back to the whole text with the ``<think>`` block and
    all tags removed (small models often answer in plain text); with ``strict=True`` (e.g.
    for rewards) a missing or empty ``<answer>`` raises :class:`ModelOutputError` instead.
    """
    if not isinstance(text, str):
        raise ModelOutputError(f"answer output is not text: {type(text).__name__}")
    found = _find(text, "answer")
    if found is not None:
        ans = _clean(strip_tags(found[0]))
        if ans:
            return ans
        if strict:
            raise ModelOutputError("the <answer> tag is empty")
    elif strict:
        raise ModelOutputError("missing <answer>...</answer> tag")
    # Fallback: drop a closed think block, then every tag.
    body = text
    think = _find(body, "think")
    if think is not None and _close("think").search(body):
        m = _open("think").search(body)
        assert m is not None
        body = body[: m.start()] + body[think[1] :]
    return _clean(strip_tags(body))


def format_route(action: RouteAction, *, terse: str | None = None) -> str:
    """Render a :class:`RouteAction` in the router's output format (inverse of
    :func:`parse_route` for well-formed actions; used for few-shot examples and training
    targets).

    ``terse``: the question as asked, for the ``terse`` format: no think block, the KB first,
    and no sub-question tag for a stop (``<ret>None</ret>``) or when the sub-question is that
    question (compared with whitespace collapsed)."""
    sub_q = action.sub_question if action.sub_question is not None else "None"
    ret = ", ".join(action.kbs) if action.kbs else "None"
    if terse is None:
        return (
            f"<think>{action.think}</think>\n<sub-question>{sub_q}</sub-question>\n<ret>{ret}</ret>"
        )
    if action.sub_question is None or " ".join(sub_q.split()) == " ".join(terse.split()):
        return f"<ret>{ret}</ret>"
    return f"<ret>{ret}</ret>\n<sub-question>{sub_q}</sub-question>"
