"""The router/answer output parser: tolerant of noise, strict about meaning, never crashes."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kbrouter.errors import ModelOutputError, UnknownKBError
from kbrouter.policies.parser import format_route, parse_answer, parse_route, parse_think
from kbrouter.types import RouteAction

KBS = {
    "text": "text",
    "text retriever": "text",
    "tables": "tables",
    "table retriever": "tables",
    "images": "images",
    "text image retriever": "images",
}


def resolve(name: str) -> str:
    key = " ".join(name.lower().split())
    if key not in KBS:
        raise UnknownKBError(name, ["text", "tables", "images"])
    return KBS[key]


def test_well_formed_route():
    """A clean router output gives the think text, sub-question and canonical KB."""
    out = (
        "<think>Need the director.</think>\n<sub-question>Who directed Titanic?</sub-question>\n"
        "<ret>text</ret>"
    )
    action = parse_route(out, resolve)
    assert action == RouteAction(
        think="Need the director.", sub_question="Who directed Titanic?", kbs=["text"]
    )


def test_case_whitespace_and_surrounding_text_tolerated():
    """Upper-case tags, stray spaces in tags and chatter around them still parse."""
    out = (
        "Sure! Here is my answer:\n< THINK >hmm</Think>  blah\n"
        "<Sub-Question>  What is   the capital of Peru? </sub-question >\n"
        "<RET> Tables </RET> hope this helps"
    )
    action = parse_route(out, resolve)
    assert action.sub_question == "What is the capital of Peru?"
    assert action.kbs == ["tables"]
    assert action.think == "hmm"


def test_missing_think_close_tolerated():
    """A missing </think> ends the think block at the next tag."""
    out = "<think>reasoning here<sub-question>Who?</sub-question><ret>text</ret>"
    action = parse_route(out, resolve)
    assert action.think == "reasoning here"
    assert action.sub_question == "Who?"


def test_missing_closing_ret_at_end_tolerated():
    """Generation cut right after the KB name still parses."""
    action = parse_route("<think>x</think><sub-question>Who?</sub-question><ret>text", resolve)
    assert action.kbs == ["text"]


def test_paper_aliases_resolve_to_registry_names():
    """The paper's retriever names are accepted aliases."""
    out = "<sub-question>What does the image show?</sub-question><ret>Text Image Retriever</ret>"
    assert parse_route(out, resolve).kbs == ["images"]


def test_multiple_kbs_comma_separated_deduplicated():
    """Several comma-separated KBs are all kept, in order, without duplicates."""
    out = "<sub-question>Q?</sub-question><ret>Table Retriever, text, tables</ret>"
    assert parse_route(out, resolve).kbs == ["tables", "text"]


def test_none_none_is_stop():
    """None in both tags means stop."""
    action = parse_route(
        "<think>done</think><sub-question>None</sub-question><ret>NONE</ret>", resolve
    )
    assert action.is_stop
    assert action.think == "done"


@pytest.mark.parametrize(
    ("out", "reason"),
    [
        ("<sub-question>None</sub-question><ret>text</ret>", "None must be in both"),
        ("<sub-question>Who?</sub-question><ret>None</ret>", "<ret> is None"),
        ("<sub-question>Who?</sub-question><ret>wikipedia</ret>", "'wikipedia'"),
        ("<sub-question>Who?</sub-question><ret>text, none</ret>", "mixes None"),
        ("<sub-question>Who?</sub-question>", "missing <ret>"),
        ("<think>x</think><ret>text</ret>", "missing <sub-question>"),
        ("<think>x</think><answer>Paris</answer>", "found an <answer> tag"),
        ("", "missing <sub-question>"),
        ("<sub-question></sub-question><ret>text</ret>", "sub-question is empty"),
    ],
)
def test_bad_outputs_raise_precise_reason(out: str, reason: str):
    """Each kind of bad output raises ModelOutputError whose message names the problem."""
    with pytest.raises(ModelOutputError, match=reason.replace("(", r"\(").replace("?", r"\?")):
        parse_route(out, resolve)


def test_unknown_kb_message_lists_known_kbs():
    """An unknown KB's message names it and the known KBs (it goes into the correction)."""
    with pytest.raises(ModelOutputError) as e:
        parse_route("<sub-question>Who?</sub-question><ret>Web Search</ret>", resolve)
    assert "Web Search" in str(e.value)
    assert "text, tables, images" in str(e.value)


def test_parse_answer_variants():
    """<answer> content wins; without it the text minus the think block; strict mode raises."""
    assert parse_answer("<think>a</think><answer> Paris </answer>") == "Paris"
    assert parse_answer("<THINK>a</THINK>\n<Answer>Lima") == "Lima"
    assert parse_answer("<think>because</think> Paris is the answer") == "Paris is the answer"
    assert parse_answer("just Paris") == "just Paris"
    with pytest.raises(ModelOutputError, match="missing <answer>"):
        parse_answer("just Paris", strict=True)
    with pytest.raises(ModelOutputError, match="empty"):
        parse_answer("<answer> </answer>", strict=True)
    assert parse_think("<think>why</think><answer>x</answer>") == "why"


