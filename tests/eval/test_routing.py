"""Routing metrics from trajectories: per-hop KB choice, calls per KB, rates."""

from __future__ import annotations

import pytest

from kbrouter.eval.routing import routing_record, summarize_routing
from kbrouter.types import ModelCall, Query, Question, Retrieval, RouteAction, Step, Trajectory


def _traj(*hops: list[str], answer_only: bool = False) -> Trajectory:
    steps = []
    for i, kbs in enumerate(hops):
        steps.append(
            Step(
                index=i,
                action=RouteAction(sub_question=f"sq{i}", kbs=kbs),
                retrievals=[Retrieval(kb=k, query=Query(text=f"sq{i}"), evidence=[]) for k in kbs],
            )
        )
    final = ModelCall(
        purpose="final", messages=[], output="x", prompt_tokens=10, completion_tokens=2
    )
    return Trajectory(question=Question(text="q"), method="m", steps=steps, final_call=final)


def test_per_hop_strict_and_lenient():
    """Hop i is strict-correct iff step i searched exactly the gold KB; lenient iff included."""
    rec = routing_record(_traj(["image"], ["text", "table"]), ["image", "table"])
    assert rec["hop_correct_strict"] == [True, False]
    assert rec["hop_correct_lenient"] == [True, True]
    assert rec["calls_per_kb"] == {"image": 1, "text": 1, "table": 1}
    assert rec["retrieval_calls"] == 3 and rec["retrieval_steps"] == 2
    assert not rec["sequence_match"]
    assert rec["prompt_tokens"] == 10 and rec["model_calls"] == 1


def test_missing_and_extra_steps():
    """Too few retrieval steps make later gold hops wrong; extra steps are counted."""
    short = routing_record(_traj(["text"]), ["text", "text"])
    assert short["hop_correct_strict"] == [True, False] and short["missing_steps"] == 1
    long = routing_record(_traj(["text"], ["text"], ["table"]), ["text", "text"])
    assert long["extra_steps"] == 1 and long["hop_correct_strict"] == [True, True]
    exact = routing_record(_traj(["text"], ["text"]), ["text", "text"])
    assert exact["sequence_match"]


def test_summary_rates():
    """Summary: calls per KB per question, accuracies, retrieval rates."""
    recs = [
        routing_record(_traj(["text"]), ["text"]),
        routing_record(_traj(), ["table"]),  # answered without retrieving
        routing_record(_traj(["table"]), []),  # retrieved although not needed
        routing_record(_traj(["text"]), None),  # no gold KBs
    ]
    s = summarize_routing(recs)
    assert s["questions"] == 4 and s["with_gold_kbs"] == 3
    assert s["retrieval_calls_per_question"] == pytest.approx(0.75)
    assert s["retrieval_calls_per_kb"] == {"table": 0.25, "text": 0.5}
    assert s["kb_accuracy_strict"] == pytest.approx(0.5)
    assert s["kb_accuracy_by_hop_strict"] == [pytest.approx(0.5)]
    assert s["answered_without_retrieving"] == pytest.approx(0.5)
    assert s["retrieved_when_not_needed"] == 1.0
    assert s["no_retrieval_rate"] == pytest.approx(0.25)
    assert summarize_routing([]) == {"questions": 0}


@pytest.mark.parametrize(("recorded", "option", "used"), [
    ("compact", "auto", "compact"),  # a trained router: the prompt it records
    (None, "auto", "full"),  # a prompted model: the few-shot prompt
    ("compact", "full", "full"),  # asked for explicitly
])  # fmt: skip
def test_teacher_forced_route_calls_use_the_models_prompt_variant(recorded, option, used):
    import asyncio

    from kbrouter.eval.routing_eval import predict_llm_router
    from kbrouter.policies.prompts import detect_router_prompt
    from kbrouter.routing.data import RouteSample
    from kbrouter.testing import ScriptedChatModel
    from kbrouter.types import KBInfo, Modality, RouteState

    class Trained(ScriptedChatModel):
        @property
        def prompt_variant(self):  # noqa: ANN202
            return recorded

    kbs = [
        KBInfo(name="text", description="Passages.", modality=Modality.TEXT),
        KBInfo(name="table", description="Tables.", modality=Modality.TABLE),
    ]
    model = Trained(
        ["<think></think>\n<sub-question>Who wrote Hamlet?</sub-question>\n<ret>text</ret>"]
    )
    sample = RouteSample(state=RouteState(question="Who wrote Hamlet?"), label="text", group="q")
    decisions, _ = asyncio.run(predict_llm_router(model, kbs, [sample], router_prompt=option))
    assert decisions[0].label == "text"
    messages = model.requests[0][0]
    assert detect_router_prompt(messages) == used
    # compact: system + question, no examples; full: with the few-shot turns
    assert len(messages) == 2 if used == "compact" else len(messages) > 2
