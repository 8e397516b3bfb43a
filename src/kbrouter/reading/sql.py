"""The SQL table reader: a model writes ONE query over the retrieved table(s); DuckDB runs it.

Small models misread tables: they guess counts and miss rows beyond what a prompt shows. With
this reader a step that retrieved tables asks the model for one SQL query instead
(:func:`sql_messages`: each table's schema with inferred column types and a few sample rows),
runs it over the *whole* tables (:func:`run_sql`) and shows the result to the model as
evidence. A query that fails, times out or returns nothing falls back to reading the rows.
Before that, a query DuckDB rejects is repaired where the intent is unambiguous, each repair
noted (``SQLResult.fixes``) and a setting of :class:`SQLReaderConfig`: a column name written
differently (:func:`resolve_column`), a table named by its title or by a name not offered
(:func:`resolve_table`), a text column used as a number (:func:`coerce_numbers`). ORDER BY,
MAX and MIN over a text column of numbers with units order by the numbers
(:func:`sort_numbers`), and a table's final "Total" row is left out of the SQL tables
(:func:`data_tables`).

The sandbox: an in-memory DuckDB database per query holding only the given tables; file
system and network access disabled, extensions neither installed nor loaded, configuration
locked before the query runs; exactly one ``SELECT`` (or ``WITH ... SELECT``) statement; a wall
time limit (the query is interrupted) and a cap on the rows returned. DuckDB is the optional
``reading`` extra, imported on first use.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from kbrouter.errors import KBRouterError
from kbrouter.types import ChatMessage, Table

__all__ = [
    "SQLError",
    "SQLReaderConfig",
    "SQLResult",
    "coerce_numbers",
    "column_list",
    "data_tables",
    "extract_sql",
    "is_total_row",
    "number_led",
    "quote_columns",
    "resolve_column",
    "resolve_table",
    "result_text",
    "run_sql",
    "schema_text",
    "single_value",
    "sort_numbers",
    "sql_messages",
    "table_names",
]


class SQLError(KBRouterError):
    """A model-written query that was refused, failed, or ran out of time."""


class SQLReaderConfig(BaseModel):
    """Settings of the SQL table reader."""

    model_config = ConfigDict(extra="forbid")

    max_tables: int = Field(
        1,
        gt=0,
        description="Most retrieved tables offered to one query (distinct tables, best first). "
        "Offered two, the 0.5B mixes their columns in one query: on the 200 wtq questions 36 "
        "queries named a column their table does not have against 12 offered one, and 133 "
        "queries ran against 110 (benchmarks/results/answers/README.md, section 2).",
    )
    sample_rows: int = Field(3, ge=0, description="Rows per table shown with its schema.")
    max_result_rows: int = Field(20, gt=0, description="Most result rows shown to the model.")
    timeout_seconds: float = Field(2.0, gt=0, description="Wall time limit of one query.")
    max_tokens: int = Field(160, gt=0, description="Token cap of the model's query.")
    retries: int = Field(
        1, ge=0, description="Re-asks with the error after a query that fails (self-correction)."
    )
    case_insensitive: bool = Field(
        True,
        description="Text comparisons, grouping and sorting ignore case (DuckDB's NOCASE "
        "collation): small models write 'st. louis bombers' for 'St. Louis Bombers'.",
    )
    resolve_columns: bool = Field(
        True,
        description="A column name DuckDB does not know is read as the one offered column with "
        "the same words (case, underscores and punctuation aside: 'Home_team' for \"Home team\"), "
        "or a one-table query naming a column only another offered table has is switched to "
        "that table, and the query runs again (noted). On the 200 wtq questions it let 7 to 9 "
        "more queries run (benchmarks/results/answers/README.md, section 2).",
    )
    resolve_tables: bool = Field(
        True,
        description="A table name DuckDB does not know is read as the offered table it names: "
        "its title written as a name ('FROM AFL Cairns', 'FROM Guardian_of_Zion_Award'), or the "
        "only offered table, or the one offered table with every column the query names (the "
        "0.5B writes 'FROM t' over t1 and t2); the query runs again (noted).",
    )
    numbers_in_text: bool = Field(
        True,
        description="A text column the query compares with a number, sums, averages or computes "
        "with is read as the number each cell starts with ('1,182 m' -> 1182, '6th' -> 6, "
        "'N/a' -> NULL) instead of failing (DuckDB does not compare text with numbers); noted.",
    )
    sort_numbers_in_text: bool = Field(
        True,
        description="ORDER BY, MAX and MIN over a text column whose cells start with numbers "
        "('$1,234,567', '6,000 ha', '21:30'; at least 80% of its cells, and not dates that name "
        "a month) order by those numbers, ties by the text, not alphabetically ('9' after "
        "'10'); MAX/MIN return the cell (arg_max/arg_min). Noted.",
    )
    skip_total_row: bool = Field(
        True,
        description="A table's last row that is a 'Total'/'Totals' row (one of its first two "
        "cells) is left out of the SQL tables, so counts, sums and ORDER BY ... LIMIT 1 see the "
        "data rows only (noted). The rows reader still shows it.",
    )
    answer_single_value: bool = Field(
        True,
        description="When the query's result is one value (one row, one column) and the step "
        "shows nothing but tables, that value is the (sub-)answer, without a model call (noted "
        "in the trace). The 0.5B, shown 'Result: 6', answered 'the number of individuals'. See "
        "benchmarks/results/answers/README.md, section 2.",
    )


@dataclass
class SQLResult:
    """A query's result table and how long it took."""

    sql: str
    table: Table
    seconds: float
    fixes: list[str] = field(default_factory=list)
    """The repairs that made the query run, in order (``Home_team -> "Home team"``,
    ``AFL Cairns -> t1``, ``numbers read from "Score"``)."""


