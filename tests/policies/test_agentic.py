"""Search-o1, OmniSearch and CogPlanner on the scripted model: each method's exact sequence of
model calls and retrievals, its action-to-KB mapping, and the malformed-output path."""

from __future__ import annotations

import pytest

from kbrouter.engine.engine import Engine, EngineConfig
from kbrouter.errors import ConfigError
from kbrouter.policies.baselines import METHOD_NAMES, make_policy
from kbrouter.policies.omnisearch import parse_turn, planner_grammar
from kbrouter.policies.search_o1 import BEGIN_QUERY, END_QUERY, END_RESULT, reasoning_grammar
from kbrouter.testing import ScriptedChatModel, StaticKB, StaticKBRegistry
from kbrouter.types import Evidence, Modality, Question

Q = "Who is the spouse of the director of Jump for Glory?"


def _ev(kb: str, i: int, text: str, modality: Modality = Modality.TEXT, **kw) -> Evidence:
    return Evidence(kb=kb, id=f"{kb}-{i}", score=1.0, text=text, modality=modality, **kw)


@pytest.fixture
def kbs() -> list[StaticKB]:
    return [
        StaticKB("text", [_ev("text", 1, "Jump for Glory is a 1937 film directed by Raoul Walsh."),
                          _ev("text", 2, "Raoul Walsh was married to Miriam Cooper."),
                          _ev("text", 3, "Canberra is the capital of Australia.")]),
        StaticKB("table", [_ev("table", 1, "film | director\nJump for Glory | Raoul Walsh",
                               Modality.TABLE)], modality=Modality.TABLE),
        StaticKB("image", [_ev("image", 1, "Flag of Australia.", Modality.IMAGE,
                               title="Flag of Australia")], modality=Modality.IMAGE),
    ]  # fmt: skip


def _run(method: str, outputs: list[str], kbs, question: Question | str = Q, **options):
    model = ScriptedChatModel(outputs)
    policy = make_policy(method, table_reader="rows", **options)
    engine = Engine(model, StaticKBRegistry(kbs), policy, EngineConfig(max_steps=3, top_k=2))
    q = question if isinstance(question, Question) else Question(text=question)
    return engine.answer_sync(q), model


def _queries(kbs) -> dict[str, list[tuple[str, bool]]]:
    return {
        kb.name: [(q.text, q.image is not None) for q in kb.queries] for kb in kbs if kb.queries
    }


def test_the_three_methods_are_registered():
    for name in ("search-o1", "omnisearch", "cogplanner"):
        assert name in METHOD_NAMES
        assert make_policy(name).name == name
    with pytest.raises(ConfigError, match="invalid settings"):
        make_policy("cogplanner", paradigm="diagonal")


# ---------------------------------------------------------------------------- Search-o1


def test_search_o1_searches_refines_inserts_and_answers(kbs):
    outputs = [
        f"I need the director. {BEGIN_QUERY}director of Jump for Glory",  # stops at the end tag
        "**Final Information** Jump for Glory was directed by Raoul Walsh.",  # Reason-in-Docs
        f"Now the spouse. {BEGIN_QUERY}Raoul Walsh spouse",
        "Final Information:\nRaoul Walsh was married to Miriam Cooper.",  # no bold: accepted
        "So the answer is clear. <answer>Miriam Cooper</answer>",
    ]
    traj, model = _run("search-o1", outputs, kbs)
    assert traj.answer == "Miriam Cooper" and traj.stop_reason == "answered"
    assert [c.purpose for c in traj.model_calls()] == ["route", "read", "route", "read", "route"]
    # every search goes to every KB (the image KB with the question's image: none here)
    assert _queries(kbs) == {
        kb: [("director of Jump for Glory", False), ("Raoul Walsh spouse", False)]
        for kb in ("text", "table", "image")
    }
    assert [s.sub_answer for s in traj.steps] == [
        "Jump for Glory was directed by Raoul Walsh.",
        "Raoul Walsh was married to Miriam Cooper.",
    ]
    # the reasoning so far, with the refined result inserted between the result tags
    third = model.requests[2][0][-1].text()
    assert f"{BEGIN_QUERY}director of Jump for Glory{END_QUERY}" in third
    assert f"Jump for Glory was directed by Raoul Walsh.{END_RESULT}" in third
    refine = model.requests[1][0][-1].text()
    assert "**Current Search Query:**\ndirector of Jump for Glory" in refine
    assert "Raoul Walsh" in refine  # the searched documents
    assert model.requests[0][1].stop == [END_QUERY]


