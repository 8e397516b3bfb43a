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
    mkqa_registry,  # noqa: ANN001
    dev: list[EvalExample],
    builder: GoldPathBuilder,
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
    # the engine's default searches no image KB once the image is identified: a caption
    # answer has no gold path it can follow
    assert builder.skip_identified_image
    dropped = builder.build(solar).dropped
    assert dropped["image_kb_again"] >= 6 and set(dropped) <= {
        "image_kb_again",
        "image_not_matched",
    }
    again = GoldPathBuilder(
        mkqa_registry, top_k=2, router_prompt="compact", skip_identified_image=False
    )
    report = again.build(solar)
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
    # a dataset whose kinds are not KB names: unknown without a map, routed with one
    wtq = [_with_gold_kbs(e, ["tabular"]) for e in _source(dev, "wtq")[:3]]
    assert GoldPathBuilder(mkqa_registry).build(wtq).dropped == {"unknown_kb": 3}
    mapped = GoldPathBuilder(mkqa_registry, kb_map={"tabular": "Table Retriever"}).build(wtq)
    assert mapped.kept > 0, mapped.dropped
    assert all(path[0][0] == "table" for path in mapped.paths.values())


def _with_gold_kbs(example: EvalExample, kbs: list[str]) -> EvalExample:
    return example.model_copy(update={"gold_kbs": kbs})


def test_gold_path_samples_are_what_the_engine_sends(
    mkqa_registry,  # noqa: ANN001
    dev: list[EvalExample],
    builder: GoldPathBuilder,
) -> None:
    """Parity: run the R1-Router loop through the engine on the same KBs, the scripted model
    replying each call with the target of the gold-path sample whose prompt it was sent. Every
    call must be such a prompt, and every sample of the question must be asked."""
    from kbrouter.engine.engine import Engine, EngineConfig
    from kbrouter.policies.r1router import R1RouterPolicy
    from kbrouter.testing import ScriptedChatModel
    from kbrouter.train.records import message_dict, prompt_messages, render_target_response

    questions = _source(dev, "hotpotqa")[:12] + _source(dev, "template-flag")[:3]
    report = builder.build(questions)
    checked = 0
    for ex in questions:
        samples = [s for s in report.samples if s.trajectory_id == f"gold-path:{ex.id}"]
        if not samples:
            continue
        if ex.source == "hotpotqa" and len(report.paths[ex.id]) != 1:
            continue  # a bridge hop's first sub-answer is not trained: no reply to script
        by_prompt = {repr(prompt_messages(s)): s for s in samples}
        unmatched: list[str] = []
        asked: set[str] = set()

        def reply(messages, by_prompt=by_prompt, unmatched=unmatched, asked=asked) -> str:  # noqa: ANN001
            from kbrouter.train.steps import StepSample

            key = repr([message_dict(m) for m in messages])
            sample: StepSample | None = by_prompt.get(key)
            if sample is None:
                unmatched.append(messages[-1].text()[-300:])
                return "<think></think>\n<sub-question>None</sub-question>\n<ret>None</ret>"
            asked.add(key)
            return render_target_response(sample)

        engine = Engine(
            ScriptedChatModel(reply),
            mkqa_registry,
            R1RouterPolicy(router_prompt="compact", min_retrieval_steps=1),
            EngineConfig(max_steps=3, top_k=2, use_grammar=False),
        )
        traj = engine.answer_sync(ex.question)
        assert not unmatched, (ex.id, unmatched)
        assert asked == set(by_prompt), ex.id
        assert traj.answer
        checked += 1
    assert checked >= 5


