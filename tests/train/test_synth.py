"""Trajectory synthesis: the real engine + R1-Router policy run a scripted teacher; only
trajectories reaching the recall threshold are kept, and their step samples carry the exact
messages the model saw and the targets of method.md sec. 5."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbrouter.engine.engine import Engine, EngineConfig
from kbrouter.eval.datasets import EvalExample
from kbrouter.policies.r1router import R1RouterPolicy
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