def test_search_o1_repeated_query_limit_and_malformed_reply(kbs):
    outputs = [
        f"{BEGIN_QUERY}Jump for Glory",
        "no marker here",  # Reason-in-Documents without Final Information
        f"{BEGIN_QUERY}jump for glory",  # repeated (case-insensitive): not searched again
        "I am not sure what to do",  # neither query nor answer: asked again once
        "still nothing",  # again: fallback to an answer call
        "<answer>Raoul Walsh</answer>",
    ]
    traj, _ = _run("search-o1", outputs, kbs)
    assert traj.answer == "Raoul Walsh" and traj.stop_reason == "format_fallback"
    assert _queries(kbs)["text"] == [("Jump for Glory", False)]
    notes = [n for s in traj.steps for n in s.notes]
    assert any("no Final Information" in n for n in notes)
    assert any("repeated query" in n for n in notes)
    assert any("asking again" in n for n in notes)
    assert any("no usable reply" in n for n in notes)
    assert traj.steps[0].sub_answer == "No helpful information found."
    assert traj.final_call is not None and traj.final_call.purpose == "final"


def test_search_o1_search_limit(kbs):
    outputs = [f"{BEGIN_QUERY}q{i}" for i in range(2)]
    outputs = [x for o in outputs for x in (o, "**Final Information** nothing new")]
    outputs += [f"{BEGIN_QUERY}one more", "<answer>Miriam Cooper</answer>"]
    traj, _ = _run("search-o1", outputs, kbs, max_searches=2)
    assert traj.stop_reason == "budget" and traj.answer == "Miriam Cooper"
    assert len(_queries(kbs)["text"]) == 2
    assert "You are not allowed to search" in traj.final_call.messages[-1].text()


def test_search_o1_grammar_offers_search_only_within_the_limit():
    assert BEGIN_QUERY in reasoning_grammar(True)
    assert BEGIN_QUERY not in reasoning_grammar(False)


# ---------------------------------------------------------------------------- OmniSearch


def test_omnisearch_plans_maps_actions_to_kbs_and_answers(kbs, tmp_path):
    img = tmp_path / "q.jpg"
    img.write_bytes(b"static KBs do not read it")
    question = Question(text="What is the capital of the country whose flag is shown?", image=img)
    outputs = [
        "<Thought>\nI must identify the flag.\n<Sub-Question>\nWhich flag is this?\n<Search>\n"
        "Image Retrieval with Input Image",
        "<Thought>\nIt is Australia's flag.\n<Sub-Question>\nWhat is the capital of Australia?"
        "\n<Search>\nText Retrieval: capital of Australia",
        "<answer>Canberra</answer>",  # the solver on the text documents
        "<Thought>\nThe capital is Canberra.\n<End>\nFinal Answer: Canberra",
    ]
    traj, model = _run("omnisearch", outputs, kbs, question)
    assert traj.answer == "Canberra" and traj.stop_reason == "answered"
    assert [c.purpose for c in traj.model_calls()] == ["route", "route", "sub_answer", "route"]
    # input image -> the image KB with the image; text retrieval -> text and table KBs
    assert _queries(kbs) == {
        "image": [("Which flag is this?", True)],
        "text": [("capital of Australia", False)],
        "table": [("capital of Australia", False)],
    }
    s0, s1 = traj.steps
    assert s0.action.kbs == ["image"] and s1.action.kbs == ["text", "table"]
    assert "Description: Flag of Australia" in s0.sub_answer
    # the plan is revised in one conversation: the feedback is the next user turn
    last = model.requests[3][0]
    assert last[-1].text() == "Contents of retrieved documents: Canberra"
    assert "Retrieved images: Description: Flag of Australia" in last[-3].text()
    assert "Image Retrieval with Input Image" in model.requests[0][0][0].text()


def test_omnisearch_malformed_turns_fall_back_and_no_input_image_without_an_image(kbs):
    outputs = [
        "I think it is Raoul Walsh's wife.",  # no action, no final answer: asked again
        "<Thought>\nhmm\n<Search>\nImage Retrieval with Input Image",  # no image: unusable
        "<think>all I have</think><answer>Miriam Cooper</answer>",
    ]
    traj, model = _run("omnisearch", outputs, kbs)
    assert traj.stop_reason == "format_fallback" and traj.answer == "Miriam Cooper"
    assert not _queries(kbs)
    assert "Image Retrieval with Input Image" not in model.requests[0][0][0].text()
    assert "could not be used" in model.requests[1][0][-1].text()


