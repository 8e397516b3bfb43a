"""Multi-hop continuation, image identification first and the final answer from a hop that asked
the whole question: the rules on their own, then the R1-Router loop on the scripted model over
the real demo KBs (real image-to-image matching of the demo flags), with its exact calls."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbrouter.engine.engine import Engine, EngineConfig
from kbrouter.policies.continuation import (
    anchored_sub_question,
    asks_whole_question,
    content_words,
    continuation_reason,
    is_copied_text,
    is_entity_answer,
)
from kbrouter.policies.prompts import Hop, answer_grammar
from kbrouter.policies.r1router import R1RouterPolicy
from kbrouter.reading.images import IDENTIFY_QUESTION
from kbrouter.testing import ScriptedChatModel, demo_registry
from kbrouter.types import Question

DEMO = Path(__file__).resolve().parents[2] / "demo"
FLAG_Q = "In which city is the national capital of the country whose flag is shown?"
PEAK_Q = "What is the highest mountain in the country whose flag is shown?"
STOP = "<think>enough</think><sub-question>None</sub-question><ret>None</ret>"


def _route(sub_question: str, kb: str) -> str:
    return f"<think>t</think><sub-question>{sub_question}</sub-question><ret>{kb}</ret>"


# ---------------------------------------------------------------------------- the rules


def test_content_words_drop_stop_words_and_image_references_and_fold_plurals():
    assert content_words(FLAG_Q) == {"city", "national", "capital", "country", "flag"}
    assert content_words("Which countries' flags?") == {"country", "flag"}


def test_an_entity_hop_on_a_question_about_more_asks_to_continue():
    hops = [Hop("What is shown in the image?", "Flag of Australia", ("images",))]
    reason = continuation_reason(FLAG_Q, hops)
    assert reason is not None
    assert "'Flag of Australia'" in reason and "capital, city, country, national" in reason


@pytest.mark.parametrize(
    "question, hop",
    [
        # the sub-question already asked what the question asks: one uncovered word only
        (
            "Which architect designed the main public buildings of Brasília?",
            Hop("Who designed the main public buildings of Brasília?", "Oscar Niemeyer"),
        ),
        # the answer is not an entity
        (FLAG_Q, Hop("What is shown in the image?", "The evidence does not say.")),
        (FLAG_Q, Hop("What is shown in the image?", "unknown")),
        (FLAG_Q, Hop("What is shown in the image?", "")),
        # a whole sentence is not an entity either
        (FLAG_Q, Hop("What is shown?", "It is a blue flag with stars and a union jack on it")),
    ],
)
def test_no_continuation_when_the_question_is_covered_or_the_answer_is_no_entity(question, hop):
    assert continuation_reason(question, [hop]) is None


def test_no_continuation_before_any_hop():
    assert continuation_reason(FLAG_Q, []) is None


def test_entity_answers():
    assert is_entity_answer("Flag of Australia") and is_entity_answer("1844")
    assert not is_entity_answer("not found") and not is_entity_answer("I cannot tell")


def test_a_continuing_sub_question_must_name_the_entity():
    # names nothing of "Flag of Australia" beyond what the question says: anchored
    assert (
        anchored_sub_question(FLAG_Q, "Which city is shown in the image?", "Flag of Australia")
        == f"{FLAG_Q} (Flag of Australia)"
    )
    assert anchored_sub_question(FLAG_Q, "Where is the flag shown?", "Flag of Australia")
    # names the entity: kept
    assert anchored_sub_question(FLAG_Q, "What is the capital of Australia?", "Australia") is None


def test_copied_text_is_several_sentences():
    # what the prompted 0.5B wrote on mkqa-mini and the demo (its think text, copied)
    for copied in [
        "None in the image. I must identify it first, which needs a search with the image?",
        "Grace Hopper's programming language for business data processing grew out of her "
        "work. I still need to identify it first, which needs a search with the image itself?",
        "None in the knowledge base. The image shows a flag of Colombia?",
    ]:
        assert is_copied_text(copied), copied
    for one in [
        "Which country is the Christ the Redeemer statue in?",
        "How many times is the St. Louis Bombers listed?",
        "What is the height of Mt. Kenya in metres?",
        "Which team did the U.S. Army play in 1940?",
        "Which film did Warner Bros. Pictures release in 1999?",
        f"{FLAG_Q} (Flag of Australia)?",
    ]:
        assert not is_copied_text(one), one


def test_asks_whole_question():
    assert asks_whole_question(FLAG_Q, f"  {FLAG_Q.upper()} (Flag of Australia)")
    assert not asks_whole_question(FLAG_Q, "What is the capital of Australia?")
    assert not asks_whole_question("", "anything")
    # the router grammar ends a sub-question with "?": "Q (entity)?" asks the whole question
    assert asks_whole_question(FLAG_Q, FLAG_Q.rstrip("?") + " (Flag of Australia)?")
    # ... but a longer question that merely starts like it does not
    assert not asks_whole_question("Who directed Alien?", "Who directed Alien's sequel?")
    assert not asks_whole_question("Who directed Alien?", "Who directed Alien and when?")


# ---------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def demo_kbs(tmp_path_factory: pytest.TempPathFactory):
    """The demo KBs with their real encoders: the image KB matches flags image to image."""
    reg = demo_registry(tmp_path_factory.mktemp("demo-dense"), lexical_only=False)
    yield reg
    reg.close()


def _answer(kbs, outputs, question: Question, *, grammar: bool = False, **options):
    model = ScriptedChatModel(outputs, supports_grammar=grammar)
    policy = R1RouterPolicy(min_retrieval_steps=1, **options)
    engine = Engine(model, kbs, policy, EngineConfig(max_steps=3, top_k=3))
    return engine.answer_sync(question), model


def test_flag_capital_identifies_continues_anchors_and_answers_from_the_last_hop(demo_kbs):
    question = Question(text=FLAG_Q, image=DEMO / "questions" / "flag.jpg")
    outputs = [
        _route("What is shown in the image?", "images"),  # hop 1: answered by the image match
        STOP,  # the router stops after the entity: asked to go on
        _route("Which city is shown in the image?", "text"),  # names no entity: anchored
        "<answer>Canberra</answer>",  # sub-answer of hop 2
        STOP,  # accepted: one continuation per question
    ]
    traj, model = _answer(demo_kbs, outputs, question)

    assert traj.error is None and traj.answer == "Canberra"
    assert [c.purpose for c in traj.model_calls()] == [
        "route",
        "route",
        "route",
        "sub_answer",
        "route",
    ]  # no sub-answer call for hop 1, no final call
    s0, s1, s2 = traj.steps
    assert s0.retrievals[0].evidence[0].id == "flag_au"
    assert s0.retrievals[0].evidence[0].metadata.get("pinned")
    assert s0.sub_answer == "Flag of Australia" and s0.answer_call is None
    assert any("without a model call" in n for n in s0.notes)
    # the stop was answered with a corrective turn naming the uncovered words (no grammar here)
    assert any(n.startswith("multi-hop continuation: the answer so far") for n in s1.notes)
    assert "capital, city, country, national" in s1.route_calls[1].messages[-1].text()
    anchored = f"{FLAG_Q} (Flag of Australia)"
    assert s1.action is not None and s1.action.sub_question == anchored
    assert s1.continued and not s0.continued and not s2.continued
    assert s1.retrievals[0].kb == "text" and s1.retrievals[0].query.text == anchored
    assert "canberra" in [e.id for e in s1.retrievals[0].evidence]
    assert s2.action is not None and s2.action.is_stop
    assert any("its answer is the final answer" in n for n in s2.notes)
    assert traj.final_call is None


def test_a_copied_sub_question_is_replaced_by_the_anchored_question(demo_kbs):
    """After the image is identified, a continuing sub-question that copied the router's think
    text is replaced by the question anchored on the entity (noted); the search uses it and,
    as it asks the whole question, its answer is the final answer. Off: kept as written."""
    question = Question(text=FLAG_Q, image=DEMO / "questions" / "flag.jpg")
    copied = "Australia is the country. I still need its capital, which is general knowledge?"
    outputs = [
        _route("What is shown in the image?", "images"),
        STOP,
        _route(copied, "text"),
        "<answer>Canberra</answer>",
        STOP,
    ]
    traj, model = _answer(demo_kbs, outputs, question)
    anchored = f"{FLAG_Q} (Flag of Australia)"
    s1 = traj.steps[1]
    assert s1.action is not None and s1.action.sub_question == anchored
    assert s1.retrievals[0].query.text == anchored
    assert any("is several sentences (copied text)" in n for n in s1.notes)
    assert traj.answer == "Canberra" and traj.final_call is None
    assert [c.purpose for c in traj.model_calls()] == ["route"] * 3 + ["sub_answer", "route"]

    kept, _ = _answer(demo_kbs, [*outputs, "<answer>Canberra</answer>"], question,
                      replace_copied_sub_question=False)  # fmt: skip
    assert kept.steps[1].action is not None and kept.steps[1].action.sub_question == copied
    assert kept.final_call is not None  # the hop did not ask the whole question
    # the paper's reading path keeps the router's own text (teacher synthesis, GRPO rollouts)
    from kbrouter.policies.r1router import PAPER_READING

    assert PAPER_READING["replace_copied_sub_question"] is False


def test_a_question_of_several_sentences_may_be_asked_as_it_is(demo_kbs):
    """A question that is itself several sentences: the router asking it whole, or in other
    sentences, is not taken for copied text."""
    two = "The statue of Christ the Redeemer stands on a mountain. In which country is it?"
    for sub in [two, "The statue is famous. Which country is the statue in?"]:
        outputs = [_route(sub, "text"), "<answer>Brazil</answer>", STOP, "<answer>Brazil</answer>"]
        traj, _ = _answer(demo_kbs, outputs, Question(text=two))
        assert traj.steps[0].action is not None and traj.steps[0].action.sub_question == sub
        assert not any("copied text" in n for s in traj.steps for n in s.notes)


def test_a_refusal_to_the_whole_question_goes_to_the_final_answer_call(demo_kbs):
    question = Question(text=FLAG_Q, image=DEMO / "questions" / "flag.jpg")
    outputs = [
        _route("What is shown in the image?", "images"),
        STOP,
        _route(FLAG_Q, "text"),  # asks the whole question (anchored on the entity)
        "<answer>not found</answer>",  # a refusal is not taken as the final answer
        STOP,
        "<answer>Canberra</answer>",
    ]
    traj, _ = _answer(demo_kbs, outputs, question)
    assert traj.steps[1].sub_answer == "not found"
    assert traj.final_call is not None and traj.answer == "Canberra"
    assert not any("its answer is the final answer" in n for s in traj.steps for n in s.notes)


def test_a_router_that_goes_on_by_itself_uses_no_continuation(demo_kbs):
    question = Question(text=FLAG_Q, image=DEMO / "questions" / "flag.jpg")
    outputs = [
        _route("What is shown in the image?", "images"),
        _route("What is the capital of Australia?", "text"),  # goes on without a stop
        "<answer>Canberra</answer>",
        STOP,  # city, national, country still uncovered: the one continuation is left
        _route("Which city is it?", "text"),  # anchored on the last answer
        "<answer>Canberra</answer>",  # answers the whole question: no final call
    ]
    traj, _ = _answer(demo_kbs, outputs, question)
    s0, s1, s2 = traj.steps
    assert not s1.continued and len(s1.route_calls) == 1
    assert s1.action.sub_question == "What is the capital of Australia?"  # names the entity
    assert s2.continued and len(s2.route_calls) == 2
    assert s2.action.sub_question == f"{FLAG_Q} (Canberra)"
    assert traj.answer == "Canberra" and traj.final_call is None


def test_a_comparison_hop_is_not_anchored_on_the_first_answer():
    from kbrouter.testing import StaticKB, StaticKBRegistry
    from kbrouter.types import Evidence

    passages = [
        Evidence(kb="text", id="a", score=1.0, text="Alice Smith was born in 1950."),
        Evidence(kb="text", id="b", score=1.0, text="Bob Jones was born in 1948."),
    ]
    kbs = StaticKBRegistry([StaticKB("text", passages)])
    question = Question(text="Who was born first, Alice Smith or Bob Jones?")
    outputs = [
        _route("When was Alice Smith born?", "text"),
        "<answer>1950</answer>",
        _route("When was Bob Jones born?", "text"),  # the router goes on by itself: kept
        "<answer>1948</answer>",
        STOP,  # only "first" is uncovered now: the stop stands
        "<answer>Bob Jones</answer>",
    ]
    traj, _ = _answer(kbs, outputs, question)
    assert traj.steps[1].action.sub_question == "When was Bob Jones born?"
    assert not any(n.startswith("after an entity hop") for s in traj.steps for n in s.notes)
    assert traj.answer == "Bob Jones"


def test_continuation_with_a_grammar_re_asks_the_same_prompt_without_the_stop_branch(demo_kbs):
    question = Question(text=FLAG_Q, image=DEMO / "questions" / "flag.jpg")
    outputs = [
        _route("What is shown in the image?", "images"),
        STOP,
        _route("What is the capital of Australia?", "text"),  # names the entity: kept
        "<answer>Canberra</answer>",
        STOP,
        "<answer>Canberra</answer>",  # final: the last sub-question was not the whole question
    ]
    traj, model = _answer(demo_kbs, outputs, question, grammar=True)
    assert traj.answer == "Canberra"
    first, again = traj.steps[1].route_calls
    assert again.messages == first.messages  # no corrective turn
    # route grammars: step 0 (no stop before a retrieval), step 1, its re-ask, step 2
    sent = [p.grammar for _, p in model.requests if p.grammar]
    grammars = [g for g in sent if "<sub-question>" in g]
    assert len(grammars) == 4
    answers = [g for g in sent if "<sub-question>" not in g]
    assert answers == [answer_grammar()] * 2  # the sub-answer and the final answer
    assert "( stop | go )" in grammars[1] and "( stop | go )" not in grammars[2]
    assert '( [^<\\n\\t\\r?N ] | "N" [^o<\\n?]' in grammars[2]  # cannot write "None"
    assert traj.steps[1].action.sub_question == "What is the capital of Australia?"
    assert [c.purpose for c in traj.model_calls()][-1] == "final"


def test_identify_first_answers_the_image_hop_and_goes_on_from_the_entity(demo_kbs):
    question = Question(text=PEAK_Q, image=DEMO / "questions" / "flag_kenya.jpg")
    outputs = [
        _route(PEAK_Q, "images"),  # the router asks the whole question of the image KB
        _route("What is the highest mountain in Kenya?", "tables"),
        "<answer>Mount Kenya</answer>",
        STOP,
        "<answer>Mount Kenya</answer>",
    ]
    traj, _ = _answer(demo_kbs, outputs, question, table_reader="rows")
    s0 = traj.steps[0]
    assert s0.sub_answer == "Flag of Kenya" and s0.answer_call is None
    assert any(f"this step answers {IDENTIFY_QUESTION!r}" in n for n in s0.notes)
    # the router sees the identification, not the whole question, as hop 1
    hop2_prompt = traj.steps[1].route_calls[0].messages[-1].text()
    assert f"Sub-question 1: {IDENTIFY_QUESTION}\nAnswer 1: Flag of Kenya" in hop2_prompt
    assert traj.answer == "Mount Kenya"


def test_after_identification_the_route_prompt_says_what_the_image_shows(demo_kbs):
    """Hop 1's route prompt asks to identify the image; once the image KB has matched it, the
    next route prompt names the entity instead with identified_note (off by default), but not
    in the compact prompt trained routers were fine-tuned on."""
    question = Question(text=PEAK_Q, image=DEMO / "questions" / "flag_kenya.jpg")
    outputs = [
        _route("What is shown in the image?", "images"),
        _route("What is the highest mountain in Kenya?", "tables"),
        "<answer>Mount Kenya</answer>",
        STOP,
    ]
    ask_note = 'Ask about what the image shows with the "images" knowledge base'
    told = "An image search has identified it: it shows Flag of Kenya."
    traj, _ = _answer(demo_kbs, outputs, question, table_reader="rows", identified_note=True)
    hop1 = traj.steps[0].route_calls[0].messages[-1].text()
    hop2 = traj.steps[1].route_calls[0].messages[-1].text()
    assert ask_note in hop1 and told not in hop1
    assert told in hop2 and ask_note not in hop2
    assert "Do not ask again what the image shows; ask about Flag of Kenya." in hop2
    assert traj.answer == "Mount Kenya"

    for options in ({}, {"identified_note": True, "router_prompt": "compact"}):
        traj, _ = _answer(demo_kbs, outputs, question, table_reader="rows", **options)
        hop2 = traj.steps[1].route_calls[0].messages[-1].text()
        assert ask_note in hop2 and told not in hop2, options


def test_carry_identified_shows_the_matched_item_with_a_later_steps_evidence(demo_kbs):
    """With carry_identified, a step after the identification that searches another KB shows
    the identified flag (title and caption, last, marked as the image match) to the sub-answer
    call; a step that searches the image KB again does not get it twice (possible with
    skip_identified_image off); on by default, off on request."""
    question = Question(text=FLAG_Q, image=DEMO / "questions" / "flag.jpg")
    outputs = [
        _route("What is shown in the image?", "images"),
        _route("What is the capital of Australia?", "text"),
        "<answer>Canberra</answer>",
        _route("Which city is the capital of Australia?", "images"),
        "<answer>Canberra</answer>",
        STOP,
        "<answer>Canberra</answer>",
    ]
    carried = "(this picture matches the question's image) Flag of Australia: Flag of Australia."
    traj, _ = _answer(demo_kbs, outputs, question, table_reader="rows", skip_identified_image=False)
    s1, s2 = traj.steps[1], traj.steps[2]
    assert [r.kb for r in s1.retrievals] == ["text"]
    prompt1 = s1.answer_call.messages[-1].text()
    shown = [line for line in prompt1.splitlines() if line.startswith("(")]
    assert carried in shown[-1] and all("Flag of Australia" not in x for x in shown[:-1])
    assert any("carry_identified" in n for n in s1.notes)
    # the image KB searched again: its own match is shown once, nothing carried
    assert [r.kb for r in s2.retrievals] == ["images"]
    assert s2.answer_call.messages[-1].text().count("Flag of Australia:") == 1
    assert not any("carry_identified" in n for n in s2.notes)

    traj, _ = _answer(
        demo_kbs,
        outputs,
        question,
        table_reader="rows",
        skip_identified_image=False,
        carry_identified=False,
    )
    assert "Flag of Australia" not in traj.steps[1].answer_call.messages[-1].text()


def test_identify_first_keeps_a_step_that_searched_other_kbs_too(demo_kbs):
    question = Question(text=PEAK_Q, image=DEMO / "questions" / "flag_kenya.jpg")
    outputs = [
        _route(PEAK_Q, "images, tables"),  # the tables' evidence is read, not dropped
        "<answer>Mount Kenya</answer>",
        STOP,
        "<answer>Mount Kenya</answer>",
    ]
    traj, _ = _answer(demo_kbs, outputs, question, table_reader="rows")
    s0 = traj.steps[0]
    assert [r.kb for r in s0.retrievals] == ["images", "tables"]
    assert s0.answer_call is not None and s0.sub_answer == "Mount Kenya"
    assert not any("identified" in n for n in s0.notes)
    shown = s0.answer_call.messages[-1].text()
    assert "Flag of Kenya" in shown and "Mount Kenya" in shown
    assert traj.answer == "Mount Kenya"


def test_the_paper_reading_path_stops_where_the_router_says(demo_kbs):
    from kbrouter.policies.r1router import PAPER_READING

    question = Question(text=FLAG_Q, image=DEMO / "questions" / "flag.jpg")
    outputs = [
        _route("What is shown in the image?", "images"),
        "<answer>Flag of Australia</answer>",
        STOP,
        "<answer>Flag of Australia</answer>",
    ]
    traj, _ = _answer(demo_kbs, outputs, question, **PAPER_READING)
    assert [c.purpose for c in traj.model_calls()] == ["route", "sub_answer", "route", "final"]
    assert traj.answer == "Flag of Australia"


# ------------------------------------------------- after identification: no image KB again


def _kb_alternatives(grammar: str) -> str:
    return next(line for line in grammar.splitlines() if line.startswith("kb ::="))


def test_once_the_image_is_identified_the_route_grammar_leaves_the_image_kb_out(demo_kbs):
    question = Question(text=FLAG_Q, image=DEMO / "questions" / "flag.jpg")
    outputs = [
        _route("What is shown in the image?", "images"),
        _route("What is the capital of Australia?", "text"),
        "<answer>Canberra</answer>",
        STOP,
        "<answer>Canberra</answer>",
    ]
    traj, model = _answer(
        demo_kbs,
        outputs,
        question,
        grammar=True,
        continue_after_entity=False,
        skip_identified_image=True,
    )
    assert traj.answer == "Canberra"
    routes = [p.grammar for _, p in model.requests if p.grammar and "<sub-question>" in p.grammar]
    assert len(routes) == 3
    assert '"images"' in _kb_alternatives(routes[0])
    for later in routes[1:]:
        assert _kb_alternatives(later) == 'kb ::= "text" | "tables"'
    s0, s1, s2 = traj.steps
    assert not any("left out" in n for n in s0.notes)
    for step in (s1, s2):
        assert any(
            n.startswith("the question's image is identified: images left out at this step")
            for n in step.notes
        )


def test_without_a_grammar_an_image_kb_named_after_identification_is_re_asked(demo_kbs):
    question = Question(text=PEAK_Q, image=DEMO / "questions" / "flag_kenya.jpg")
    outputs = [
        _route("What is shown in the image?", "images"),
        _route("What is the highest mountain in Kenya?", "images"),  # rejected
        _route("What is the highest mountain in Kenya?", "tables"),
        "<answer>Mount Kenya</answer>",
        STOP,
        "<answer>Mount Kenya</answer>",
    ]
    traj, _ = _answer(demo_kbs, outputs, question, table_reader="rows", skip_identified_image=True)
    s1 = traj.steps[1]
    assert len(s1.route_calls) == 2
    assert "search the text or tables knowledge base at this step" in (
        s1.route_calls[1].messages[-1].text()
    )
    assert [r.kb for r in s1.retrievals] == ["tables"]
    assert traj.answer == "Mount Kenya"


def test_without_skip_identified_image_the_router_may_search_the_image_kb_again(demo_kbs):
    question = Question(text=PEAK_Q, image=DEMO / "questions" / "flag_kenya.jpg")
    outputs = [
        _route("What is shown in the image?", "images"),
        _route("What is the highest mountain in Kenya?", "images"),  # kept
        "<answer>Kilimanjaro</answer>",
        STOP,
        "<answer>Kilimanjaro</answer>",
    ]
    traj, _ = _answer(demo_kbs, outputs, question, skip_identified_image=False)
    s1 = traj.steps[1]
    assert len(s1.route_calls) == 1 and [r.kb for r in s1.retrievals] == ["images"]
    # the same image returns the same match
    assert s1.retrievals[0].evidence[0].id == traj.steps[0].retrievals[0].evidence[0].id
    assert not any("left out" in n for s in traj.steps for n in s.notes)


def test_an_image_kb_is_not_left_out_when_it_is_the_only_kb(demo_kbs):
    from kbrouter.testing import StaticKBRegistry

    images = StaticKBRegistry([demo_kbs.get("images")])
    question = Question(text=PEAK_Q, image=DEMO / "questions" / "flag_kenya.jpg")
    outputs = [
        _route("What is shown in the image?", "images"),
        _route("What is the highest mountain in Kenya?", "images"),
        "<answer>Mount Kenya</answer>",
        STOP,
        "<answer>Mount Kenya</answer>",
    ]
    traj, _ = _answer(images, outputs, question, skip_identified_image=True)
    assert [r.kb for r in traj.steps[1].retrievals] == ["images"]
    assert not any("left out" in n for s in traj.steps for n in s.notes)


def test_random_kb_draws_no_image_kb_once_the_image_is_identified(demo_kbs):
    from kbrouter.policies.bounds import RandomKBPolicy
    from kbrouter.types import Step

    question = Question(text=PEAK_Q, image=DEMO / "questions" / "flag_kenya.jpg", id="peak")
    names = [kb.name for kb in demo_kbs.infos]
    # a seed whose first draw is the image KB, so that the image is identified at hop 1
    seed = next(
        s
        for s in range(100)
        if RandomKBPolicy(seed=s)._draw(question, Step(index=0), names) == "images"
    )
    outputs = [
        _route("What is shown in the image?", "text"),  # the draw replaces the KB
        _route("What is the highest mountain in Kenya?", "text"),
        "<answer>Mount Kenya</answer>",
        STOP,
        "<answer>Mount Kenya</answer>",
    ]
    model = ScriptedChatModel(outputs)
    policy = RandomKBPolicy(
        seed=seed, min_retrieval_steps=1, table_reader="rows", skip_identified_image=True
    )
    engine = Engine(model, demo_kbs, policy, EngineConfig(max_steps=3, top_k=3))
    traj = engine.answer_sync(question)
    s0, s1 = traj.steps[:2]
    assert s0.sub_answer == "Flag of Kenya"
    assert [r.kb for r in s1.retrievals] != ["images"]
    assert any("images left out" in n for n in s1.notes)
