"""Evidence readers a policy can put between retrieval and the sub-answer (a setting of the
policy, recorded with its results).

``table_reader = "rows"`` (default)
    Tables are shown to the model as rows (the first rows of each retrieved block).
``table_reader = "sql"``
    When a step retrieved tables, the model writes one SQL query over the whole tables (the
    best ``SQLReaderConfig.max_tables`` distinct tables, one by default; every block of each,
    fetched by id; a final "Total" row left out) and DuckDB runs it in a sandbox
    (:mod:`kbrouter.reading.sql`, which repairs a rejected query where the intent is clear);
    the result replaces the table rows in the evidence shown. A
    failed, refused, timed-out or empty query falls back to the rows. The query call is in
    ``step.read_calls`` and the step's notes say what happened. A result that is one value
    answers the step by itself when the step shows nothing but tables
    (``SQLReaderConfig.answer_single_value``; :func:`query_answer`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from kbrouter.errors import KBRouterError
from kbrouter.reading.sql import (
    SQLError,
    SQLReaderConfig,
    column_list,
    data_tables,
    extract_sql,
    result_text,
    run_sql,
    single_value,
    sql_messages,
)
from kbrouter.types import (
    ChatMessage,
    Evidence,
    Modality,
    Query,
    Question,
    SamplingParams,
    Step,
    Table,
)

if TYPE_CHECKING:
    from kbrouter.policies.base import Policy, Runtime

__all__ = ["TableReader", "query_answer", "read_tables"]

TableReader = Literal["rows", "sql"]


async def _whole_table(ev: Evidence, text: str, rt: Runtime) -> Table:
    """Every row of the table ``ev`` is a block of (fetched by id; the block itself if the KB
    cannot fetch)."""
    assert ev.table is not None
    lookup = getattr(rt, "lookup", None)
    if lookup is not None:
        got = await lookup(ev.kb, [ev.doc_id], Query(text=text))
        blocks = [e.table for e in got.evidence if e.table is not None]
        if not got.error and blocks:
            return Table(
                header=blocks[0].header,
                rows=[r for b in blocks for r in b.rows],
                title=blocks[0].title or ev.title,
            )
    return Table(header=ev.table.header, rows=ev.table.rows, title=ev.table.title or ev.title)


async def read_tables(
    policy: Policy,
    question: Question,
    text: str,
    evidence: list[Evidence],
    rt: Runtime,
    step: Step,
    config: SQLReaderConfig,
) -> list[Evidence]:
    """The evidence to show for ``text`` with the SQL table reader (see the module docstring)."""
    tables: list[Evidence] = []
    for ev in evidence:
        known = {t.doc_id for t in tables}
        if ev.modality == Modality.TABLE and ev.table is not None and ev.doc_id not in known:
            tables.append(ev)
    tables = tables[: config.max_tables]
    if not tables:
        return evidence
    whole, changes = data_tables([await _whole_table(ev, text, rt) for ev in tables], config)
    for change in changes:
        policy._note(rt, question, step, f"table reader: {change}")
    docs = [t.doc_id for t in tables]
    messages = sql_messages(text, whole, config)
    params = SamplingParams(max_tokens=config.max_tokens)
    for attempt in range(config.retries + 1):
        call = await rt.chat("read", messages, params)
        step.read_calls.append(call)
        try:
            if call.error:
                raise SQLError(f"the query call failed: {call.error}")
            sql = extract_sql(call.output)
            result = await asyncio.to_thread(run_sql, whole, sql, config)
            if not result.table.rows or not any(c.strip() for r in result.table.rows for c in r):
                raise SQLError(f"the query {sql!r} returned nothing")
            break
        except KBRouterError as e:
            if call.error or attempt == config.retries:
                policy._note(rt, question, step, f"table reader: {e}; reading the rows instead")
                return evidence
            policy._note(rt, question, step, f"table reader: {e}; asking for a corrected query")
            messages = [
                *messages,
                ChatMessage(role="assistant", content=call.output),
                ChatMessage(
                    role="user",
                    content=f"That query failed: {e}. Write one corrected query for the same "
                    f"question, using only these columns, in double quotes: {column_list(whole)}. "
                    "Reply inside <sql></sql>.",
                ),
            ]
    n = len(result.table.rows)
    policy._note(
        rt,
        question,
        step,
        f"table reader: SQL {result.sql!r} over {', '.join(docs)} -> {n} row(s) "
        f"({result.seconds * 1000:.0f} ms)"
        + (f"; query rewritten: {'; '.join(result.fixes)}" if result.fixes else ""),
    )
    single = single_value(result.table) is not None
    titles = ", ".join(f'"{t.title}"' for t in whole if t.title) or ", ".join(docs)
    answer = Evidence(
        kb=tables[0].kb,
        id="sql:" + "+".join(docs),
        score=1.0,
        # a single value is shown as "Result: <value>" (no table, so no header to copy)
        text=result_text(result.table) if single else f"{result.sql}\n{result.table.render()}",
        title=f"Result of the SQL query {result.sql} over {titles}",
        modality=Modality.TABLE,
        table=None if single else result.table,
        metadata={
            "reader": "sql",
            "sql": result.sql,
            "doc_ids": docs,
            **({"value": single_value(result.table)} if single else {}),
        },
    )
    # the queried tables' rows are replaced by the result; other evidence stays
    return [
        answer,
        *(e for e in evidence if not (e.modality == Modality.TABLE and e.doc_id in docs)),
    ]


def query_answer(evidence: Sequence[Evidence], config: SQLReaderConfig) -> str | None:
    """The answer a step's evidence gives without a model call: the SQL reader's result when it
    is one value and the step shows nothing but tables (the result first, then tables the
    query was not offered); None otherwise, or when ``config.answer_single_value`` is off.
    R1-Router checks it before ``carry_identified`` adds the identified image item."""
    if not config.answer_single_value or not evidence:
        return None
    first = evidence[0]
    value = first.metadata.get("value") if first.metadata.get("reader") == "sql" else None
    if not isinstance(value, str) or not value.strip():
        return None
    if any(e.modality != Modality.TABLE for e in evidence[1:]):
        return None  # a passage or an image may say otherwise: the model reads them all
    return value.strip()
