"""Error attribution on hand-built trajectories: one per stage, plus the summary and the report."""

from __future__ import annotations

import json

from kbrouter.eval.attribution import attribute, attribute_record, summarize_attribution
from kbrouter.types import (
    Evidence,
    Modality,
    ModelCall,
    Query,
    Question,
    Retrieval,
    RouteAction,
    Step,
    Trajectory,
)

Q = "In which city is the national capital of the country whose flag is shown?"
GOLD_KBS = ["image", "table"]
GOLD_EV = ["img-flag-au", "tbl-countries"]
GOLDS = ["Canberra"]


def _ev(kb: str, eid: str, doc: str | None = None) -> Evidence:
    meta = {"doc_id": doc} if doc else {}
    return Evidence(kb=kb, id=eid, score=1.0, text=eid, modality=Modality.TEXT, metadata=meta)


def _step(i: int, hits: dict[str, list[Evidence]], sub_answer: str = "x") -> Step:
    return Step(
        index=i,
        action=RouteAction(sub_question="q", kbs=list(hits)),
        retrievals=[
            Retrieval(kb=kb, query=Query(text="q"), evidence=ev) for kb, ev in hits.items()
        ],
        sub_answer=sub_answer,
    )


def _traj(steps: list[Step], answer: str, stop: str = "answered", **kw) -> Trajectory:
    return Trajectory(
        question=Question(text=Q),
        method="m",
        steps=steps,
        answer=answer,
        stop_reason=stop,
        config={"engine": {"top_k": 2}},
        **kw,
    )


IMAGE_HIT = {"image": [_ev("image", "img-flag-au"), _ev("image", "img-flag-at")]}
TABLE_HIT = {"table": [_ev("table", "tbl-countries#3", doc="tbl-countries")]}


def _stage(traj: Trajectory, **kw) -> str:
    kw.setdefault("gold_kbs", GOLD_KBS)
    kw.setdefault("gold_evidence", GOLD_EV)
    return attribute(traj, GOLDS, **kw).stage


def test_correct_and_format():
    assert _stage(_traj([], "Canberra")) == "correct"
    assert _stage(_traj([], "Canberra, Australia")) == "correct"
    assert _stage(_traj([], "", stop="error", error="final answer call failed: boom")) == "format"
    assert _stage(_traj([_step(0, IMAGE_HIT)], "Sydney", stop="format_fallback")) == "format"
    assert _stage(_traj([_step(0, IMAGE_HIT)], "  ")) == "format"
    failed = ModelCall(purpose="final", messages=[], output="", error="server down")
    assert _stage(_traj([], "Sydney", final_call=failed)) == "format"


def test_early_stop_budget_and_routing():
    blame = attribute(_traj([], "Sydney", stop="no_retrieval"), GOLDS, GOLD_KBS, GOLD_EV)
    assert (blame.stage, blame.hop) == ("early_stop", 1)
    assert "without retrieving" in blame.detail
    # hop 1 right, then stopped: hop 2 not reached
    blame = attribute(_traj([_step(0, IMAGE_HIT)], "Australia"), GOLDS, GOLD_KBS, GOLD_EV)
    assert (blame.stage, blame.hop) == ("early_stop", 2)
    # the same, but the step budget ran out (a budget of one step)
    blame = attribute(
        _traj([_step(0, IMAGE_HIT)], "Australia", stop="budget"), GOLDS, GOLD_KBS, GOLD_EV
    )
    assert (blame.stage, blame.hop) == ("budget", 2)
    # hop 2 went to the text KB instead of the table
    wrong = _step(1, {"text": [_ev("text", "text-australia")]})
    blame = attribute(_traj([_step(0, IMAGE_HIT), wrong], "Sydney"), GOLDS, GOLD_KBS, GOLD_EV)
    assert (blame.stage, blame.hop) == ("routing", 2)
    assert "'table' not searched" in blame.detail
    # hop 1 went to the table KB (and stopped there)
    blame = attribute(_traj([_step(0, TABLE_HIT)], "Sydney"), GOLDS, GOLD_KBS, None)
    assert (blame.stage, blame.hop) == ("routing", 1)


