"""Table linearisation for retrieval (method.md sec. 6, Open-WikiTable style).

``[Title] t [Header] c1 [sep] c2 ... [Rows] [Row] v11 [sep] v12 ... [Row] v21 [sep] ...``

Large tables are split into blocks of ``rows_per_chunk`` rows; every block repeats the title
and header, so each block is searchable on its own.

Decision: the :class:`~kbrouter.types.Table` carried by a block's evidence holds the header and
**only that block's rows** (plus the title). It is what matched the query, keeps prompts small
for a small reader model, and the evidence metadata names the whole table (``doc_id``,
``row_start``, ``row_end``, ``n_rows``) so a caller can load the rest when it needs it.
A table that fits one block is indexed whole under its own id.
"""

from __future__ import annotations

from kbrouter.types import Table

TITLE, HEADER, ROWS, ROW, SEP = "[Title]", "[Header]", "[Rows]", "[Row]", "[sep]"


def _cell(v: object) -> str:
    return " ".join(str(v).split())


def linearize_table(table: Table, title: str | None = None) -> str:
    """Linearise a table (title from ``title`` or ``table.title``) into one string."""
    title = title if title is not None else table.title
    parts: list[str] = []
    if title:
        parts += [TITLE, _cell(title)]
    parts += [HEADER, f" {SEP} ".join(_cell(h) for h in table.header)]
    parts.append(ROWS)
    for row in table.rows:
        parts += [ROW, f" {SEP} ".join(_cell(c) for c in row)]
    return " ".join(p for p in parts if p != "")


def table_blocks(table: Table, rows_per_chunk: int) -> list[tuple[int, Table]]:
    """Split a table into ``(row_start, block)`` pieces of at most ``rows_per_chunk`` rows.

    Each block keeps the header and title. A table with no rows gives one header-only block.
    """
    if rows_per_chunk <= 0:
        raise ValueError(f"rows_per_chunk must be positive, got {rows_per_chunk}")
    if len(table.rows) <= rows_per_chunk:
        return [(0, table)]
    return [
        (i, Table(header=table.header, rows=table.rows[i : i + rows_per_chunk], title=table.title))
        for i in range(0, len(table.rows), rows_per_chunk)
    ]
