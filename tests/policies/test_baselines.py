"""Baselines on the scripted chat model: the exact model calls and retrievals of each method."""

from __future__ import annotations

import pytest

from kbrouter.engine.engine import Engine, EngineConfig
from kbrouter.errors import ConfigError, UnknownKBError
from kbrouter.policies.baselines import (
    AllKBsPolicy,
    CoTPolicy,
    DirectPolicy,
    IRCoTPolicy,
    IterRetGenPolicy,
    SingleKBPolicy,
    first_sentence,
    make_policy,
)
from kbrouter.testing import ScriptedChatModel, StaticKB, StaticKBRegistry
from kbrouter.types import Evidence, Modality, Question, Trajectory


def _ev(kb: str, i: int, text: str, modality: Modality = Modality.TEXT) -> Evidence:
    return Evidence(kb=kb, id=f"{kb}-{i}", score=0.0, text=text, modality=modality)


@pytest.fixture
def kbs() -> tuple[StaticKB, StaticKB, StaticKB]:
    text = StaticKB(
        "text",
        [
            _ev("text", 1, "Paris is the capital of France"),
            _ev("text", 2, "The Seine flows through Paris"),
        ],
    )
    image = StaticKB(
        "image",
        [_ev("image", 1, "Flag of France, a country in Western Europe", Modality.IMAGE)],
        modality=Modality.IMAGE,
    )
    table = StaticKB(
        "table",
        [_ev("table", 1, "France | capital Paris | area 551695", Modality.TABLE)],
        modality=Modality.TABLE,
    )
    return text, image, table


def _run(policy, outputs, kbs, question=None, **cfg) -> tuple[Trajectory, ScriptedChatModel]:
    model = ScriptedChatModel(outputs)
    engine = Engine(model, StaticKBRegistry(list(kbs)), policy, EngineConfig(**cfg))
    q = question or Question(text="Which river flows through the capital of France?", id="q1")
    return engine.answer_sync(q), model


def _queries(kb: StaticKB) -> list[str]:
    return [q.text for q in kb.queries]


def test_direct_makes_one_call_and_no_retrieval(kbs):
    """direct: one final call, nothing retrieved, the <answer> content is the answer."""
    traj, model = _run(DirectPolicy(), ["<answer>the Seine</answer>"], kbs)
    assert traj.answer == "the Seine"
    assert traj.retrievals() == [] and traj.steps == []
    assert [c.purpose for c in traj.model_calls()] == ["final"]
    assert traj.stop_reason == "no_retrieval"
    assert all(_queries(kb) == [] for kb in kbs)
    assert model.calls == 1


def test_cot_parses_answer_after_thinking(kbs):
    """cot: one call; the reasoning in <think> is not part of the answer."""
    traj, _ = _run(CoTPolicy(), ["<think>Paris; the Seine.</think><answer>Seine</answer>"], kbs)
    assert traj.answer == "Seine"
    assert traj.retrievals() == []


def test_single_kb_retrieves_once_from_that_kb_with_the_question(kbs):
    """single-kb:<name>: one retrieval from that KB only, with the original question text."""
    text, image, table = kbs
    traj, model = _run(SingleKBPolicy("Table"), ["<answer>Paris</answer>"], kbs)
    assert _queries(table) == ["Which river flows through the capital of France?"]
    assert _queries(text) == [] and _queries(image) == []
    assert [r.kb for r in traj.retrievals()] == ["table"]
    assert traj.steps[0].action.kbs == ["table"]
    # the evidence reaches the answer prompt
    assert "capital Paris" in model.requests[0][0][-1].text()
    assert traj.answer == "Paris"


def test_single_kb_unknown_name_is_an_error_trajectory(kbs):
    """An unknown KB name fails the question with the known names in the error."""
    traj, model = _run(SingleKBPolicy("nope"), [], kbs)
    assert traj.stop_reason == "error" and "nope" in (traj.error or "")
    assert model.calls == 0


def test_all_kbs_retrieves_once_from_every_kb(kbs):
    """all-kbs: each KB is searched exactly once with the question; evidence concatenated."""
    q = Question(text="Which river flows through the capital of France?", image="flag.jpg")
    traj, model = _run(AllKBsPolicy(), ["<answer>the Seine</answer>"], kbs, question=q)
    for kb in kbs:
        assert _queries(kb) == [q.text]
    image = kbs[1]
    assert image.queries[0].image is not None  # the image KB gets the question's image
    assert kbs[0].queries[0].image is None
    assert [r.kb for r in traj.retrievals()] == ["text", "image", "table"]
    prompt = model.requests[0][0][-1].text()
    assert "[text]" in prompt and "[image]" in prompt and "[table]" in prompt


def test_iterretgen_second_round_queries_with_question_plus_generation(kbs):
    """iterretgen (T=2): round 2 retrieves with question + round-1 generation."""
    text, image, table = kbs
    outputs = [
        "<think>The capital is Paris.</think><answer>Paris</answer>",
        "<answer>Seine</answer>",
    ]
    traj, model = _run(IterRetGenPolicy(iterations=2), outputs, kbs)
    q = "Which river flows through the capital of France?"
    expected = [q, f"{q} The capital is Paris. Paris"]
    for kb in kbs:
        assert _queries(kb) == expected
    assert [c.purpose for c in traj.model_calls()] == ["generate", "final"]
    assert traj.steps[0].sub_answer == "Paris"
    assert traj.answer == "Seine"
    assert len(traj.steps) == 2


