"""The relevance margin on real demo KB evidence (BM25 text, image-to-image flags), alone and as
the R1-Router loop's ``relevance_margin`` setting on the scripted model."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbrouter.engine.engine import Engine, EngineConfig
from kbrouter.policies.r1router import R1RouterPolicy
from kbrouter.reading.margin import relevance, within_margin
from kbrouter.testing import ScriptedChatModel, demo_registry
from kbrouter.types import Query, Question

DEMO = Path(__file__).resolve().parents[2] / "demo"


@pytest.fixture(scope="module")
def demo_kbs(tmp_path_factory: pytest.TempPathFactory):
    reg = demo_registry(tmp_path_factory.mktemp("margin"), lexical_only=False)
    yield reg
    reg.close()


def test_an_image_match_stands_alone_within_any_sensible_margin(demo_kbs):
    flag = DEMO / "questions" / "flag.jpg"
    [hits] = demo_kbs.get("images").search([Query(text="flag", image=flag)], 5)
    assert hits[0].id == "flag_au" and hits[0].score > 0.9 > 0.1 > hits[1].score
    for margin in (0.0, 0.5, 1.0):  # the other flags are 0.5-0.6 similar: a margin alone
        assert [e.id for e in within_margin(hits, margin)] == ["flag_au"]  # would keep them


def test_bm25_hits_within_the_margin_keep_their_order(tmp_path):
    lexical = demo_registry(tmp_path)
    [hits] = lexical.get("text").search([Query(text="Canberra capital city of Australia")], 5)
    lexical.close()
    assert not any(e.metadata.get("fused") for e in hits)  # one ranking: scores are BM25
    kept = within_margin(hits, 0.3)
    assert kept and kept[0] == hits[0] and len(kept) < len(hits)
    assert all(e.score >= 0.7 * hits[0].score for e in kept)
    assert kept == hits[: len(kept)]
    with pytest.raises(ValueError, match="fraction"):
        within_margin(hits, 1.5)
    assert within_margin([], 0.2) == []


def test_hybrid_hits_are_compared_by_their_cosine_not_their_fused_rank(demo_kbs):
    # reciprocal-rank scores differ by rank only (0.0328, 0.0320, ...); the cosine separates the
    # statue's passage (about 0.73) from the next country passages (about 0.25)
    question = "Which country is the Christ the Redeemer statue in?"
    [hits] = demo_kbs.get("text").search([Query(text=question)], 5)
    assert all(e.metadata["fused"] for e in hits) and hits[1].score > 0.9 * hits[0].score
    assert [e.id for e in within_margin(hits, 0.25)] == ["christ_the_redeemer"]
    assert [relevance(e) for e in hits] == [e.metadata["scores"]["dense"] for e in hits]
    assert within_margin(hits, 1.0) == hits
    # a fused item that the dense ranking did not return counts 0 (the first item always stays)
    bm25_only = hits[1].model_copy(update={"metadata": {"fused": True, "scores": {"bm25": 9.0}}})
    assert relevance(bm25_only) == 0.0
    assert within_margin([bm25_only, hits[0]], 0.25) == [bm25_only, hits[0]]
    assert within_margin([hits[0], bm25_only], 0.25) == [hits[0]]


def test_the_loop_shows_only_evidence_within_the_margin(demo_kbs):
    route = "<think>t</think><sub-question>What is shown?</sub-question><ret>images</ret>"
    stop = "<think>done</think><sub-question>None</sub-question><ret>None</ret>"
    outputs = [route, "<answer>Flag of Australia</answer>", stop, "<answer>Australia</answer>"]
    model = ScriptedChatModel(outputs)
    policy = R1RouterPolicy(
        relevance_margin=0.5,
        image_entity=False,
        pinned_alone=False,
        continue_after_entity=False,
        answer_from_question_hop=False,
    )
    engine = Engine(model, demo_kbs, policy, EngineConfig(top_k=5))
    traj = engine.answer_sync(Question(text="Which flag?", image=DEMO / "questions" / "flag.jpg"))
    prompt = traj.steps[0].answer_call.messages[-1].text()
    assert "Flag of Australia" in prompt and "Flag of Kenya" not in prompt
    assert len(traj.steps[0].retrievals[0].evidence) > 1  # retrieved as ever; fewer shown
