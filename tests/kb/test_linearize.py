"""Table linearisation and row blocks."""

from __future__ import annotations

import pytest

from kbrouter.kb.linearize import linearize_table, table_blocks
from kbrouter.types import Table


def test_linearisation_follows_the_paper_format():
    t = Table(header=["Name", "Capital"], rows=[["France", "Paris"], ["Peru", "Lima"]])
    assert linearize_table(t, "Countries") == (
        "[Title] Countries [Header] Name [sep] Capital "
        "[Rows] [Row] France [sep] Paris [Row] Peru [sep] Lima"
    )


def test_title_falls_back_to_table_title_and_cells_are_normalised():
    t = Table(header=["a"], rows=[["x\n  y"]], title="T")
    assert linearize_table(t) == "[Title] T [Header] a [Rows] [Row] x y"
    assert not linearize_table(Table(header=["a"], rows=[])).startswith("[Title]")


def test_blocks_repeat_header_and_cover_all_rows():
    rows = [[str(i), f"v{i}"] for i in range(7)]
    t = Table(header=["i", "v"], rows=rows, title="T")
    blocks = table_blocks(t, 3)
    assert [start for start, _ in blocks] == [0, 3, 6]
    assert all(b.header == ["i", "v"] and b.title == "T" for _, b in blocks)
    assert [r for _, b in blocks for r in b.rows] == rows
    assert "[Header] i [sep] v" in linearize_table(blocks[2][1])


def test_small_table_is_one_block():
    t = Table(header=["a"], rows=[["1"]])
    assert table_blocks(t, 50) == [(0, t)]
    with pytest.raises(ValueError):
        table_blocks(t, 0)
