"""End to end: the REAL embedded llama.cpp model running R1-Router on the demo KBs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kbrouter.engine.engine import Engine, EngineConfig
from kbrouter.policies.r1router import R1RouterPolicy
from kbrouter.types import Question, Trajectory

DEMO = Path(__file__).resolve().parents[2] / "demo"


@pytest.mark.slow
@pytest.mark.integration
def test_real_model_produces_well_formed_trajectory(demo_kbs):
    """Whatever the 0.5B model answers, the trajectory is complete and consistent."""
    pytest.importorskip("llama_cpp")
    from kbrouter.models.registry import load_model

    row = json.loads((DEMO / "questions.jsonl").read_text().splitlines()[0])
    question = Question(text=row["question"], image=DEMO / row["image"], id=row["id"])
    model = load_model("llama-cpp")
    engine = Engine(model, demo_kbs, R1RouterPolicy(), EngineConfig(max_steps=1))
    try:
        traj = engine.answer_sync(question)
    finally:
        engine.close()

    assert traj.error is None, traj.error
    assert traj.stop_reason in {"answered", "no_retrieval", "budget", "format_fallback"}
    assert len(traj.steps) == 1
    names = {kb.name for kb in demo_kbs.infos}
    for step in traj.steps:
        assert 1 <= len(step.route_calls) <= 3
        assert all(c.error is None and c.output for c in step.route_calls)
        if step.action is not None and not step.action.is_stop:
            assert step.action.sub_question
            assert [r.kb for r in step.retrievals] == step.action.kbs
            assert set(step.action.kbs) <= names
            assert step.answer_call is not None and step.answer_call.error is None
            assert step.sub_answer is not None
    assert traj.final_call is not None and traj.final_call.error is None
    assert traj.answer.strip()
    assert traj.prompt_tokens > 0 and traj.completion_tokens > 0
    # Router prompts share one prefix (system + few-shot), so the KV cache is reusable.
    route_msgs = [c.messages for s in traj.steps for c in s.route_calls]
    assert all(m[:9] == route_msgs[0][:9] for m in route_msgs)
    assert Trajectory.model_validate_json(traj.model_dump_json()) == traj
