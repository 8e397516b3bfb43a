"""learned-router, hybrid, random-kb, oracle-kb and oracle-evidence on the scripted model: their
exact model calls and retrievals. The learned router is a real one, fitted on mkqa-mini dev
(tests/conftest.py)."""

from __future__ import annotations

import pytest

from kbrouter.engine.engine import Engine, EngineConfig
from kbrouter.errors import ConfigError
from kbrouter.policies.baselines import make_policy
from kbrouter.policies.bounds import OracleEvidencePolicy, OracleKBPolicy, RandomKBPolicy
from kbrouter.policies.learned import HybridPolicy, LearnedRouterPolicy
from kbrouter.testing import ScriptedChatModel, StaticKB, StaticKBRegistry
from kbrouter.types import Evidence, Modality, Question, RouteState

FLAG_Q = "In which city is the national capital of the country whose flag is shown?"
TEXT_Q = "Who is the spouse of the director of Jump for Glory?"


def _ev(kb: str, i: int, text: str, modality: Modality = Modality.TEXT) -> Evidence:
    return Evidence(kb=kb, id=f"{kb}-{i}", score=0.0, text=text, modality=modality)


@pytest.fixture
def kbs() -> list[StaticKB]:
    return [
        StaticKB("text", [_ev("text", 1, "Jump for Glory is a 1937 film by Raoul Walsh.")]),
        StaticKB(
            "image",
            [_ev("image", 1, "Flag of Australia.", Modality.IMAGE)],
            modality=Modality.IMAGE,
        ),
        StaticKB(
            "table",
            [_ev("table", 1, "Australia | capital Canberra", Modality.TABLE)],
            modality=Modality.TABLE,
        ),
    ]


def _run(policy, outputs, kbs, question, **cfg):
    model = ScriptedChatModel(outputs)
    engine = Engine(model, StaticKBRegistry(kbs), policy, EngineConfig(**cfg))
    return engine.answer_sync(question), model


def _calls(kbs):
    return {kb.name: [q.text for q in kb.queries] for kb in kbs if kb.queries}


def _flag(tmp_path) -> Question:
    img = tmp_path / "flag.jpg"
    img.write_bytes(b"not read by static KBs")
    return Question(text=FLAG_Q, image=img, id="flag-1")


def test_router_routes_the_flag_capital_question_image_then_table_then_stops(mkqa_router):
    steps = [
        RouteState(question=FLAG_Q, has_image=True, step=0),
        RouteState(question=FLAG_Q, has_image=True, step=1, prev_kbs=["image"]),
        RouteState(question=FLAG_Q, has_image=True, step=2, prev_kbs=["image", "table"]),
    ]
    assert [d.label for d in mkqa_router.predict(steps)] == ["image", "table", "none"]


def test_learned_router_exact_calls(tmp_path, kbs, mkqa_router):
    policy = LearnedRouterPolicy(router=mkqa_router)
    outputs = [
        "<answer>Australia</answer>",  # sub-answer of hop 1 (the question itself, image KB)
        "<think>capital</think><sub-question>What is the capital of Australia?</sub-question>"
        "<ret>table</ret>",  # the LLM writes hop 2's sub-question
        "<answer>Canberra</answer>",  # sub-answer of hop 2
        "<answer>Canberra</answer>",  # final
    ]
    traj, model = _run(policy, outputs, kbs, _flag(tmp_path))
    assert traj.answer == "Canberra" and traj.error is None
    assert _calls(kbs) == {"image": [FLAG_Q], "table": ["What is the capital of Australia?"]}
    purposes = [c.purpose for c in traj.model_calls()]
    assert purposes == ["sub_answer", "route", "sub_answer", "final"]
    assert len(model.requests) == 4
    notes = [n for s in traj.steps for n in s.notes]
    assert notes[0].startswith("route by learned router: image")
    assert notes[-1].startswith("route by learned router: stop")
    assert traj.stop_reason == "answered"


def test_learned_router_grammar_pins_the_chosen_kb(tmp_path, kbs, mkqa_router):
    policy = LearnedRouterPolicy(router=mkqa_router)
    outputs = [
        "<answer>Australia</answer>",
        "<think>t</think><sub-question>What is the capital of Australia?</sub-question>"
        "<ret>table</ret>",
        "<answer>Canberra</answer>",
        "<answer>Canberra</answer>",
    ]
    model = ScriptedChatModel(outputs, supports_grammar=True)
    engine = Engine(model, StaticKBRegistry(kbs), policy, EngineConfig())
    engine.answer_sync(_flag(tmp_path))
    grammar = model.requests[1][1].grammar
    assert grammar is not None and 'kb ::= "table"' in grammar and "nl go" in grammar


