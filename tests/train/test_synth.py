"""Trajectory synthesis: the real engine + R1-Router policy run a scripted teacher; only
trajectories reaching the recall threshold are kept, and their step samples carry the exact
messages the model saw and the targets of method.md sec. 5."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbrouter.engine.engine import Engine, EngineConfig
from kbrouter.eval.datasets import EvalExample
from kbrouter.policies.r1router import PAPER_READING, R1RouterPolicy
from kbrouter.testing import ScriptedChatModel, StaticKB, StaticKBRegistry
from kbrouter.train.rewards import KBNames
from kbrouter.train.steps import RouteTarget, read_steps, write_steps
from kbrouter.train.synth import TeacherLabeler, synthesize, trajectory_to_samples
from kbrouter.types import ChatMessage, Evidence, Question


def _kind(messages: list[ChatMessage]) -> str:
    system = messages[0].text()
    if "<ret>" in system:
        return "route"
    return "final" if "final answer" in system else "sub"


def teacher_reply(messages: list[ChatMessage]) -> str:
    """Route once to 'text', then stop; answer the sub-question; final answer from the question."""
    kind = _kind(messages)
    user = messages[-1].text()
    if kind == "route":
        if "Answer1" in user or "Sub-question1" in user or "Sub-question 1" in user:
            return "<think>enough</think><sub-question>None</sub-question><ret>None</ret>"
        return (
            "<think>need it</think><sub-question>Where is the Louvre?</sub-question><ret>text</ret>"
        )
    if kind == "sub":
        return "<think>read</think><answer>The Louvre is in Paris.</answer>"
    answer = "Paris" if "Louvre" in user else "London"
    return f"<think>done</think><answer>{answer}</answer>"


@pytest.fixture()
def engine() -> Engine:
    kb = StaticKB(
        "text",
        evidence=[Evidence(kb="text", id="1", score=1.0, text="The Louvre is a museum in Paris.")],
        description="Encyclopedia passages.",
    )
    model = ScriptedChatModel(teacher_reply)
    return Engine(model, StaticKBRegistry([kb]), R1RouterPolicy(), EngineConfig(max_steps=3))


def examples() -> list[EvalExample]:
    return [
        EvalExample(
            id="q1",
            question=Question(text="In which city is the Louvre?"),
            golds=["Paris"],
            source="toy",
        ),
        EvalExample(
            id="q2",
            question=Question(text="In which city is the Prado?"),
            golds=["Madrid"],
            source="toy",
        ),
    ]


def test_synthesize_keeps_correct_trajectories(engine: Engine, tmp_path: Path) -> None:
    samples = synthesize(examples(), engine, threshold=1.0)
    assert {s.trajectory_id for s in samples} == {"q1"}  # q2's answer 'London' has recall 0
    kinds = [s.kind for s in samples]
    assert kinds == ["ret", "sub_answer", "ret", "final"]
    first, sub, stop, final = samples
    assert first.target == RouteTarget(query="Where is the Louvre?", retrievers=["text"])
    assert stop.target == RouteTarget()
    assert sub.target == "The Louvre is in Paris."
    assert final.target == ["Paris"] and final.final
    assert [s.step_index for s in samples] == [0, 1, 2, 3]
    assert all(s.source == "toy" and s.response for s in samples)
    # the exact messages the model saw (questions run concurrently, so requests interleave)
    requests = [msgs for msgs, _ in engine.model.requests]
    assert all(s.messages in requests for s in samples)
    assert "Louvre" in final.messages[-1].text()
    assert read_steps(write_steps(samples, tmp_path / "s.jsonl")) == samples


def test_threshold_zero_keeps_everything(engine: Engine) -> None:
    samples = synthesize(examples(), engine, threshold=0.0)
    assert {s.trajectory_id for s in samples} == {"q1", "q2"}


def test_trajectory_to_samples_skips_failed_calls(engine: Engine) -> None:
    traj = engine.answer_sync(Question(text="In which city is the Louvre?"))
    traj.steps[0].route_calls[-1] = (
        traj.steps[0].route_calls[-1].model_copy(update={"error": "boom"})
    )
    samples = trajectory_to_samples(traj, ["Paris"], trajectory_id="t")
    assert [s.kind for s in samples] == ["sub_answer", "ret", "final"]


def test_teacher_labeler_relabels_from_the_same_prompt(engine: Engine) -> None:
    """Router/sub-answer targets come from the teacher's reply to the same messages."""
    import asyncio

    traj = engine.answer_sync(Question(text="In which city is the Louvre?"))
    samples = trajectory_to_samples(traj, ["Paris"], trajectory_id="t")
    wrong = [
        s.model_copy(update={"target": RouteTarget(query="x", retrievers=["text"])})
        if s.step_type == "ret"
        else s
        for s in samples
    ]
    labeler = TeacherLabeler(ScriptedChatModel(teacher_reply), KBNames({"text": []}))
    relabelled = asyncio.run(labeler(wrong))
    assert [s.target for s in relabelled] == [s.target for s in samples]