def test_sub_answer_samples_show_what_the_margin_keeps(
    mkqa_registry,  # noqa: ANN001
    dev: list[EvalExample],
) -> None:
    """The builder applies the policy's relevance margin (its default: R1-Router's): a sample
    shows the top-k only when the margin is off, and with it on, a prefix of that top-k."""
    import re

    from kbrouter.policies.r1router import R1RouterConfig

    questions = _source(dev, "hotpotqa")[:20]

    def shown(margin: float | None) -> dict[str, list[str]]:
        b = GoldPathBuilder(mkqa_registry, top_k=2, relevance_margin=margin)
        assert b.relevance_margin == margin
        return {
            s.trajectory_id: re.findall(
                r"^\(\d+\) \[[^\]]+\] ([^:\n]*):", s.messages[-1].text(), re.M
            )
            for s in b.build(questions).samples
            if s.kind == "sub_answer"
        }

    assert GoldPathBuilder(mkqa_registry).relevance_margin == R1RouterConfig().relevance_margin
    off, on = shown(None), shown(0.25)
    assert off and all(len(titles) == 2 for titles in off.values())
    assert any(len(titles) == 1 for titles in on.values())
    for tid, titles in on.items():
        assert titles and (tid not in off or off[tid][: len(titles)] == titles), tid


def test_first_hops_of_dropped_questions(mkqa_registry, dev: list[EvalExample]) -> None:  # noqa: ANN001
    """A question dropped for a retrieval miss still gives its first router step (the whole
    question to its first gold KB); kept questions' samples do not change."""
    from kbrouter.train.gold_paths import FIRST_HOP_ORIGIN, RETRIEVAL_DROPS

    questions = _source(dev, "wtq")[:25] + _source(dev, "hotpotqa")[:25]
    plain = GoldPathBuilder(mkqa_registry, top_k=2, router_prompt="compact").build(questions)
    with_first = GoldPathBuilder(
        mkqa_registry, top_k=2, router_prompt="compact", first_hops_of_dropped=True
    ).build(questions)
    misses = sum(n for reason, n in plain.dropped.items() if reason in RETRIEVAL_DROPS)
    assert misses > 0, plain.dropped
    assert with_first.dropped == plain.dropped and with_first.kept == plain.kept
    assert with_first.first_hops == misses
    extra = [s for s in with_first.samples if s.origin == FIRST_HOP_ORIGIN]
    assert len(extra) == misses
    assert [s for s in with_first.samples if s.origin != FIRST_HOP_ORIGIN] == plain.samples
    by_id = {e.id: e for e in questions}
    compact = load_prompt("router_compact_system").split("{", 1)[0]
    for s in extra:
        ex = by_id[s.trajectory_id.split(":", 1)[1]]
        assert ex.id not in with_first.paths  # dropped: no path, only this step
        assert s.kind == "ret" and s.step_index == 0
        assert s.target.retrievers == [ex.gold_kbs[0]]
        assert s.target.query == router_sub_question(ex.question.text)
        assert s.messages[0].text().startswith(compact)
        assert " ".join(ex.question.text.split()) in s.messages[-1].text()  # as the prompt