def test_learned_router_takes_its_best_other_kb_once_the_image_is_identified(
    tmp_path, mkqa_router, monkeypatch
):
    from kbrouter.types import RouteDistribution

    pinned = Evidence(
        kb="image",
        id="image-1",
        score=0.95,
        text="Flag of Australia.",
        title="Flag of Australia",
        modality=Modality.IMAGE,
        metadata={"pinned": True},
    )
    kbs = [
        StaticKB("text", [_ev("text", 1, "Canberra is the capital of Australia.")]),
        StaticKB("image", [pinned], modality=Modality.IMAGE),
        StaticKB(
            "table",
            [_ev("table", 1, "Australia | capital Canberra", Modality.TABLE)],
            modality=Modality.TABLE,
        ),
    ]
    policy = LearnedRouterPolicy(
        router=mkqa_router, skip_identified_image=True, table_reader="rows"
    )
    # a router that keeps preferring the image KB
    dist = RouteDistribution(
        probs={"image": 0.6, "table": 0.3, "text": 0.1, "none": 0.0},
        label="image",
        confidence=0.6,
    )
    monkeypatch.setattr(policy.router, "route", lambda state: dist)
    outputs = [
        # hop 1 is answered by the image match (no model call); hop 2's sub-question:
        "<think>t</think><sub-question>What is the capital of Australia?</sub-question>"
        "<ret>table</ret>",
        "<answer>Canberra</answer>",  # sub-answer of hop 2
        "<answer>Canberra</answer>",  # final (the budget of 2 steps is spent)
    ]
    traj, _ = _run(policy, outputs, kbs, _flag(tmp_path), max_steps=2)
    assert traj.steps[0].sub_answer == "Flag of Australia"
    assert [r.kb for r in traj.steps[1].retrievals] == ["table"]
    assert any("image left out at this step; using table" in n for n in traj.steps[1].notes)
    assert _calls(kbs) == {"image": [FLAG_Q], "table": ["What is the capital of Australia?"]}
    assert traj.answer == "Canberra"


def test_hybrid_overrides_a_wrong_llm_kb_and_vetoes_an_early_stop(tmp_path, kbs, mkqa_router):
    policy = HybridPolicy(router=mkqa_router)
    outputs = [
        # step 0: the LLM sends the flag question to the text KB; the router is sure: image
        "<think>t</think><sub-question>Which country's flag is shown?</sub-question>"
        "<ret>text</ret>",
        "<answer>Australia</answer>",
        "<think>t</think><sub-question>What is the capital of Australia?</sub-question>"
        "<ret>table</ret>",
        "<answer>Canberra</answer>",
        "<think>done</think><sub-question>None</sub-question><ret>None</ret>",
        "<answer>Canberra</answer>",
    ]
    traj, _ = _run(policy, outputs, kbs, _flag(tmp_path))
    assert _calls(kbs) == {
        "image": ["Which country's flag is shown?"],
        "table": ["What is the capital of Australia?"],
    }
    notes = [n for s in traj.steps for n in s.notes]
    assert any(n.startswith("learned router overrode the LLM's text -> image") for n in notes)
    assert any(n.startswith("route by LLM: table") for n in notes)

    # a stop before any retrieval on a question that needs one is vetoed
    for kb in kbs:
        kb.queries.clear()
    outputs = [
        "<think>I know it</think><sub-question>None</sub-question><ret>None</ret>",
        "<answer>Raoul Walsh</answer>",
        "<think>done</think><sub-question>None</sub-question><ret>None</ret>",
        "<answer>Miriam Cooper</answer>",
    ]
    traj, _ = _run(HybridPolicy(router=mkqa_router), outputs, kbs, Question(text=TEXT_Q, id="t"))
    assert _calls(kbs) == {"text": [TEXT_Q]}
    assert any("vetoed the LLM's stop" in n for n in traj.steps[0].notes)


def test_random_kb_draws_are_seeded_and_replace_the_llm_choice(kbs):
    policy = RandomKBPolicy(seed=3)
    outputs = [
        "<think>t</think><sub-question>Who directed Jump for Glory?</sub-question><ret>text</ret>",
        "<answer>Raoul Walsh</answer>",
        "<think>t</think><sub-question>Who was Raoul Walsh's spouse?</sub-question><ret>text</ret>",
        "<answer>Miriam Cooper</answer>",
        "<think>done</think><sub-question>None</sub-question><ret>None</ret>",
        "<answer>Miriam Cooper</answer>",
    ]
    q = Question(text=TEXT_Q, id="t")
    traj, _ = _run(policy, outputs, kbs, q)
    drawn = [r.kb for r in traj.retrievals()]
    names = ["text", "image", "table"]
    expected = [policy._draw(q, s, names) for s in traj.steps[:2]]
    assert drawn == expected
    assert all(s.notes[0].startswith("random KB:") for s in traj.steps[:2])
    # over many questions: every KB is drawn, and another seed draws differently
    from kbrouter.types import Step

    qs = [Question(text=f"q{i}", id=f"q{i}") for i in range(30)]
    a = [policy._draw(x, Step(index=0), names) for x in qs]
    b = [RandomKBPolicy(seed=4)._draw(x, Step(index=0), names) for x in qs]
    assert set(a) == set(names) and a != b
    assert a == [RandomKBPolicy(seed=3)._draw(x, Step(index=0), names) for x in qs]


