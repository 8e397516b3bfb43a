"""Prompt building: registry-driven router prompt, evidence rendering, grammar."""

from __future__ import annotations

from pathlib import Path

from kbrouter.kb.base import KBInfo
from kbrouter.policies.parser import parse_route
from kbrouter.policies.prompts import Hop, PromptBuilder, render_evidence, route_grammar
from kbrouter.types import Evidence, Modality, Question, Table

KBS = [
    KBInfo(name="wiki", description="Encyclopedia passages.", modality=Modality.TEXT),
    KBInfo(name="stats", description="Tables of numbers.", modality=Modality.TABLE),
    KBInfo(name="pics", description="Captioned photos.", modality=Modality.IMAGE),
]


def test_router_prompt_comes_from_the_registry():
    """KB names, descriptions and modality guidance appear in the system prompt."""
    system = PromptBuilder(KBS, supports_images=False).router_system_prompt()
    assert "- wiki: Encyclopedia passages." in system
    assert "- stats: Tables of numbers." in system
    assert "numbers, statistics" in system and ": stats" in system
    assert "anything visual" in system and ": pics" in system


def test_few_shot_examples_parse_and_cover_every_kb():
    """One router example per KB (plus a stop example), each a valid router output."""
    b = PromptBuilder(KBS, supports_images=False)
    msgs = b.route_messages(Question(text="q"), [])
    examples = [m.text() for m in msgs if m.role == "assistant"]
    actions = [parse_route(e, lambda n: n) for e in examples]
    assert actions[0].is_stop
    assert [a.kbs for a in actions[1:]] == [["wiki"], ["stats"], ["pics"]]
    assert (
        len(
            PromptBuilder(KBS, supports_images=False, few_shot=False).route_messages(
                Question(text="q"), []
            )
        )
        == 2
    )


def test_answer_prompts_have_no_examples_by_default():
    """Sub-answer and final prompts are system + one user turn unless asked for examples."""
    q = Question(text="q")
    assert len(PromptBuilder(KBS, supports_images=False).sub_answer_messages(q, "s", [])) == 2
    with_ex = PromptBuilder(KBS, supports_images=False, answer_few_shot=True)
    assert len(with_ex.sub_answer_messages(q, "s", [])) == 4
    assert len(with_ex.final_messages(q, [Hop("a", "b")])) == 4


def test_render_evidence_tags_kb_and_renders_tables_compactly():
    """Evidence lines are numbered and KB-tagged; tables use the pipe rendering."""
    table = Table(header=["country", "capital"], rows=[["Peru", "Lima"]], title="Capitals")
    ev = [
        Evidence(kb="wiki", id="1", score=1, text="Lima  is the\ncapital.", title="Lima"),
        Evidence(kb="stats", id="2", score=1, text="linearised", title="Capitals", table=table),
    ]
    out = render_evidence(ev)
    assert out.splitlines()[0] == "(1) [wiki] Lima: Lima is the capital."
    assert "(2) [stats] Capitals:\ncountry | capital\nPeru | Lima" in out
    assert render_evidence([]) == "(no evidence was found)"


def test_render_evidence_flags_image_to_image_matches():
    """A text-only model is told which picture matched the question's image."""
    ev = [
        Evidence(kb="images", id="f", score=0.95, text="Flag of Peru.", metadata={"pinned": True}),
        Evidence(kb="images", id="g", score=0.05, text="Flag of Chad."),
    ]
    first, second = render_evidence(ev).splitlines()
    assert "matches the question's image" in first
    assert "matches" not in second


def test_image_is_a_part_or_a_note():
    """Image-capable backends get the image; text-only ones a note naming the image KB."""
    q = Question(text="What is this?", image=Path("x.jpg"))
    seen = PromptBuilder(KBS, supports_images=True).route_messages(q, [])[-1]
    assert seen.images() == [Path("x.jpg")]
    blind = PromptBuilder(KBS, supports_images=False).route_messages(q, [])[-1]
    assert blind.images() == [] and '"pics" knowledge base' in blind.text()