_NUM = re.compile(r"^[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?$")


def _number(value: str) -> float | None:
    v = value.strip()
    if not _NUM.match(v):
        return None
    return float(v.replace(",", ""))


def _column_types(table: Table) -> list[str]:
    """``BIGINT`` / ``DOUBLE`` where every non-empty cell is a number, else ``VARCHAR``."""
    types = []
    for j in range(len(table.header)):
        cells = [r[j].strip() for r in table.rows if j < len(r) and r[j].strip()]
        nums = [_number(c) for c in cells]
        if cells and all(n is not None for n in nums):
            if any("." in c for c in cells):
                types.append("DOUBLE")
            elif all(abs(int(c.replace(",", ""))) < 2**63 for c in cells):
                types.append("BIGINT")
            else:  # beyond BIGINT: keep the digits as text
                types.append("VARCHAR")
        else:
            types.append("VARCHAR")
    return types


def _columns(table: Table) -> list[str]:
    """Unique, non-empty column names (``col_3`` for an empty header cell)."""
    used: set[str] = set()
    out = []
    for j, h in enumerate(table.header):
        base = " ".join(str(h).split()) or f"col_{j + 1}"
        name, n = base, 1
        while name.lower() in used:  # e.g. "Score", "Score", "Score_2" -> ..., "Score_3"
            n += 1
            name = f"{base}_{n}"
        used.add(name.lower())
        out.append(name)
    return out


def table_names(tables: Sequence[Table]) -> list[str]:
    """The SQL names of the tables: ``t`` for one table, ``t1``, ``t2``, ... for several."""
    return ["t"] if len(tables) == 1 else [f"t{i}" for i in range(1, len(tables) + 1)]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def schema_text(tables: Sequence[Table], sample_rows: int = 3) -> str:
    """Each table's SQL name, title, columns with types, row count and first rows."""
    parts = []
    for name, table in zip(table_names(tables), tables, strict=True):
        cols = ", ".join(
            f"{_quote(c)} {t}" for c, t in zip(_columns(table), _column_types(table), strict=True)
        )
        head = f"Table {name}" + (f' ("{table.title}")' if table.title else "")
        lines = [f"{head}: {len(table.rows)} rows; columns: {cols}"]
        if sample_rows:
            sample = Table(header=_columns(table), rows=table.rows[:sample_rows])
            lines.append("First rows:\n" + sample.render(max_cell_chars=40))
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


SQL_SYSTEM = (
    "You write one DuckDB SQL query that answers a question from the given table(s). Use only "
    "the tables and columns listed, with column names in double quotes. Count with COUNT(*), "
    "find the largest or smallest with ORDER BY ... LIMIT 1 or MAX/MIN, compare numbers as "
    "numbers. Reply with the query only, inside <sql></sql>."
)
_EXAMPLE_TABLE = Table(
    header=["Year", "Winner", "Goals"],
    rows=[["1990", "Team A", "3"], ["1991", "Team B", "1"], ["1992", "Team A", "2"]],
    title="Cup winners",
)
SQL_EXAMPLE = (
    f"{schema_text([_EXAMPLE_TABLE])}\n\nQuestion: How many times did Team A win?",
    "<sql>SELECT COUNT(*) FROM t WHERE \"Winner\" = 'Team A'</sql>",
)