def test_a_failing_teacher_call_drops_one_sample_not_the_round(engine: Engine) -> None:
    import asyncio

    traj = engine.answer_sync(Question(text="In which city is the Louvre?"))
    samples = trajectory_to_samples(traj, ["Paris"], trajectory_id="t")
    labeler = TeacherLabeler(ScriptedChatModel(teacher_reply, fail_at=[0]), KBNames({"text": []}))
    relabelled = asyncio.run(labeler(samples))
    assert len(relabelled) == len(samples) - 1
    assert labeler.failures == [
        ("t", samples[0].step_index, "ModelError: scripted failure at call 0")
    ]


def test_a_corrupt_synth_progress_file_is_resumed_without_duplicates(tmp_path: Path) -> None:
    """A truncated progress line (an interrupted write) re-runs that question; its samples
    already written are dropped, so nothing is duplicated."""
    import json

    from kbrouter.cli.train_cmd import _synth_progress

    out = tmp_path / "steps.jsonl"
    progress = tmp_path / "steps.jsonl.progress.jsonl"
    out.write_text(
        "".join(json.dumps({"trajectory_id": q, "n": i}) + "\n" for i, q in enumerate("aab"))
    )
    progress.write_text('{"id": "a", "kept": true}\n{"id": "b", "ke')
    assert _synth_progress(progress, out) == {"a"}
    assert [json.loads(x)["trajectory_id"] for x in out.read_text().splitlines()] == ["a", "a"]


def _repeating_reply(messages: list[ChatMessage]) -> str:
    """A teacher that asks the same sub-question at every step, then answers right."""
    kind = _kind(messages)
    if kind == "route":
        return (
            "<think>need it</think><sub-question>Where is the Louvre?</sub-question><ret>text</ret>"
        )
    if kind == "sub":
        return "<think>read</think><answer>Paris</answer>"
    return "<think>done</think><answer>Paris</answer>"


def test_a_repeated_step_becomes_a_stop_and_ends_the_samples() -> None:
    import asyncio

    from kbrouter.train.synth import synthesize_async

    kb = StaticKB(
        "text",
        evidence=[Evidence(kb="text", id="1", score=1.0, text="The Louvre is a museum in Paris.")],
    )
    model = ScriptedChatModel(_repeating_reply)
    engine = Engine(model, StaticKBRegistry([kb]), R1RouterPolicy(), EngineConfig(max_steps=3))
    report = asyncio.run(synthesize_async(examples()[:1], engine))
    assert report.kept == 1 and report.deduplicated == 1
    first, sub, stop = report.samples
    assert first.target == RouteTarget(query="Where is the Louvre?", retrievers=["text"])
    assert sub.target == "Paris"
    # the second, identical step: what was known before it led to the right answer -> stop
    assert stop.kind == "ret" and stop.target == RouteTarget() and stop.response is None
    assert stop.origin == "teacher-dedup"
    assert "Where is the Louvre?" in stop.messages[-1].text()  # its history has the first hop
    assert model.calls == 3 * 2 + 1  # the trajectory itself ran its whole budget

    traj = asyncio.run(engine.answer(examples()[0].question))
    full = trajectory_to_samples(traj, ["Paris"], dedupe=False)
    assert [s.kind for s in full] == ["ret", "sub_answer"] * 3 + ["final"]