def test_omnisearch_parse_and_grammar():
    assert parse_turn("<Thought>\nx\n<End>\nFinal Answer: Paris") == ("final", None, "", "Paris")
    kind, sub, query, _ = parse_turn(
        '<Thought>\nx\n<Sub-Question>\nWho?\n<Search>\nImage Retrieval with Text Query: "a flag"'
    )
    assert (kind, sub, query) == ("Image Retrieval with Text Query", "Who?", "a flag")
    # copied format text: a label is stripped, a placeholder counts as missing
    kind, sub, query, _ = parse_turn(
        "<Thought>\nx\n<Sub-Question>\nOne sub-question: Who directed it?\n<Search>\n"
        "Text Retrieval: Jump for Glory director"
    )
    assert (kind, sub, query) == ("Text Retrieval", "Who directed it?", "Jump for Glory director")
    kind, sub, _, _ = parse_turn(
        "<Thought>\nx\n<Sub-Question>\nOne sub-question:\n<Search>\nText Retrieval: a"
    )
    assert kind == "Text Retrieval" and sub is None
    placeholder = "<Thought>\nx\n<End>\nFinal Answer: a short answer (a name, a number)"
    assert parse_turn(placeholder)[0] == ""  # unusable: asked again
    for real in ("...Baby One More Time", "Your Query (film)", "Subquestions of Zeno"):
        assert parse_turn(f"<Thought>\nx\n<End>\nFinal Answer: {real}")[3] == real
    assert parse_turn("<Sub-Question>\nWho?\n<Search>\nText Retrieval: <query>")[2] == ""
    assert "Input Image" in planner_grammar(True) and "Input Image" not in planner_grammar(False)
    assert "<Search>" not in planner_grammar(True, allow_search=False)


# ---------------------------------------------------------------------------- CogPlanner


def test_cogplanner_sequential_reformulates_then_retrieves_then_stops(kbs):
    outputs = [
        "<reformulate>no</reformulate>",
        "<retrieval>text</retrieval>",
        "<reformulate>yes</reformulate>\n<query>Raoul Walsh spouse</query>",
        "<retrieval>text</retrieval>",
        "<reformulate>no</reformulate>",
        "<retrieval>none</retrieval>",
        "<think>evidence 3</think><answer>Miriam Cooper</answer>",
    ]
    traj, model = _run("cogplanner", outputs, kbs)
    assert traj.answer == "Miriam Cooper" and traj.stop_reason == "answered"
    assert [c.purpose for c in traj.model_calls()] == ["route"] * 6 + ["final"]
    assert _queries(kbs) == {
        "text": [(Q, False), ("Raoul Walsh spouse", False)],
        "table": [(Q, False), ("Raoul Walsh spouse", False)],
    }
    # the retrieval decision sees the reformulated query
    assert "Current query: Raoul Walsh spouse" in model.requests[3][0][-1].text()
    assert "Miriam Cooper" in traj.final_call.messages[-1].text()  # all evidence is read


def test_cogplanner_spent_budget_answers_without_another_planning_call(kbs):
    outputs = ["<reformulate>no</reformulate>", "<retrieval>text</retrieval>"] * 3
    traj, _ = _run("cogplanner", [*outputs, "<answer>Miriam Cooper</answer>"], kbs)
    assert traj.stop_reason == "budget" and traj.answer == "Miriam Cooper"
    # 3 planning rounds for the budget of 3 retrieving steps, then straight to the answer
    assert [c.purpose for c in traj.model_calls()] == ["route"] * 6 + ["final"]
    assert len(_queries(kbs)["text"]) == 3
    assert any("step budget of 3 spent" in n for n in traj.steps[-1].notes)


def test_cogplanner_parallel_image_and_malformed(kbs, tmp_path):
    img = tmp_path / "q.jpg"
    img.write_bytes(b"x")
    question = Question(text="Which flag is this?", image=img)
    outputs = [
        "<reformulate>no</reformulate>\n<retrieval>image</retrieval>",
        "<retrieval>maybe</retrieval>",  # malformed: asked again
        "nothing useful",  # still malformed: stop and answer
        "<answer>Australia</answer>",
    ]
    traj, model = _run("cogplanner", outputs, kbs, question, paradigm="parallel")
    assert _queries(kbs) == {"image": [("Which flag is this?", True)]}
    assert traj.stop_reason == "format_fallback" and traj.answer == "Australia"
    assert [c.purpose for c in traj.model_calls()] == ["route", "route", "route", "final"]
    assert any("malformed planning reply" in n for s in traj.steps for n in s.notes)


def test_search_o1_takes_the_last_final_information_marker_at_a_line_start(kbs):
    outputs = [
        f"{BEGIN_QUERY}Jump for Glory",
        "I will give the final information from the documents.\n"
        "**Final Information:** Raoul Walsh directed it.",
        "<answer>Raoul Walsh</answer>",
    ]
    traj, _ = _run("search-o1", outputs, kbs)
    assert traj.steps[0].sub_answer == "Raoul Walsh directed it."


def test_search_o1_a_query_repeated_forever_ends_in_an_answer(kbs):
    query = f"{BEGIN_QUERY}Jump for Glory"
    outputs = [query, "**Final Information** a film.", query, query, "<answer>Raoul Walsh</answer>"]
    traj, _ = _run("search-o1", outputs, kbs)
    assert traj.stop_reason == "format_fallback" and traj.answer == "Raoul Walsh"
    assert len(_queries(kbs)["text"]) == 1