def sql_messages(
    question: str, tables: Sequence[Table], config: SQLReaderConfig
) -> list[ChatMessage]:
    """The messages asking for one query over ``tables`` (system + one worked example)."""
    return [
        ChatMessage(role="system", content=SQL_SYSTEM),
        ChatMessage(role="user", content=SQL_EXAMPLE[0]),
        ChatMessage(role="assistant", content=SQL_EXAMPLE[1]),
        ChatMessage(
            role="user",
            content=f"{schema_text(tables, config.sample_rows)}\n\nQuestion: "
            + " ".join(question.split()),
        ),
    ]


_TAGGED = re.compile(r"<sql>(.*?)(?:</sql>|$)", re.S | re.I)
_FENCED = re.compile(r"```(?:sql)?\s*(.*?)(?:```|$)", re.S | re.I)
_BARE = re.compile(r"\b((?:SELECT|WITH)\b.*)", re.S | re.I)


def extract_sql(text: str) -> str:
    """The query in a model reply: inside ``<sql>``, a fenced block, or from the first
    SELECT/WITH on. Raises :class:`SQLError` if there is none."""
    for pattern in (_TAGGED, _FENCED, _BARE):
        m = pattern.search(text or "")
        if m and m.group(1).strip():
            return m.group(1).strip().rstrip(";").strip()
    raise SQLError(f"the reply holds no SQL query: {text[:120]!r}")


_SIMPLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LITERAL = re.compile(r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\")")


def quote_columns(sql: str, tables: Sequence[Table]) -> str:
    """Double-quote column names that need quotes (spaces, punctuation) where a query wrote
    them bare, outside string literals and quoted names: small models write
    ``WHERE Preliminary Points > 460`` for the column ``"Preliminary Points"``."""
    names = sorted(
        {c for t in tables for c in _columns(t) if not _SIMPLE_NAME.match(c)}, key=len, reverse=True
    )
    if not names:
        return sql
    pattern = re.compile(
        r"(?<![\w\"])(" + "|".join(re.escape(n) for n in names) + r")(?![\w\"])", re.I
    )
    by_lower = {n.lower(): n for n in names}
    parts = _LITERAL.split(sql)  # odd indices: literals and quoted names, left alone
    for i in range(0, len(parts), 2):
        parts[i] = pattern.sub(lambda m: _quote(by_lower[m.group(1).lower()]), parts[i])
    return "".join(parts)


_UNKNOWN_COLUMN = re.compile(r'(?:Referenced column|does not have a column named) "([^"]+)"')


def _name_key(name: str) -> str:
    return " ".join(re.sub(r"[\W_]+", " ", name).split()).casefold()


def _outside_literals(sql: str, bare: re.Pattern[str], quoted: str, repl: str) -> str:
    """``sql`` with ``bare`` matches and the quoted name ``quoted`` (case aside) replaced by
    ``repl``, outside string literals."""
    parts = _LITERAL.split(sql)  # odd indices: string literals and quoted names
    for i, part in enumerate(parts):
        if i % 2 == 0:
            parts[i] = bare.sub(lambda _m: repl, part)
        elif part.startswith('"') and part[1:-1].replace('""', '"').casefold() == quoted:
            parts[i] = repl
    return "".join(parts)


def _word(name: str) -> re.Pattern[str]:
    """``name`` as a bare identifier: not part of a longer name, not a function call."""
    return re.compile(r"(?<![\w\"])" + re.escape(name) + r"(?![\w\"]|\s*\()", re.I)