def test_oracle_kb_follows_the_gold_sequence_then_stops(tmp_path, kbs):
    policy = make_policy("oracle-kb")
    assert isinstance(policy, OracleKBPolicy) and policy.needs_gold
    policy.set_gold({"flag-1": ["image", "table"]})
    outputs = [
        "<answer>Australia</answer>",
        "<think>t</think><sub-question>What is the capital of Australia?</sub-question>"
        "<ret>table</ret>",
        "<answer>Canberra</answer>",
        "<answer>Canberra</answer>",
    ]
    traj, _ = _run(policy, outputs, kbs, _flag(tmp_path))
    assert _calls(kbs) == {"image": [FLAG_Q], "table": ["What is the capital of Australia?"]}
    assert traj.config["upper_bound"] is True
    # a question without gold KBs fails only itself, with a clear error
    traj, _ = _run(policy, [], kbs, Question(text="x?", id="unknown"))
    assert traj.stop_reason == "error" and "no gold KBs" in (traj.error or "")


def test_oracle_evidence_shows_exactly_the_gold_documents_without_searching(tmp_path, kbs):
    """Hop i fetches gold_evidence[i] from gold_kbs[i] by id (every block of a gold table is
    shown, beyond top-k); no KB is searched; the prompts carry exactly that evidence."""
    table = kbs[2]
    table.evidence = [
        Evidence(
            kb="table",
            id=f"tbl-countries#{i}",
            score=0.0,
            text=f"block {i}",
            modality=Modality.TABLE,
            metadata={"doc_id": "tbl-countries"},
        )
        for i in range(3)
    ] + [_ev("table", 9, "Another table")]
    policy = make_policy("oracle-evidence")
    assert isinstance(policy, OracleEvidencePolicy)
    assert policy.needs_gold and policy.needs_gold_evidence
    policy.set_gold({"flag-1": ["image", "table"]})
    policy.set_gold_evidence({"flag-1": ["image-1", "tbl-countries"]})
    outputs = [
        "<answer>Australia</answer>",
        "<think>t</think><sub-question>What is the capital of Australia?</sub-question>"
        "<ret>table</ret>",
        "<answer>Canberra</answer>",
        "<answer>Canberra</answer>",
    ]
    traj, model = _run(policy, outputs, kbs, _flag(tmp_path), top_k=1)
    assert _calls(kbs) == {}  # nothing was searched
    shown = [[e.id for e in r.evidence] for r in traj.retrievals()]
    assert shown == [["image-1"], ["tbl-countries#0", "tbl-countries#1", "tbl-countries#2"]]
    assert [r.query.text for r in traj.retrievals()] == [
        FLAG_Q,
        "What is the capital of Australia?",
    ]
    hop2_prompt = traj.steps[1].answer_call.messages[-1].text()
    assert all(f"block {i}" in hop2_prompt for i in range(3))
    assert "Another table" not in hop2_prompt
    assert traj.answer == "Canberra" and traj.config["upper_bound"] is True
    # an id the KB does not hold is an error record on that retrieval, not a crash
    policy.set_gold_evidence({"flag-1": ["nope", "tbl-countries"]})
    traj, _ = _run(policy, outputs, kbs, _flag(tmp_path))
    first = traj.retrievals()[0]
    assert first.evidence == [] and "no item with id 'nope'" in (first.error or "")


def test_make_policy_knows_the_routed_methods_and_needs_a_router(tmp_path, mkqa_router):
    assert isinstance(make_policy("random-kb"), RandomKBPolicy)
    with pytest.raises(ConfigError, match="needs a trained router"):
        make_policy("learned-router")
    path = mkqa_router.save(tmp_path / "r")
    policy = make_policy("hybrid", router=str(path), min_retrieval_steps=1)
    assert isinstance(policy, HybridPolicy) and policy.config.min_retrieval_steps == 1
    assert policy.describe()["router_thresholds"] == mkqa_router.manifest["thresholds"]


def test_router_trained_for_other_kbs_is_a_clear_error(kbs, mkqa_router):
    other = [StaticKB("passages", [_ev("passages", 1, "x")]), *kbs[1:]]
    traj, _ = _run(LearnedRouterPolicy(router=mkqa_router), [], other, Question(text=TEXT_Q))
    assert traj.stop_reason == "error" and "retrain" in (traj.error or "")
