"""Reciprocal-rank fusion."""

from __future__ import annotations

import pytest

from kbrouter.kb.fusion import reciprocal_rank_fusion


def test_items_in_both_lists_win():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["d", "b", "c"]], k=60)
    assert [x for x, _ in fused][:2] == ["b", "c"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 62)


def test_weights_and_limit():
    fused = reciprocal_rank_fusion([["a"], ["b"]], k=1, weights=[1.0, 3.0], limit=1)
    assert fused == [("b", pytest.approx(1.5))]


def test_ties_are_deterministic_by_best_rank_then_order():
    fused = reciprocal_rank_fusion([["a", "b"], ["b", "a"]], k=60)
    assert [x for x, _ in fused] == ["a", "b"]


def test_bad_arguments():
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([["a"]], k=0)
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([["a"]], weights=[1.0, 2.0])
    assert reciprocal_rank_fusion([]) == []