def test_iterretgen_three_rounds(kbs):
    """iterretgen with T=3 makes 3 retrieval rounds and 3 generations."""
    outputs = ["<answer>a</answer>", "<answer>b</answer>", "<answer>c</answer>"]
    traj, model = _run(IterRetGenPolicy(iterations=3), outputs, kbs)
    assert len(_queries(kbs[0])) == 3 and model.calls == 3
    assert _queries(kbs[0])[2].endswith(" b")
    assert traj.answer == "c"


def test_ircot_retrieves_with_each_sentence_until_answer_is(kbs):
    """ircot: question, then each CoT sentence, is the query; 'answer is' stops reasoning."""
    outputs = [
        "The capital of France is Paris. Extra sentence ignored.",
        "The Seine flows through Paris, so the answer is: the Seine.",
        "<think>...</think><answer>the Seine</answer>",
    ]
    traj, model = _run(IRCoTPolicy(), outputs, kbs)
    q = "Which river flows through the capital of France?"
    for kb in kbs:
        assert _queries(kb) == [q, "The capital of France is Paris."]
    assert [c.purpose for c in traj.model_calls()] == ["generate", "generate", "final"]
    assert traj.stop_reason == "answered"
    assert traj.steps[-1].action.is_stop
    # the final prompt carries the reasoning and the pooled evidence
    final_prompt = model.requests[-1][0][-1].text()
    assert "so the answer is: the Seine" in final_prompt and "Seine flows" in final_prompt
    assert traj.answer == "the Seine"


def test_ircot_stops_at_the_retrieval_budget(kbs):
    """ircot with a budget of 2 rounds: question + first sentence, then it must answer."""
    outputs = ["First fact.", "Second fact.", "<answer>x</answer>"]
    traj, model = _run(IRCoTPolicy(), outputs, kbs, max_steps=2)
    assert _queries(kbs[0]) == ["Which river flows through the capital of France?", "First fact."]
    assert model.calls == 3
    assert traj.stop_reason == "budget"
    assert any("budget" in n for s in traj.steps for n in s.notes)


def test_failed_model_call_is_recorded_not_raised(kbs):
    """A backend failure on the final call leaves an error trajectory, not an exception."""
    model = ScriptedChatModel([], fail_at=[0])
    engine = Engine(model, StaticKBRegistry(list(kbs)), AllKBsPolicy(), EngineConfig())
    traj = engine.answer_sync("Which river?")
    assert traj.stop_reason == "error" and traj.final_call is not None and traj.final_call.error
    assert traj.answer == ""


def test_first_sentence():
    """The first sentence of a generation, tags and later lines removed."""
    assert first_sentence("<think>A is B. C is D.</think>") == "A is B."
    assert first_sentence("\nSo the answer is: 3.5 km.\nMore") == "So the answer is: 3.5 km."
    assert first_sentence("") == ""


def test_make_policy_registry():
    """Every method name maps to its policy; unknown names and bad settings are ConfigErrors."""
    assert isinstance(make_policy("direct"), DirectPolicy)
    assert isinstance(make_policy("COT"), CoTPolicy)
    assert isinstance(make_policy("all-kbs"), AllKBsPolicy)
    assert make_policy("iterretgen", iterations=3).config.iterations == 3
    assert isinstance(make_policy("ircot"), IRCoTPolicy)
    p = make_policy("single-kb:text")
    assert isinstance(p, SingleKBPolicy) and p.name == "single-kb:text"
    assert type(make_policy("r1-router")).__name__ == "R1RouterPolicy"
    with pytest.raises(ConfigError, match="unknown method"):
        make_policy("magic")
    with pytest.raises(ConfigError, match="iterations"):
        make_policy("iterretgen", iterations=0)
    with pytest.raises(ConfigError):
        make_policy("single-kb:")


def test_unknown_kb_error_type():
    """Resolving an unknown KB raises the named error the trajectory reports."""
    reg = StaticKBRegistry([StaticKB("text")])
    with pytest.raises(UnknownKBError):
        reg.resolve("nope")


def test_answer_prompts_have_no_worked_example_by_default(kbs):
    """The 0.5B model copied the example's reasoning and answer; IRCoT keeps its example (its
    one-sentence steps need the format); few_shot=True brings the example back."""
    traj, _ = _run(make_policy("all-kbs"), ["<answer>the Seine</answer>"], kbs)
    assert [m.role for m in traj.final_call.messages] == ["system", "user"]
    traj, _ = _run(make_policy("direct", few_shot=True), ["<answer>x</answer>"], kbs)
    assert [m.role for m in traj.final_call.messages] == ["system", "user", "assistant", "user"]
    assert make_policy("ircot").config.few_shot is True
