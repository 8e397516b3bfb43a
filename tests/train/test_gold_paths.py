"""Gold-path trajectory assembly on real mkqa-mini dev questions and the real KBs: the KB
sequence and sub-questions of each path, the samples it gives, and why questions are dropped."""

from __future__ import annotations

import pytest

from kbrouter.eval.datasets import EvalExample, load_dataset
from kbrouter.policies.continuation import asks_whole_question
from kbrouter.policies.prompts import load_prompt
from kbrouter.train.gold_paths import GOLD_PATH_ORIGIN, GoldPathBuilder, router_sub_question
from kbrouter.types import Question

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dev(shared_data) -> list[EvalExample]:  # noqa: ANN001
    return load_dataset("mkqa-mini", data_dir=shared_data).examples


@pytest.fixture(scope="module")
def builder(mkqa_registry) -> GoldPathBuilder:  # noqa: ANN001
    return GoldPathBuilder(mkqa_registry, top_k=2, router_prompt="compact")


def _source(dev: list[EvalExample], source: str) -> list[EvalExample]:
    return [e for e in dev if e.source == source]


def test_router_sub_question_fits_the_route_grammar() -> None:
    long = "What is " + "very " * 60 + "long?"
    for text, anchor in [("Who? Where?", None), (long, None), (long, "Flag of Australia")]:
        sub = router_sub_question(text, anchor)
        assert sub.endswith("?") and "?" not in sub[:-1] and "\n" not in sub
        assert len(sub) <= 200
    q = "What is the capital of the country whose flag is shown in the image?"
    anchored = router_sub_question(q, "Flag of Australia")
    assert anchored == q[:-1] + " (Flag of Australia)?"
    assert asks_whole_question(q, anchored)


def test_image_then_table_paths(dev: list[EvalExample], builder: GoldPathBuilder) -> None:
    questions = _source(dev, "template-flag-capital")
    report = builder.build(questions)
    assert report.kept >= len(questions) - 1, report.dropped
    for ex in questions:
        if ex.id not in report.paths:
            continue
        (kb1, sub1), (kb2, sub2) = report.paths[ex.id]
        assert (kb1, kb2) == ("image", "table")
        assert sub1 == ex.question.text
        assert sub2.startswith(ex.question.text[:-1] + " (Flag of ") and sub2.endswith(")?")
    first_id = next(iter(report.paths))
    samples = [s for s in report.samples if s.trajectory_id == f"gold-path:{first_id}"]
    # identification needs no model call and the SQL reader has no gold: router steps only,
    # the last one a stop
    assert [s.kind for s in samples] == ["ret", "ret", "ret"]
    assert [s.target.retrievers for s in samples] == [["image"], ["table"], []]
    assert samples[-1].target.is_stop
    assert all(
        s.origin == GOLD_PATH_ORIGIN and s.source == "template-flag-capital" for s in samples
    )
    first = samples[0]
    # the compact router prompt: its system text, no few-shot turns, the image note
    assert len(first.messages) == 2
    assert first.messages[0].text().startswith(load_prompt("router_compact_system")[:40])
    assert "An image is attached" in first.messages[1].text()
    # the later route prompts have the identification (the hop's question and the flag's
    # title) in their history; the first has no history
    assert "Answers found so far" not in first.messages[1].text()
    second = samples[1].messages[1].text()
    assert "Sub-question 1: What does the image show?" in second
    assert "Answer 1: Flag of" in second


def test_single_hop_table_and_caption_paths(
    dev: list[EvalExample], builder: GoldPathBuilder
) -> None:
    wtq = _source(dev, "wtq")[:20]
    report = builder.build(wtq)
    assert report.kept >= 10, report.dropped
    assert set(report.dropped) <= {"table_not_retrieved"}
    for ex in wtq:
        if ex.id in report.paths:
            assert report.paths[ex.id] == [("table", router_sub_question(ex.question.text))]
    assert report.counts() == {"ret": 2 * report.kept}  # the hop and the stop

    solar = _source(dev, "gcompris-solar")[:8]
    report = builder.build(solar)
    assert report.kept >= 6, report.dropped
    for qid, path in report.paths.items():
        # identify the body, then ask the question anchored on it (answered from the caption)
        assert [kb for kb, _ in path] == ["image", "image"], qid
    answers = [s for s in report.samples if s.kind == "sub_answer"]
    assert len(answers) == report.kept
    for s in answers:
        # the target answer is in the evidence the sub-answer prompt shows
        assert s.target.casefold() in s.messages[-1].text().casefold()


def test_text_multihop_paths(dev: list[EvalExample], builder: GoldPathBuilder) -> None:
    hotpot = _source(dev, "hotpotqa")[:20]
    report = builder.build(hotpot)
    assert report.kept >= 10, report.dropped
    for qid, path in report.paths.items():
        assert {kb for kb, _ in path} == {"text"}
        assert 1 <= len(path) <= 2
        if len(path) == 2:  # the bridge hop names the bridge entity
            assert path[1][1].endswith(")?"), qid
    for s in report.samples:
        if s.kind == "sub_answer":
            assert s.target.casefold() in s.messages[-1].text().casefold()


def test_drop_reasons(mkqa_registry, dev: list[EvalExample]) -> None:  # noqa: ANN001
    no_gold = EvalExample(id="q1", question=Question(text="Who?"), golds=["x"], source="t")
    unknown = EvalExample(
        id="q2", question=Question(text="Who?"), golds=["x"], gold_kbs=["web"], source="t"
    )
    report = GoldPathBuilder(mkqa_registry).build([no_gold, unknown])
    assert report.kept == 0
    assert report.dropped == {"no_gold_kbs": 1, "unknown_kb": 1}
    # kinds mapped to other KB names
    wtq = _source(dev, "wtq")[:3]
    mapped = GoldPathBuilder(mkqa_registry, kb_map={"table": "Table Retriever"}).build(wtq)
    assert all(path[0][0] == "table" for path in mapped.paths.values())