def test_gold_route_labeler_labels_the_policys_own_states(
    mkqa_registry,  # noqa: ANN001
    dev: list[EvalExample],
) -> None:
    """On-policy states get the gold-path decision: the first gold hop not searched yet (with
    its gold sub-question), then a stop; a wrong first KB is asked for the first gold hop
    again. Sub-answer samples are dropped, final samples kept, and a question with only its
    first hop known labels only the states before that hop was searched."""
    import asyncio

    from kbrouter.train.gold_paths import ON_POLICY_GOLD_ORIGIN, GoldRouteLabeler
    from kbrouter.train.steps import RouteTarget, StepSample
    from kbrouter.types import ChatMessage

    flags = _source(dev, "template-flag-capital")[:3]
    wtq = [e for e in _source(dev, "wtq") if e.id not in {f.id for f in flags}]
    report = GoldPathBuilder(
        mkqa_registry, top_k=2, router_prompt="compact", first_hops_of_dropped=True
    ).build(flags + wtq[:25])
    flag = next(e for e in flags if e.id in report.paths)
    dropped = next(s for s in report.samples if s.origin == "gold-path-first-hop")
    dropped_id = dropped.trajectory_id.split(":", 1)[1]
    labeler = GoldRouteLabeler.from_samples(report.samples)
    (kb1, sub1), (kb2, sub2) = report.paths[flag.id]
    assert [t.retrievers for t in labeler.gold[flag.id]] == [[kb1], [kb2], []]
    assert [t.query for t in labeler.gold[flag.id][:2]] == [sub1, sub2]
    assert labeler.gold[dropped_id] == [dropped.target]

    msg = [ChatMessage(role="user", content="state")]

    def ret(tid: str, i: int, kbs: list[str]) -> StepSample:
        target = RouteTarget(query="own?" if kbs else None, retrievers=kbs)
        return StepSample(
            step_type="ret", messages=msg, target=target, trajectory_id=tid, step_index=i
        )

    def ans(tid: str, i: int, final: bool) -> StepSample:
        return StepSample(
            step_type="ans",
            final=final,
            messages=msg,
            target=["Canberra"] if final else "x",
            trajectory_id=tid,
            step_index=i,
        )

    flag_tid, dropped_tid = f"r0:{flag.id}", f"r0:{dropped_id}"
    policy = [
        ret(flag_tid, 0, ["text"]),  # wrong first KB
        ans(flag_tid, 1, False),
        ret(flag_tid, 2, [kb1]),
        ret(flag_tid, 3, [kb2]),
        ret(flag_tid, 4, []),  # the policy stops
        ans(flag_tid, 5, True),
        ret(dropped_tid, 0, list(dropped.target.retrievers)),
        ret(dropped_tid, 1, ["text"]),  # past the known path
        ret("r0:not-a-training-question", 0, ["text"]),
    ]
    out = asyncio.run(labeler(policy))
    labelled = [(s.trajectory_id, s.step_index, s.kind) for s in out]
    assert labelled == [
        (flag_tid, 0, "ret"),
        (flag_tid, 2, "ret"),
        (flag_tid, 3, "ret"),
        (flag_tid, 4, "ret"),
        (flag_tid, 5, "final"),
        (dropped_tid, 0, "ret"),
    ]
    routes = [s.target for s in out if s.kind == "ret"]
    assert [t.retrievers for t in routes] == [[kb1], [kb1], [kb2], [], dropped.target.retrievers]
    assert routes[0].query == sub1 and routes[2].query == sub2 and routes[3].is_stop
    assert all(s.origin == ON_POLICY_GOLD_ORIGIN and s.response is None for s in out[:4])
    assert out[4].target == ["Canberra"]
    assert labeler.counts == {
        "hop": 4,
        "stop": 1,
        "final": 1,
        "sub_answer_dropped": 1,
        "past_known_path": 1,
        "unknown_question": 1,
    }


def test_terse_gold_paths_train_the_short_reply(dev: list[EvalExample], mkqa_registry) -> None:  # noqa: ANN001
    """With the terse router prompt the same gold paths give SFT targets without a think
    block: a hop that searches with the question as asked is ``<ret>KB</ret>`` alone, an
    anchored hop adds its sub-question after the KB, and the stop is ``<ret>None</ret>``."""
    from kbrouter.policies.prompts import detect_router_prompt
    from kbrouter.train.records import sft_records

    terse = GoldPathBuilder(mkqa_registry, top_k=2, router_prompt="terse")
    questions = _source(dev, "template-flag-capital")[:3]
    report = terse.build(questions)
    assert report.kept >= 2, report.dropped
    first_id = next(iter(report.paths))
    samples = [s for s in report.samples if s.trajectory_id == f"gold-path:{first_id}"]
    assert all(detect_router_prompt(s.messages) == "terse" for s in samples)
    replies = [r["completion"][0]["content"] for r in sft_records(samples)]
    (_, sub1), (_, sub2) = report.paths[first_id]
    assert replies == [
        "<ret>image</ret>",
        f"<ret>table</ret>\n<sub-question>{sub2}</sub-question>",
        "<ret>None</ret>",
    ]
    # the targets are the compact builder's: only the rendering differs
    compact = GoldPathBuilder(mkqa_registry, top_k=2, router_prompt="compact").build(questions)
    assert [s.target for s in compact.samples] == [s.target for s in report.samples]
