"""Routing and cost metrics computed from trajectories.

Per question (:func:`routing_record`), from a :class:`~kbrouter.types.Trajectory` and, where the
dataset knows them, the gold KBs in hop order:

* ``retrieval_calls`` (total and ``calls_per_kb``), ``retrieval_steps`` (steps that searched at
  least one KB), ``steps`` (all recorded steps), ``model_calls``;
* ``chosen_kbs``: the KBs searched at each retrieval step, in order;
* against gold KBs: per hop ``i``, the hop is **strictly correct** when retrieval step ``i``
  searched exactly the gold KB, **leniently correct** when the gold KB was among the KBs it
  searched (so static all-KB retrieval is leniently but not strictly right); a gold hop with no
  matching retrieval step counts as wrong. ``sequence_match``: the per-step KBs equal the gold
  list exactly. ``extra_steps`` / ``missing_steps``: retrieval steps beyond / short of the gold
  hop count;
* ``retrieved`` (any retrieval at all) and ``needs_retrieval`` (gold KBs non-empty), from which
  the summary derives "retrieved when not needed" and "answered without retrieving" rates;
* ``prompt_tokens``, ``completion_tokens``, ``seconds`` (wall time of the question),
  ``model_seconds`` and ``retrieval_seconds`` (summed over calls; concurrent calls overlap),
  ``errors`` (failed model calls and retrievals) and ``stop_reason``.

:func:`summarize_routing` averages records into one table row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from kbrouter.types import Trajectory

__all__ = ["routing_record", "summarize_routing"]


def routing_record(traj: Trajectory, gold_kbs: Sequence[str] | None = None) -> dict[str, Any]:
    """Routing and cost facts of one trajectory (see the module docstring)."""
    retrievals = traj.retrievals()
    per_kb = Counter(r.kb for r in retrievals)
    chosen: list[list[str]] = []
    for step in traj.steps:
        if step.retrievals:
            kbs: list[str] = []
            for r in step.retrievals:
                if r.kb not in kbs:
                    kbs.append(r.kb)
            chosen.append(kbs)
    calls = traj.model_calls()
    rec: dict[str, Any] = {
        "retrieval_calls": len(retrievals),
        "calls_per_kb": dict(per_kb),
        "retrieval_steps": len(chosen),
        "steps": len(traj.steps),
        "model_calls": len(calls),
        "chosen_kbs": chosen,
        "retrieved": bool(retrievals),
        "prompt_tokens": traj.prompt_tokens,
        "completion_tokens": traj.completion_tokens,
        "seconds": traj.seconds,
        "model_seconds": sum(c.seconds for c in calls),
        "retrieval_seconds": sum(r.seconds for r in retrievals),
        "errors": sum(1 for c in calls if c.error) + sum(1 for r in retrievals if r.error),
        "stop_reason": traj.stop_reason,
        "gold_kbs": list(gold_kbs) if gold_kbs is not None else None,
        "needs_retrieval": None if gold_kbs is None else bool(gold_kbs),
    }
    if gold_kbs is not None:
        gold = [g.lower() for g in gold_kbs]
        picked = [[k.lower() for k in ks] for ks in chosen]
        strict = [i < len(picked) and picked[i] == [g] for i, g in enumerate(gold)]
        lenient = [i < len(picked) and g in picked[i] for i, g in enumerate(gold)]
        rec.update(
            hops=len(gold),
            hop_correct_strict=strict,
            hop_correct_lenient=lenient,
            sequence_match=picked == [[g] for g in gold],
            extra_steps=max(0, len(picked) - len(gold)),
            missing_steps=max(0, len(gold) - len(picked)),
        )
    return rec


def _mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


def summarize_routing(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Averages over questions: calls per question (total and per KB), steps, rates, cost.

    Rates and accuracies are fractions in [0, 1]; those needing gold KBs are None when no
    question has them. ``kb_accuracy_*`` are hop-level (micro-averaged over gold hops),
    ``kb_accuracy_by_hop_*`` list the accuracy at hop 1, 2, ...
    """
    n = len(records)
    out: dict[str, Any] = {"questions": n}
    if n == 0:
        return out
    kbs = sorted({k for r in records for k in r.get("calls_per_kb", {})})
    out["retrieval_calls_per_question"] = _mean(r["retrieval_calls"] for r in records)
    out["retrieval_calls_per_kb"] = {
        k: sum(r.get("calls_per_kb", {}).get(k, 0) for r in records) / n for k in kbs
    }
    out["retrieval_steps_per_question"] = _mean(r["retrieval_steps"] for r in records)
    out["steps_per_question"] = _mean(r["steps"] for r in records)
    out["model_calls_per_question"] = _mean(r["model_calls"] for r in records)
    out["prompt_tokens_per_question"] = _mean(r["prompt_tokens"] for r in records)
    out["completion_tokens_per_question"] = _mean(r["completion_tokens"] for r in records)
    out["seconds_per_question"] = _mean(r["seconds"] for r in records)
    out["errors_per_question"] = _mean(r.get("errors", 0) for r in records)
    out["no_retrieval_rate"] = _mean(0.0 if r["retrieved"] else 1.0 for r in records)
    out["stop_reasons"] = dict(Counter(r["stop_reason"] for r in records))

    gold = [r for r in records if r.get("gold_kbs") is not None]
    out["with_gold_kbs"] = len(gold)
    not_needed = [r for r in gold if not r["needs_retrieval"]]
    needed = [r for r in gold if r["needs_retrieval"]]
    out["retrieved_when_not_needed"] = _mean(float(r["retrieved"]) for r in not_needed)
    out["answered_without_retrieving"] = _mean(float(not r["retrieved"]) for r in needed)
    strict = [ok for r in needed for ok in r["hop_correct_strict"]]
    lenient = [ok for r in needed for ok in r["hop_correct_lenient"]]
    out["kb_accuracy_strict"] = _mean(float(x) for x in strict)
    out["kb_accuracy_lenient"] = _mean(float(x) for x in lenient)
    max_hops = max((r["hops"] for r in needed), default=0)
    out["kb_accuracy_by_hop_strict"] = [
        _mean(float(r["hop_correct_strict"][i]) for r in needed if r["hops"] > i)
        for i in range(max_hops)
    ]
    out["kb_accuracy_by_hop_lenient"] = [
        _mean(float(r["hop_correct_lenient"][i]) for r in needed if r["hops"] > i)
        for i in range(max_hops)
    ]
    out["sequence_match"] = _mean(float(r["sequence_match"]) for r in needed)
    out["extra_steps_per_question"] = _mean(r["extra_steps"] for r in needed)
    out["missing_steps_per_question"] = _mean(r["missing_steps"] for r in needed)
    return out