def resolve_column(sql: str, error: str, tables: Sequence[Table]) -> tuple[str, str] | None:
    """For a DuckDB error naming a column that does not exist, ``(query, fix)`` when exactly one
    column of ``tables`` has the same letters and digits (case, spaces, underscores and
    punctuation aside):

    * the query names that column differently (``Home_team``): the name is replaced;
    * the column is in another of the tables while the query reads one table only (small models
      query ``t1`` when the answer is in ``t2``): the query reads that table instead.

    Outside string literals. None when the error names no column, or no column or more than
    one matches, or nothing would change."""
    m = _UNKNOWN_COLUMN.search(error)
    if m is None:
        return None
    wrong = m.group(1)
    key = _name_key(wrong)
    names = table_names(tables)
    owners = {
        (name, c)
        for name, t in zip(names, tables, strict=True)
        for c in _columns(t)
        if _name_key(c) == key
    }
    if not key or len({c for _, c in owners}) != 1 or len({n for n, _ in owners}) != 1:
        return None
    owner, right = next(iter(owners))
    fixed, fixes = sql, []
    if right.casefold() != wrong.casefold():
        fixed = _outside_literals(fixed, _word(wrong), wrong.casefold(), _quote(right))
        fixes.append(f"{wrong} -> {_quote(right)}")
    read = [n for n in names if _word(n).search("".join(_LITERAL.split(fixed)[::2]))]
    if len(tables) > 1 and len(read) == 1 and read[0] != owner:
        fixed = _outside_literals(fixed, _word(read[0]), read[0], owner)
        fixes.append(f"{read[0]} -> {owner} (the table with {_quote(right)})")
    if fixed == sql:
        return None
    return fixed, "; ".join(fixes)


def _parse(sql: str):  # -> sqlglot Expression | None
    """``sql`` parsed by sqlglot (DuckDB dialect), None if it cannot be parsed."""
    try:
        import sqlglot
    except ImportError as e:  # pragma: no cover - the optional extra
        raise SQLError("the SQL table reader needs sqlglot: pip install 'kbrouter[reading]'") from e
    try:
        return sqlglot.parse_one(sql, read="duckdb")
    except Exception:  # noqa: BLE001 - parse errors, and e.g. RecursionError on deep nesting
        return None


def _rewrite(repair, *args) -> tuple[str, str] | None:  # noqa: ANN001
    """``repair(*args)``, None if it fails: a rewrite is an attempt, never a new error."""
    try:
        return repair(*args)
    except SQLError:
        raise  # a missing extra
    except Exception:  # noqa: BLE001 - sqlglot on an odd query (RecursionError, TypeError ...)
        return None


_UNKNOWN_TABLE = re.compile(r"Table with name (.+?) does not exist")


def resolve_table(sql: str, error: str, tables: Sequence[Table]) -> tuple[str, str] | None:
    """For a DuckDB error naming a table that does not exist, ``(query, fix)`` with each unknown
    table name replaced by the offered table it means:

    * the table whose title it writes as a name (``FROM AFL Cairns``, ``Guardian_of_Zion_Award``;
      the parser may read the title's last word as an alias);
    * else the only offered table;
    * else the one offered table that has every column the query names (``FROM t`` over t1, t2).

    None when the error names no table, the query cannot be parsed, or a name stays unresolved.
    """
    if _UNKNOWN_TABLE.search(error) is None:
        return None
    tree = _parse(sql)
    if tree is None:
        return None
    from sqlglot import exp

    names = table_names(tables)
    known = {n.casefold() for n in names} | {
        cte.alias.casefold() for cte in tree.find_all(exp.CTE) if cte.alias
    }
    named = {_name_key(c.name) for c in tree.find_all(exp.Column)}
    with_all = [
        n
        for n, t in zip(names, tables, strict=True)
        if named <= {_name_key(c) for c in _columns(t)}
    ]
    fixes = []
    for node in list(tree.find_all(exp.Table)):
        if not node.name or node.name.casefold() in known:
            continue
        target, wrote = None, node.name
        for cand in [f"{node.name} {node.alias}", node.name] if node.alias else [node.name]:
            hits = [
                n
                for n, t in zip(names, tables, strict=True)
                if t.title and _name_key(t.title) == _name_key(cand)
            ]
            if len(hits) == 1:
                target, wrote = hits[0], cand
                break
        if target is None and len(names) == 1:
            target = names[0]
        if target is None and len(with_all) == 1:
            target = with_all[0]
        if target is None:
            return None
        if wrote != node.name:  # the parser's alias was the title's last word
            node.set("alias", None)
        elif not node.alias:  # columns may be prefixed with the name written
            node.set("alias", exp.TableAlias(this=exp.to_identifier(node.name)))
        node.set("this", exp.to_identifier(target))
        node.set("db", None)
        fixes.append(f"{wrote} -> {target}")
    if not fixes:
        return None
    return tree.sql(dialect="duckdb"), "; ".join(fixes)