# --------------------------------------------------------------------------- properties

TAG_SOUP = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "<think>",
                "</think>",
                "<sub-question>",
                "</sub-question>",
                "<ret>",
                "</ret>",
                "<answer>",
                "</answer>",
                "None",
                "none",
                ",",
                "text",
                "Table Retriever",
                "< ret >",
                "</ SUB-QUESTION>",
                "[",
                "]",
                '"',
                "\n",
            ]
        ),
        st.text(max_size=12),
    ),
    max_size=25,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=200), TAG_SOUP))
def test_router_parser_never_crashes(text: str):
    """Random and adversarial strings either parse to a valid action or raise ModelOutputError."""
    try:
        action = parse_route(text, resolve)
    except ModelOutputError as e:
        assert str(e)
        return
    if action.is_stop:
        assert action.sub_question is None and action.kbs == []
    else:
        assert action.sub_question
        assert action.kbs and set(action.kbs) <= {"text", "tables", "images"}


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), TAG_SOUP))
def test_answer_parser_never_crashes(text: str):
    """parse_answer always returns a string; strict mode only ever raises ModelOutputError."""
    assert isinstance(parse_answer(text), str)
    with contextlib.suppress(ModelOutputError):
        assert parse_answer(text, strict=True)


SAFE_TEXT = st.text(
    alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), max_size=60
)


@settings(max_examples=300, deadline=None)
@given(
    think=SAFE_TEXT,
    sub_q=SAFE_TEXT.filter(
        lambda s: (
            " ".join(s.split()).strip("[]\"'` .").lower()
            not in {"none", "null", "n/a", "no", "nothing", ""}
        )
    ),
    kbs=st.lists(
        st.sampled_from(["text", "tables", "images"]), min_size=1, max_size=3, unique=True
    ),
)
def test_round_trip_well_formed(think: str, sub_q: str, kbs: list[str]):
    """format_route -> parse_route gives back the same action (whitespace normalised)."""
    action = RouteAction(
        think=" ".join(think.split()), sub_question=" ".join(sub_q.split()), kbs=kbs
    )
    try:
        parsed = parse_route(format_route(action), resolve)
    except ModelOutputError:
        # Only a sub-question that is itself wrapped in brackets/quotes may be altered.
        assert action.sub_question and action.sub_question[0] in "[\"'`"
        return
    assert parsed.kbs == kbs
    if action.sub_question and action.sub_question[0] not in "[\"'`":
        assert parsed.sub_question == action.sub_question
    if action.think and action.think[0] not in "[\"'`":
        assert parsed.think == action.think


def test_round_trip_stop():
    """The stop action round-trips."""
    assert parse_route(format_route(RouteAction(think="ok")), resolve) == RouteAction(think="ok")


@settings(max_examples=200, deadline=None)
@given(
    question=SAFE_TEXT.filter(
        lambda s: (
            (
                " ".join(s.split()).strip("[]\"'` .").lower()
                not in {"none", "null", "n/a", "no", "nothing", ""}
            )
            and " ".join(s.split())[:1] not in "[\"'`"
        )
    ),
    other=st.booleans(),
    kb=st.sampled_from(["text", "tables", "images"]),
)
def test_terse_round_trip(question: str, other: bool, kb: str):
    """The terse format: the KB first; a search with the question as asked is ``<ret>KB</ret>``
    alone, any other sub-question follows in its tag, a stop is ``<ret>None</ret>``; parsing
    with the question gives back the action."""
    question = " ".join(question.split())
    sub_q = "Which film is it?" if other else question
    action = RouteAction(sub_question=sub_q, kbs=[kb])
    text = format_route(action, terse=question)
    assert "<think>" not in text
    assert text.startswith(f"<ret>{kb}</ret>") and ("<sub-question>" in text) == other
    assert parse_route(text, resolve, question=question) == action
    stop = format_route(RouteAction(), terse=question)
    assert stop == "<ret>None</ret>"
    assert parse_route(stop, resolve, question=question).is_stop


def test_ret_alone_needs_the_question():
    """Without the question (the full and compact formats) a missing sub-question tag is still
    an error; the terse stop also parses in the long form."""
    with pytest.raises(ModelOutputError, match="missing <sub-question>"):
        parse_route("<ret>text</ret>", resolve)
    long_stop = "<sub-question>None</sub-question>\n<ret>None</ret>"
    assert parse_route(long_stop, resolve, question="Q?").is_stop
    with pytest.raises(ModelOutputError, match="unknown|names no"):
        parse_route("<ret>atlas</ret>", resolve, question="Q?")