def test_budget_when_the_steps_ran_out_on_repeats():
    steps = [_step(0, IMAGE_HIT), _step(1, IMAGE_HIT), _step(2, IMAGE_HIT)]
    # repeating the image KB: hop 2's table was never searched although steps went on
    assert _stage(_traj(steps, "Sydney", stop="budget")) == "routing"
    # a three-hop gold path and a budget of two covered hops
    steps = [_step(0, IMAGE_HIT), _step(1, TABLE_HIT)]
    blame = attribute(
        _traj(steps, "Sydney", stop="budget"), GOLDS, ["image", "table", "text"], None
    )
    assert (blame.stage, blame.hop) == ("budget", 3)


def test_retrieval_uses_the_shown_top_k_and_document_ids():
    # the gold table came back third: beyond top-k 2, so not shown
    late = {
        "table": [
            _ev("table", "tbl-a"),
            _ev("table", "tbl-b"),
            _ev("table", "tbl-countries#0", doc="tbl-countries"),
        ]
    }
    blame = attribute(
        _traj([_step(0, IMAGE_HIT), _step(1, late)], "Perth"), GOLDS, GOLD_KBS, GOLD_EV
    )
    assert (blame.stage, blame.hop) == ("retrieval", 2)
    assert "'tbl-countries' not shown" in blame.detail
    # with every item shown (top_k None in the config and not given) it is a reading failure
    traj = _traj([_step(0, IMAGE_HIT), _step(1, late)], "Perth")
    traj.config = {}
    assert _stage(traj) == "reading"
    # a row block of the gold table counts as the table
    assert _stage(_traj([_step(0, IMAGE_HIT), _step(1, TABLE_HIT)], "Perth")) == "reading"


def test_reading_and_what_cannot_be_told():
    steps = [_step(0, IMAGE_HIT, "Australia"), _step(1, TABLE_HIT, "Canberra")]
    blame = attribute(_traj(steps, "Australia"), GOLDS, GOLD_KBS, GOLD_EV)
    assert blame.stage == "reading" and blame.final_only is True  # a sub-answer had it
    steps[1].sub_answer = "Sydney"
    assert attribute(_traj(steps, "Sydney"), GOLDS, GOLD_KBS, GOLD_EV).final_only is False
    assert _stage(_traj(steps, "Sydney"), gold_evidence=None) == "retrieval_or_reading"
    assert _stage(_traj(steps, "Sydney"), gold_kbs=None) == "unattributed"


def test_one_all_kb_step_covers_both_hops_when_it_shows_both():
    both = {**IMAGE_HIT, **TABLE_HIT, "text": [_ev("text", "text-a")]}
    assert _stage(_traj([_step(0, both)], "Sydney")) == "reading"
    only_image = {**IMAGE_HIT, "text": [_ev("text", "text-a")]}
    assert _stage(_traj([_step(0, only_image)], "Sydney")) == "early_stop"


def test_summary_shares_sources_and_stored_lines():
    def line(qid: str, source: str, traj: Trajectory, evidence: list[str] | None) -> dict:
        return {
            "id": qid,
            "source": source,
            "golds": GOLDS,
            "gold_kbs": GOLD_KBS,
            "gold_evidence": evidence,
            "scores": {"f1_recall": 1.0 if traj.answer == "Canberra" else 0.0},
            "trajectory": json.loads(traj.model_dump_json()),
        }

    good = _traj([_step(0, IMAGE_HIT), _step(1, TABLE_HIT)], "Canberra")
    read = _traj([_step(0, IMAGE_HIT), _step(1, TABLE_HIT)], "Sydney")
    lines = [
        line("a", "flags", good, GOLD_EV),
        line("b", "flags", read, GOLD_EV),
        line("c", "other", read, None),  # an older line without gold evidence
    ]
    assert attribute_record(lines[1]).stage == "reading"
    summary = summarize_attribution(lines)
    assert summary["questions"] == 3
    assert summary["counts"] == {"correct": 1, "reading": 1, "retrieval_or_reading": 1}
    assert summary["failure_shares"] == {"reading": 0.5, "retrieval_or_reading": 0.5}
    assert summary["by_source"]["flags"]["shares"] == {"correct": 0.5, "reading": 0.5}
    assert summary["not_attributable"] == ["retrieval vs reading (no gold evidence ids)"]
    # gold evidence handed in by id attributes the older line too
    summary = summarize_attribution(lines, {"c": GOLD_EV})
    assert summary["counts"] == {"correct": 1, "reading": 2}
    assert summary["not_attributable"] == []