def _per_column(tree, tables: Sequence[Table], fact) -> Callable:  # noqa: ANN001
    """A lookup of ``fact(table, column index, column type)`` for a column reference of the
    parsed query ``tree``: by its table prefix (an alias or a table name), else over the
    tables the query reads; None when unknown or the tables disagree."""
    from sqlglot import exp

    facts = {
        (name, c.casefold()): fact(t, j, ty)
        for name, t in zip(table_names(tables), tables, strict=True)
        for j, (c, ty) in enumerate(zip(_columns(t), _column_types(t), strict=True))
    }
    aliases = {n.alias_or_name.casefold(): n.name.casefold() for n in tree.find_all(exp.Table)}
    read = set(aliases.values())

    def lookup(col: exp.Column):  # noqa: ANN202
        name = col.name.casefold()
        if col.table:
            return facts.get((aliases.get(col.table.casefold(), col.table.casefold()), name))
        found = {facts[(t, name)] for t in read if (t, name) in facts}
        return found.pop() if len(found) == 1 else None

    return lookup


NUMBER_MACRO = "leading_number"
"""The sandbox macro reading the number a text cell starts with, after a currency sign
(``'$1,234'`` -> 1234; NULL if it starts with none)."""


def coerce_numbers(sql: str, error: str, tables: Sequence[Table]) -> tuple[str, str] | None:
    """For a DuckDB error about a text (VARCHAR) column used as a number (a type error, or a cell
    that cannot be converted), ``(query, fix)`` with each text column the query compares with a
    number (``BETWEEN`` too), sums, averages or computes with read as ``leading_number(column)``:
    the number its cell starts with (``'1,182 m'`` -> 1182, ``'6th'`` -> 6, ``'N/a'`` -> NULL).
    None when the query cannot be parsed or nothing changes."""
    if "VARCHAR" not in error and "Could not convert string" not in error:
        return None
    tree = _parse(sql)
    if tree is None:
        return None
    from sqlglot import exp

    col_type = _per_column(tree, tables, lambda _t, _j, ty: ty)

    def numeric(e: exp.Expression | None) -> bool:
        if isinstance(e, exp.Neg):
            e = e.this
        if isinstance(e, exp.Literal):
            return e.is_number
        if isinstance(e, exp.Column):
            return col_type(e) in ("BIGINT", "DOUBLE")
        return isinstance(e, exp.Anonymous) and e.name == NUMBER_MACRO

    read_as_numbers = []
    for col in list(tree.find_all(exp.Column)):
        if col_type(col) != "VARCHAR":
            continue
        p = col.parent
        if isinstance(p, (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)):
            use = numeric(p.expression if p.this is col else p.this)
        elif isinstance(p, exp.Between):
            use = p.this is col and numeric(p.args.get("low")) and numeric(p.args.get("high"))
        else:
            use = isinstance(p, (exp.Sum, exp.Avg, exp.Add, exp.Sub, exp.Mul, exp.Div))
        if use:
            col.replace(exp.Anonymous(this=NUMBER_MACRO, expressions=[col.copy()]))
            read_as_numbers.append(_quote(col.name))
    if not read_as_numbers:
        return None
    return tree.sql(dialect="duckdb"), "numbers read from " + ", ".join(
        dict.fromkeys(read_as_numbers)
    )


_LEADING_NUMBER = re.compile(r"^\s*[$£€¥]?\s*[-+]?[0-9][0-9,]*(\.[0-9]+)?")
_MONTH = re.compile(
    r"\b(jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?(\s|,|$)", re.I
)


def number_led(cells: Sequence[str], share: float = 0.8) -> bool:
    """Whether a text column's cells are numbers with units or marks around them: at least
    ``share`` of its non-empty cells start with a number (after a currency sign), and at most
    a fifth name a month (``16 May 2010`` starts with a number but is a date)."""
    cells = [c for c in cells if c.strip()]
    if len(cells) < 2 or sum(bool(_MONTH.search(c)) for c in cells) > len(cells) / 5:
        return False
    return sum(bool(_LEADING_NUMBER.match(c)) for c in cells) >= share * len(cells)