def _table_kb() -> StaticKB:
    return StaticKB(
        "table",
        evidence=[Evidence(kb="table", id="t", score=1.0, text="Louvre | Paris")],
        description="Tables.",
    )


def _text_kb() -> StaticKB:
    return StaticKB(
        "text",
        evidence=[Evidence(kb="text", id="1", score=1.0, text="The Louvre is a museum in Paris.")],
        description="Encyclopedia passages.",
    )


def test_a_repeat_followed_by_a_new_step_is_left_out_not_cut() -> None:
    """Steps A, B, A, C: the repeated A (and its sub-answer) is left out, C and the final
    answer stay; A, A, stop is cut at the second A."""
    import asyncio

    def reply_for(order: list[str]):  # noqa: ANN202
        def reply(messages: list[ChatMessage]) -> str:
            kind = _kind(messages)
            if kind == "route":
                hop = messages[-1].text().count("Sub-question")  # hops so far in the history
                q = order[hop] if hop < len(order) else None
                if q is None:
                    return "<think>t</think><sub-question>None</sub-question><ret>None</ret>"
                return f"<think>t</think><sub-question>{q}</sub-question><ret>text</ret>"
            return "<think>t</think><answer>Paris</answer>"

        return reply

    from kbrouter.train.synth import synthesize_async

    for order, queries in (
        (["Is A?", "Is B?", "Is A?", "Is C?"], ["Is A?", "Is B?", "Is C?"]),  # the budget: 4
        (["Is A?", "Is A?"], ["Is A?", None]),
    ):
        model = ScriptedChatModel(reply_for(order))
        # the paper's reading path, as synthesis uses: every step is the teacher's own
        policy = R1RouterPolicy(**PAPER_READING)
        engine = Engine(model, StaticKBRegistry([_text_kb()]), policy, EngineConfig(max_steps=4))
        report = asyncio.run(synthesize_async(examples()[:1], engine, threshold=0.0))
        routes = [s for s in report.samples if s.kind == "ret"]
        assert [s.target.query for s in routes] == queries, order
        assert report.deduplicated == 1
        has_final = any(s.kind == "final" for s in report.samples)
        assert has_final == (len(order) == 4)  # a cut trajectory has no final sample
        subs = [s for s in report.samples if s.kind == "sub_answer"]
        assert len(subs) == sum(q is not None for q in queries)


def test_gold_kb_router_narrows_the_grammar_to_the_gold_kb_of_each_hop() -> None:
    from kbrouter.train.synth import GoldKBRouter

    def reply(messages: list[ChatMessage]) -> str:  # what the narrowed grammar lets through
        return teacher_reply(messages).replace("<ret>text</ret>", "<ret>table</ret>")

    model = ScriptedChatModel(reply, supports_grammar=True)
    policy = GoldKBRouter({"q1": ["table"]}, min_retrieval_steps=0)
    engine = Engine(model, StaticKBRegistry([_text_kb(), _table_kb()]), policy)
    synthesize(examples()[:1], engine, threshold=0.0)
    route_params = [p for m, p in model.requests if _kind(m) == "route"]
    # hop 0: only the gold KB; hop 1 is beyond the gold path: every KB again
    assert '"table"' in route_params[0].grammar and '"text"' not in route_params[0].grammar
    assert '"table"' in route_params[1].grammar and '"text"' in route_params[1].grammar
    # the prompt is the usual one: both KBs are listed to the teacher
    first_prompt = next(m for m, _ in model.requests if _kind(m) == "route")[0].text()
    assert "- text" in first_prompt and "- table" in first_prompt