def test_route_grammar_lists_kb_names_and_stop_branch():
    """The grammar restricts <ret> to the KB names; the stop branch can be excluded."""
    g = route_grammar(["wiki", 'odd "name"'])
    assert 'kb ::= "wiki" | "odd \\"name\\""' in g
    assert "( stop | go )" in g
    assert "( stop | go )" not in route_grammar(["wiki"], allow_stop=False)


def test_route_prompt_has_no_copyable_placeholder_before_the_first_hop(demo_kbs):
    """The 0.5B router copied "(none yet)" as its sub-question; the first turn asks for the
    first sub-question instead, later turns show the answers found so far."""
    from kbrouter.policies.prompts import Hop, PromptBuilder
    from kbrouter.types import Question

    builder = PromptBuilder(demo_kbs.infos, supports_images=False)
    first = builder.route_messages(Question(text="Q?"), [])[-1].text()
    assert "none yet" not in first.lower() and "Answers found so far" not in first
    assert first.endswith("What is the first sub-question, and which knowledge base answers it?")
    later = builder.route_messages(Question(text="Q?"), [Hop("Which flag?", "Australia")])
    assert "Answers found so far:\nSub-question 1: Which flag?\nAnswer 1: Australia" in (
        later[-1].text()
    )
    # the few-shot turns follow the same format
    assert not any(
        "none yet" in m.text().lower() for m in builder.route_messages(Question(text="Q?"), [])
    )


def test_terse_prompt_has_no_examples_and_its_own_first_line():
    """The terse prompt is the compact KB list with the terse reply format, no few-shot turns;
    its messages are recognised as terse and give back the question as asked (also as TRL's
    role/content dicts); other variants give no question."""
    from kbrouter.policies.prompts import detect_router_prompt, terse_question

    q = Question(text="Who  directed\nJaws?")
    terse = PromptBuilder(KBS, supports_images=False, router_prompt="terse")
    msgs = terse.route_messages(q, [Hop("Who directed Jaws?", "Steven Spielberg", ("wiki",))])
    assert len(msgs) == 2
    system = msgs[0].text()
    assert "- wiki (text): Encyclopedia passages." in system
    assert "<think>" not in system and "searches with the question as asked" in system
    assert detect_router_prompt(msgs) == "terse"
    assert terse_question(msgs) == "Who directed Jaws?"
    assert terse_question([{"role": m.role, "content": m.text()} for m in msgs]) == (
        "Who directed Jaws?"
    )
    for variant in ("compact", "full"):
        other = PromptBuilder(KBS, supports_images=False, router_prompt=variant)
        assert detect_router_prompt(other.route_messages(q, [])) == variant
        assert terse_question(other.route_messages(q, [])) is None
    fix = terse.corrective_messages(msgs, "<think>x</think>", "no tag")[-1].text()
    assert "<ret>None</ret> to stop" in fix and "<think>" not in fix


def test_terse_grammar_has_no_think_block_and_a_short_stop():
    """The terse grammar starts at the KB, then an optional sub-question; its stop is
    ``<ret>None</ret>``, left out without the stop branch."""
    g = route_grammar(["wiki", "stats"], terse=True)
    assert g.splitlines()[0] == "root ::= ( stop | go )"
    assert 'stop ::= "<ret>None</ret>"' in g
    assert 'go ::= "<ret>" kbs "</ret>" ( "\\n<sub-question>" subq "</sub-question>" )?' in g
    assert route_grammar(["wiki"], allow_stop=False, terse=True).splitlines()[0] == "root ::= go"
    builder = PromptBuilder(KBS, supports_images=False, router_prompt="terse")
    assert builder.route_grammar() == route_grammar(["wiki", "stats", "pics"], terse=True)