def sort_numbers(sql: str, tables: Sequence[Table]) -> tuple[str, str] | None:
    """``(query, fix)`` with ORDER BY, MAX and MIN over a :func:`number_led` text column of
    ``tables`` ordering by ``leading_number(column)`` and then by the text (ties: '21:05' before
    '21:30'); ``MAX(c)`` becomes ``arg_max(c, (leading_number(c), c))`` over the cells that
    start with a number, so the cell itself is returned. None when nothing changes or the
    query cannot be parsed."""
    tree = _parse(sql)
    if tree is None:
        return None
    import sqlglot
    from sqlglot import exp

    is_led = _per_column(
        tree,
        tables,
        lambda t, j, ty: (
            ty == "VARCHAR" and number_led([r[j] if j < len(r) else "" for r in t.rows])
        ),
    )
    sorted_by = []
    for col in list(tree.find_all(exp.Column)):
        p = col.parent
        if not isinstance(p, (exp.Ordered, exp.Max, exp.Min)) or p.this is not col:
            continue
        if isinstance(p, (exp.Max, exp.Min)) and any(v for k, v in p.args.items() if k != "this"):
            continue  # MAX(c, n): a list of the n largest, left as written
        if not is_led(col):
            continue
        c = col.sql(dialect="duckdb")
        if isinstance(p, exp.Ordered):
            # the number, then the text for ties ('21:05' before '21:30', same-year ISO dates)
            tie = p.copy()
            p.set("this", exp.Anonymous(this=NUMBER_MACRO, expressions=[col.copy()]))
            order = p.parent
            at = next(i for i, e in enumerate(order.expressions) if e is p)
            order.set(
                "expressions", [*order.expressions[: at + 1], tie, *order.expressions[at + 1 :]]
            )
        else:
            arg = "arg_max" if isinstance(p, exp.Max) else "arg_min"
            p.replace(
                sqlglot.parse_one(
                    f"{arg}({c}, ({NUMBER_MACRO}({c}), {c})) "
                    f"FILTER (WHERE {NUMBER_MACRO}({c}) IS NOT NULL)",
                    read="duckdb",
                )
            )
        sorted_by.append(_quote(col.name))
    if not sorted_by:
        return None
    return tree.sql(dialect="duckdb"), "ordered by the numbers in " + ", ".join(
        dict.fromkeys(sorted_by)
    )


_TOTALS = {"total", "totals", "grand total"}


def is_total_row(row: Sequence[str]) -> bool:
    """A summary row: one of its first two cells says ``Total``/``Totals`` (a colon aside)."""
    return any(str(c).strip().rstrip(":").strip().casefold() in _TOTALS for c in row[:2])


def data_tables(
    tables: Sequence[Table], config: SQLReaderConfig | None = None
) -> tuple[list[Table], list[str]]:
    """The tables as the SQL reader queries them, with a note per change: with
    ``skip_total_row`` a last row that :func:`is_total_row` is left out."""
    cfg = config or SQLReaderConfig()
    out, notes = [], []
    for name, table in zip(table_names(tables), tables, strict=True):
        if cfg.skip_total_row and len(table.rows) > 1 and is_total_row(table.rows[-1]):
            out.append(table.model_copy(update={"rows": table.rows[:-1]}))
            notes.append(f"the last row of {name} ({' | '.join(table.rows[-1][:2])}) left out")
        else:
            out.append(table)
    return out, notes


def column_list(tables: Sequence[Table]) -> str:
    """Each table's SQL name and its column names, quoted as a query must write them."""
    return "; ".join(
        f"{name}: " + ", ".join(_quote(c) for c in _columns(table))
        for name, table in zip(table_names(tables), tables, strict=True)
    )


def _connect(tables: Sequence[Table], case_insensitive: bool = True):  # -> DuckDBPyConnection
    try:
        import duckdb
    except ImportError as e:  # pragma: no cover - the optional extra
        raise SQLError("the SQL table reader needs DuckDB: pip install 'kbrouter[reading]'") from e
    con = duckdb.connect(
        ":memory:",
        config={
            "enable_external_access": False,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "threads": 1,
            "memory_limit": "256MB",
            **({"default_collation": "nocase"} if case_insensitive else {}),
        },
    )
    for name, table in zip(table_names(tables), tables, strict=True):
        cols, types = _columns(table), _column_types(table)
        con.execute(
            f"CREATE TABLE {name} ("
            + ", ".join(f"{_quote(c)} {t}" for c, t in zip(cols, types, strict=True))
            + ")"
        )
        rows = []
        for r in table.rows:
            cells = [(r[j] if j < len(r) else "").strip() for j in range(len(cols))]
            row: list[object] = []
            for c, t in zip(cells, types, strict=True):
                if t == "VARCHAR":
                    row.append(c or None)
                else:
                    n = _number(c) if c else None
                    if n is None:
                        row.append(None)
                    else:
                        row.append(int(c.replace(",", "")) if t == "BIGINT" else n)
            rows.append(row)
        if rows:
            con.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' * len(cols))})", rows)
    con.execute(
        f"CREATE MACRO {NUMBER_MACRO}(x) AS TRY_CAST(regexp_replace(regexp_extract("
        f"CAST(x AS VARCHAR), '{_LEADING_NUMBER.pattern}'), '[^0-9.+-]', '', 'g') AS DOUBLE)"
    )
    con.execute("SET lock_configuration = true")
    return con