def test_gold_kb_router_without_a_grammar_re_asks_for_the_gold_kb() -> None:
    from kbrouter.train.synth import GoldKBRouter

    def reply(messages: list[ChatMessage]) -> str:
        if _kind(messages) == "route" and "search the table knowledge base" in messages[-1].text():
            return "<think>ok</think><sub-question>Where is it?</sub-question><ret>table</ret>"
        return teacher_reply(messages)

    model = ScriptedChatModel(reply)
    policy = GoldKBRouter({"q1": ["table"]}, min_retrieval_steps=0)
    engine = Engine(model, StaticKBRegistry([_text_kb(), _table_kb()]), policy)
    samples = synthesize(examples()[:1], engine, threshold=1.0)
    first = samples[0]
    assert first.target == RouteTarget(query="Where is it?", retrievers=["table"])
    assert "<ret>table</ret>" in first.response
    # the sample's prompt is the step's first route prompt: the corrective re-ask (a hint a
    # student never sees) is not trained on
    assert all("search the table" not in m.text() for m in first.messages)
    assert first.messages[-1].text().startswith("Question:")
    route_calls = [m for m, _ in model.requests if _kind(m) == "route"]
    assert "search the table knowledge base at this step" in route_calls[1][-1].text()
    # a question without gold KBs routes freely
    free = synthesize(examples()[1:], engine, threshold=0.0)
    assert free[0].target.retrievers == ["text"]


def test_attempts_rerun_only_dropped_questions_sampling_with_a_moved_seed(tmp_path: Path) -> None:
    """Rejection sampling: a dropped question is run again at the retry temperature with the
    seed moved by the attempt (never replayed from the first attempt's cache); a kept one is
    not; each question is reported once."""
    import asyncio

    from kbrouter.train.synth import synthesize_async

    finals = {"Prado": 0}

    def reply(messages: list[ChatMessage]) -> str:
        if _kind(messages) == "final" and "Prado" in messages[-1].text():
            finals["Prado"] += 1  # wrong the first time, right the second
            return "<think>done</think><answer>" + ("London" if finals["Prado"] == 1 else "Madrid")
        return teacher_reply(messages).replace("London", "Madrid")

    model = ScriptedChatModel(reply)
    engine = Engine(
        model,
        StaticKBRegistry([_text_kb()]),
        R1RouterPolicy(),
        EngineConfig(max_steps=3, seed=5, cache_dir=tmp_path / "cache"),
    )
    reported: list[tuple[str, bool]] = []
    report = asyncio.run(
        synthesize_async(
            examples(),
            engine,
            attempts=3,
            retry_temperature=0.9,
            on_example=lambda ex, traj, kept: reported.append((ex.id, bool(kept))),
        )
    )
    assert report.kept == 2 and report.kept_at_attempt == {0: 1, 1: 1}
    assert report.runs == 3 and not report.dropped  # q1 once, q2 twice: no third attempt
    assert sorted(reported) == [("q1", True), ("q2", True)]
    assert {s.trajectory_id for s in report.samples} == {"q1", "q2"}
    # the first attempt ran as configured (greedy, seed 5); the retry sampled at 0.9, seed 6
    sampling = {(p.temperature, p.seed) for _, p in model.requests}
    assert sampling == {(0.0, 5), (0.9, 6)}
    retried = [m for m, p in model.requests if p.temperature == 0.9 and _kind(m) != "sub"]
    assert retried and all(any("Prado" in x.text() for x in m) for m in retried)

    # a question that never passes is reported once, dropped, after all its attempts
    model = ScriptedChatModel(teacher_reply)
    engine = Engine(model, StaticKBRegistry([_text_kb()]), R1RouterPolicy())
    report = asyncio.run(synthesize_async(examples(), engine, attempts=3))
    assert report.kept == 1 and report.dropped == {"low_recall": 1} and report.runs == 4
    with pytest.raises(ValueError, match="retry_temperature"):
        asyncio.run(synthesize_async(examples(), engine, attempts=2, retry_temperature=0.0))
