"""Routing metrics over (gold label, predicted distribution) pairs. Pure numpy, no plotting.

All take ``golds`` (labels), ``preds`` (decided labels) and, where needed, ``confidences``
(the probability of the decided label) and ``steps`` (the state's step index; hop 1 is step 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kbrouter.types import NONE_LABEL

__all__ = ["expected_calibration_error", "reliability_bins", "routing_scores"]


def reliability_bins(
    correct: Sequence[bool], confidences: Sequence[float], n_bins: int = 10
) -> list[dict[str, float]]:
    """Equal-width confidence bins: count, mean confidence and accuracy of each non-empty bin."""
    conf = np.asarray(confidences, dtype=float)
    ok = np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        if m.any():
            out.append(
                {
                    "lo": float(edges[b]),
                    "hi": float(edges[b + 1]),
                    "n": int(m.sum()),
                    "confidence": float(conf[m].mean()),
                    "accuracy": float(ok[m].mean()),
                }
            )
    return out


def expected_calibration_error(
    correct: Sequence[bool], confidences: Sequence[float], n_bins: int = 10
) -> float | None:
    """ECE of the decided label: sum over bins of |accuracy - confidence| weighted by size."""
    n = len(correct)
    if n == 0:
        return None
    bins = reliability_bins(correct, confidences, n_bins)
    return float(sum(b["n"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins))


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def routing_scores(
    golds: Sequence[str],
    preds: Sequence[str],
    confidences: Sequence[float],
    steps: Sequence[int],
    labels: Sequence[str],
) -> dict[str, Any]:
    """Accuracy (all states and hop 1), per-hop accuracy, per-label precision / recall (``none``
    gives the abstain precision / recall), confusion matrix (rows gold, columns predicted, in
    ``labels`` order plus any other predicted label such as ``invalid``), ECE and ``n``."""
    steps = [int(s) for s in steps]
    n = len(golds)
    correct = [g == p for g, p in zip(golds, preds, strict=True)]
    out: dict[str, Any] = {"n": n}
    out["accuracy"] = _div(sum(correct), n)
    hop1 = [c for c, s in zip(correct, steps, strict=True) if s == 0]
    out["hop1_accuracy"] = _div(sum(hop1), len(hop1))
    out["hop1_n"] = len(hop1)
    max_step = max(steps, default=-1)
    out["accuracy_by_step"] = [
        _div(sum(c for c, s in zip(correct, steps, strict=True) if s == k), steps.count(k))
        for k in range(max_step + 1)
    ]
    per_label: dict[str, dict[str, Any]] = {}
    for lab in labels:
        tp = sum(1 for g, p in zip(golds, preds, strict=True) if g == lab and p == lab)
        n_pred = sum(1 for p in preds if p == lab)
        n_gold = sum(1 for g in golds if g == lab)
        per_label[lab] = {
            "precision": _div(tp, n_pred),
            "recall": _div(tp, n_gold),
            "support": n_gold,
            "predicted": n_pred,
        }
    out["per_label"] = per_label
    out["abstain_precision"] = per_label.get(NONE_LABEL, {}).get("precision")
    out["abstain_recall"] = per_label.get(NONE_LABEL, {}).get("recall")
    cols = list(labels) + sorted({p for p in preds if p not in labels})
    pos = {c: i for i, c in enumerate(cols)}
    matrix = np.zeros((len(labels), len(cols)), dtype=int)
    for g, p in zip(golds, preds, strict=True):
        if g in pos and pos[g] < len(labels):
            matrix[pos[g], pos[p]] += 1
    out["confusion"] = {"rows": list(labels), "columns": cols, "counts": matrix.tolist()}
    out["ece"] = expected_calibration_error(correct, confidences)
    out["reliability"] = reliability_bins(correct, confidences)
    return out