def run_sql(tables: Sequence[Table], sql: str, config: SQLReaderConfig | None = None) -> SQLResult:
    """Run one read-only query over ``tables`` in a fresh sandbox (see the module docstring).

    Raises :class:`SQLError` for anything but exactly one SELECT, for a query DuckDB rejects,
    and when the time limit interrupts it.
    """
    try:
        import duckdb
    except ImportError as e:  # pragma: no cover - the optional extra
        raise SQLError("the SQL table reader needs DuckDB: pip install 'kbrouter[reading]'") from e

    cfg = config or SQLReaderConfig()
    if any(not t.header for t in tables):
        raise SQLError("a retrieved table has no columns")
    sql = quote_columns(sql, tables)
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise SQLError(f"malformed SQL: {e}") from None
    if len(statements) != 1:
        raise SQLError(f"expected one SQL statement, got {len(statements)}")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise SQLError(f"only SELECT queries are run, not {statements[0].type.name}")
    t0 = time.perf_counter()
    try:
        con = _connect(tables, cfg.case_insensitive)
    except duckdb.Error as e:
        raise SQLError(f"cannot load the table(s): {str(e).splitlines()[0][:200]}") from None
    timer = threading.Timer(cfg.timeout_seconds, con.interrupt)
    timer.start()
    fixes: list[str] = []
    tried = {sql}
    first: duckdb.Error | None = None  # the model's own query's error
    try:
        while True:
            ordered = _rewrite(sort_numbers, sql, tables) if cfg.sort_numbers_in_text else None
            if ordered is not None:
                try:
                    cur = con.execute(ordered[0])
                    sql = ordered[0]
                    fixes.append(ordered[1])
                    break
                except duckdb.InterruptException:
                    raise
                except duckdb.Error:
                    pass  # the rewrite does not run: the query as written decides
            try:
                cur = con.execute(sql)
                break
            except (
                duckdb.BinderException,
                duckdb.CatalogException,
                duckdb.ConversionException,
            ) as e:
                first = first or e
                resolved = None
                for enabled, repair in (
                    (cfg.resolve_columns, resolve_column),
                    (cfg.resolve_tables, resolve_table),
                    (cfg.numbers_in_text, coerce_numbers),
                ):
                    if enabled and len(fixes) < 5:
                        resolved = _rewrite(repair, sql, str(e), tables)
                        if resolved is not None and resolved[0] not in tried:
                            break
                        resolved = None
                if resolved is None:  # nothing new to try: the model's own error
                    raise first from None
                sql, fix = resolved
                tried.add(sql)
                fixes.append(fix)
        header = [d[0] for d in cur.description or []]
        rows = cur.fetchmany(cfg.max_result_rows)
    except duckdb.InterruptException:
        raise SQLError(
            f"the query ran longer than {cfg.timeout_seconds:g} s and was stopped"
        ) from None
    except duckdb.Error as e:
        raise SQLError(f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    finally:
        timer.cancel()
        con.close()
    out = Table(header=[str(h) for h in header], rows=[[_cell(v) for v in r] for r in rows])
    return SQLResult(sql=sql, table=out, seconds=time.perf_counter() - t0, fixes=fixes)


def single_value(table: Table) -> str | None:
    """The value of a one-row, one-column query result, else None."""
    if len(table.rows) == 1 and len(table.header) == 1 and len(table.rows[0]) == 1:
        return table.rows[0][0]
    return None


def result_text(table: Table) -> str:
    """A query result as the model reads it. A single value is written as ``Result: <value>``
    without its column header: under a header such as ``count_star()`` the 0.5B answered with
    the header (30 of 200 wtq answers). Larger results are rendered as a table."""
    value = single_value(table)
    return table.render() if value is None else f"Result: {value}"


def _cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)
