"""The SQL table reader's sandboxed executor on real mkqa-mini tables, and its refusals."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from kbrouter.reading.sql import (
    SQLError,
    SQLReaderConfig,
    coerce_numbers,
    data_tables,
    extract_sql,
    is_total_row,
    number_led,
    quote_columns,
    resolve_column,
    resolve_table,
    run_sql,
    schema_text,
    sort_numbers,
    sql_messages,
)
from kbrouter.types import Table


def _table(shared_data: Path, table_id: str, title: str) -> Table:
    path = shared_data / "mkqa-mini" / "corpus" / "tables" / f"{table_id}.csv"
    with path.open(encoding="utf-8", newline="") as fh:
        header, *rows = list(csv.reader(fh))
    return Table(header=header, rows=rows, title=title)


@pytest.fixture(scope="module")
def countries(shared_data: Path) -> Table:
    return _table(shared_data, "tbl-world-countries", "Countries of the world")


@pytest.fixture(scope="module")
def buses(shared_data: Path) -> Table:
    return _table(shared_data, "tbl-wtq-204-50", "List of Metrobus routes (Washington, D.C.)")


def _one(tables: list[Table], sql: str) -> list[list[str]]:
    return run_sql(tables, sql).table.rows


def test_count_max_and_lookup_over_a_whole_real_table(countries: Table):
    europe = sum(1 for r in countries.rows if r[2] == "Europe")
    assert europe > 40
    assert _one([countries], "SELECT COUNT(*) FROM t WHERE \"region\" = 'Europe'") == [
        [str(europe)]
    ]
    biggest = max(countries.rows, key=lambda r: float(r[4] or 0))[0]
    assert _one([countries], 'SELECT "name" FROM t ORDER BY "area_km2" DESC LIMIT 1') == [[biggest]]
    assert _one([countries], 'SELECT "capital" FROM t WHERE "name" = \'Australia\'') == [
        ["Canberra"]
    ]
    # numeric columns are typed, so comparisons are numeric
    assert 'area_km2" DOUBLE' in schema_text([countries])
    small = sum(1 for r in countries.rows if r[4] and float(r[4]) < 1000)
    assert _one([countries], 'SELECT COUNT(*) FROM t WHERE "area_km2" < 1000') == [[str(small)]]


def test_duplicate_headers_text_numbers_and_two_tables(buses: Table, countries: Table):
    schema = schema_text([buses])
    assert '"Terminals" VARCHAR' in schema and '"Terminals_2" VARCHAR' in schema
    assert '"Route" VARCHAR' in schema  # "32, 36" is not a number
    local = sum(1 for r in buses.rows if r[2] == "Local")
    assert _one([buses], "SELECT COUNT(*) FROM t WHERE \"Fare Type\" = 'Local'") == [[str(local)]]
    # with two tables they are t1 and t2
    rows = _one([buses, countries], "SELECT (SELECT COUNT(*) FROM t1), (SELECT COUNT(*) FROM t2)")
    assert rows == [[str(len(buses.rows)), str(len(countries.rows))]]
    assert "Table t1" in schema_text([buses, countries])


def test_results_are_capped_and_the_prompt_shows_schema_and_question(countries: Table):
    cfg = SQLReaderConfig(max_result_rows=5)
    assert len(run_sql([countries], 'SELECT "name" FROM t', cfg).table.rows) == 5
    msgs = sql_messages("How many countries are in Europe?", [countries], cfg)
    last = msgs[-1].text()
    assert "250 rows" in last and '"region" VARCHAR' in last
    assert last.endswith("Question: How many countries are in Europe?")
    assert msgs[0].role == "system" and "<sql>" in msgs[0].text()


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        ("SELECT * FROM read_csv('/etc/passwd')", "disabled"),
        ("COPY t TO '/tmp/kbrouter-leak.csv'", "only SELECT"),
        ("ATTACH '/tmp/x.db'", "only SELECT"),
        ("DROP TABLE t", "only SELECT"),
        ("SELECT 1; SELECT 2", "one SQL statement"),
        ("SELEC name FROM t", "malformed SQL"),
        ('SELECT "no such column" FROM t', "Binder"),
        ("INSTALL httpfs", "only SELECT"),
    ],
)
def test_refused_or_failing_queries_are_clear_errors(countries: Table, sql: str, problem: str):
    with pytest.raises(SQLError, match=problem):
        run_sql([countries], sql)
    assert not Path("/tmp/kbrouter-leak.csv").exists()


def test_a_query_that_never_ends_is_cut_off(countries: Table):
    cfg = SQLReaderConfig(timeout_seconds=0.5)
    forever = (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r"
    )
    with pytest.raises(SQLError, match="longer than 0.5 s"):
        run_sql([countries], forever, cfg)


def test_extract_sql_from_tags_fences_and_bare_replies():
    assert extract_sql("<sql>SELECT 1;</sql>") == "SELECT 1"
    assert extract_sql("Sure:\n```sql\nSELECT a FROM t\n```") == "SELECT a FROM t"
    assert extract_sql("The query is SELECT COUNT(*) FROM t") == "SELECT COUNT(*) FROM t"
    assert (
        extract_sql("<sql>WITH x AS (SELECT 1) SELECT * FROM x")
        == "WITH x AS (SELECT 1) SELECT * FROM x"
    )
    with pytest.raises(SQLError, match="no SQL query"):
        extract_sql("I do not know.")


def test_bare_multi_word_column_names_are_quoted(buses: Table):
    """`WHERE Fare Type = 'Local'` (a small model's usual mistake) runs as `"Fare Type"`; string
    literals and already quoted names are left alone."""
    local = sum(1 for r in buses.rows if r[2] == "Local")
    rows = run_sql([buses], "SELECT COUNT(*) FROM t WHERE fare type = 'Local'").table.rows
    assert rows == [[str(local)]]
    assert quote_columns("SELECT 'Fare Type', \"Fare Type\" FROM t", [buses]) == (
        "SELECT 'Fare Type', \"Fare Type\" FROM t"
    )


def test_text_comparisons_ignore_case_unless_turned_off(countries: Table):
    """Small models lower-case the values they compare with; the NOCASE collation still finds
    the row (and counts, groups the same way), and the setting turns it off."""
    lookup = 'SELECT "capital" FROM t WHERE "name" = \'australia\''
    assert _one([countries], lookup) == [["Canberra"]]
    europe = sum(1 for r in countries.rows if r[2] == "Europe")
    assert _one([countries], "SELECT COUNT(*) FROM t WHERE \"region\" = 'EUROPE'") == [
        [str(europe)]
    ]
    exact = SQLReaderConfig(case_insensitive=False)
    assert run_sql([countries], lookup, exact).table.rows == []


def test_column_list_names_every_table_and_column_as_queries_write_them(
    buses: Table, countries: Table
):
    from kbrouter.reading.sql import column_list

    listed = column_list([buses, countries])
    assert listed.startswith("t1: ") and "; t2: " in listed
    assert '"capital"' in listed and '"area_km2"' in listed
    assert all(f'"{c}"' in listed for c in [" ".join(h.split()) for h in buses.header if h.strip()])


def test_a_single_value_result_is_written_without_its_header(countries: Table):
    """``count_star()`` over a count: the 0.5B answered with the header; a single value is
    written as ``Result: <value>``, larger results stay a table with their header."""
    from kbrouter.reading.sql import result_text

    count = run_sql([countries], "SELECT COUNT(*) FROM t WHERE \"region\" = 'Europe'").table
    assert count.header == ["count_star()"]
    assert result_text(count) == f"Result: {count.rows[0][0]}"
    two = run_sql([countries], 'SELECT "name", "capital" FROM t WHERE "name" = \'Australia\'')
    assert result_text(two.table) == two.table.render() and "capital" in result_text(two.table)


@pytest.fixture(scope="module")
def cup(shared_data: Path) -> Table:
    return _table(shared_data, "tbl-wtq-203-567", "2002-03 FA Cup")


@pytest.fixture(scope="module")
def comets(shared_data: Path) -> Table:
    return _table(shared_data, "tbl-wtq-203-75", "2003 Houston Comets season")


def test_a_column_written_differently_is_resolved_and_noted(cup: Table):
    """Home_team / "home_team" read as "Home team" (outside string literals); the query runs
    and the result says what was resolved."""
    for sql in [
        "SELECT \"Away team\" FROM t WHERE Home_team = 'Rochdale'",
        'SELECT "Away team" FROM t WHERE "home_team" = \'Rochdale\'',
    ]:
        result = run_sql([cup], sql)
        assert result.table.rows == [["Coventry City"]]
        assert result.fixes and '"Home team"' in result.fixes[0]
        assert result.sql == 'SELECT "Away team" FROM t WHERE "Home team" = \'Rochdale\''
    # a literal that spells the name is left alone
    fixed = resolve_column(
        "SELECT COUNT(*) FROM t WHERE Home_team = 'Home_team'",
        'Binder Error: Referenced column "Home_team" not found in FROM clause!',
        [cup],
    )
    assert fixed == (
        "SELECT COUNT(*) FROM t WHERE \"Home team\" = 'Home_team'",
        'Home_team -> "Home team"',
    )
    with pytest.raises(SQLError, match="Home_team"):
        run_sql(
            [cup], "SELECT * FROM t WHERE Home_team = 'x'", SQLReaderConfig(resolve_columns=False)
        )


def test_a_query_of_the_wrong_table_reads_the_one_with_the_column(cup: Table, comets: Table):
    """Offered two tables, a one-table query naming a column only the other has reads that one;
    a name no table has, or a query of both tables, stays an error."""
    result = run_sql([cup, comets], "SELECT COUNT(*) FROM t1 WHERE Opponent = 'Seattle'")
    assert result.sql == "SELECT COUNT(*) FROM t2 WHERE Opponent = 'Seattle'"
    assert any("t1 -> t2" in f for f in result.fixes)
    assert result.table.rows == [[str(sum(r[1] == "Seattle" for r in comets.rows))]]
    with pytest.raises(SQLError, match="Coach"):
        run_sql([cup, comets], "SELECT Coach FROM t1")
    # a column from each table in a one-table query: no switch settles it; the model's own
    # query's error is reported
    with pytest.raises(SQLError, match='"Home_team" not found'):
        run_sql([cup, comets], "SELECT Opponent FROM t1 WHERE Home_team = 'Rochdale'")
    with pytest.raises(SQLError):  # reads both tables: which one was meant is not known
        run_sql([cup, comets], "SELECT t1.Opponent FROM t1, t2")


def test_a_function_of_the_same_name_is_not_renamed():
    years = Table(header=["Year.", "Date"], rows=[["2003", "2003-01-25"]])
    fixed = resolve_column(
        "SELECT Year FROM t WHERE year(CAST(Date AS DATE)) = 2003",
        'Binder Error: Referenced column "Year" not found in FROM clause!',
        [years],
    )
    assert fixed is not None
    assert fixed[0] == 'SELECT "Year." FROM t WHERE year(CAST(Date AS DATE)) = 2003'


@pytest.fixture(scope="module")
def medals(shared_data: Path) -> Table:
    return _table(shared_data, "tbl-wtq-204-216", "Medal standings")


@pytest.fixture(scope="module")
def gamestorm(shared_data: Path) -> Table:
    return _table(shared_data, "tbl-wtq-203-575", "GameStorm.org")


@pytest.fixture(scope="module")
def seasons(shared_data: Path) -> Table:
    return _table(shared_data, "tbl-wtq-203-508", "Nicolás Terol")


def test_a_final_total_row_is_left_out_of_the_sql_tables(medals: Table, seasons: Table):
    """The medal table ends with ",Total,8,8,8,24": with it, ORDER BY ... LIMIT 1 answers
    "Total" and counts include it; left out (noted), the data rows answer. Off keeps it."""
    assert is_total_row(medals.rows[-1]) and is_total_row(["Total:", "", "3"])
    assert not is_total_row(medals.rows[0]) and not is_total_row(["Total runs", "1"])
    top = 'SELECT "Nation" FROM t ORDER BY "Silver" DESC LIMIT 1'
    assert run_sql([medals], top).table.rows == [["Total"]]
    tables, notes = data_tables([medals])
    assert tables[0].rows == medals.rows[:-1]
    assert notes == ["the last row of t ( | Total) left out"]
    best = max(medals.rows[:-1], key=lambda r: int(r[3]))[1]
    assert run_sql(tables, top).table.rows == [[best]]
    # the seasons table's "Total" row made "Season" text; without it the years are numbers
    tables, _ = data_tables([seasons])
    before_2011 = sum(1 for r in seasons.rows[:-1] if int(r[0]) < 2011)
    assert run_sql(tables, 'SELECT COUNT(*) FROM t WHERE "Season" < 2011').table.rows == [
        [str(before_2011)]
    ]
    assert data_tables([medals], SQLReaderConfig(skip_total_row=False)) == ([medals], [])


def test_a_table_named_by_its_title_or_not_offered_is_resolved(
    medals: Table, countries: Table, gamestorm: Table
):
    """The 0.5B writes a table's title as its name, or "t" over t1 and t2: the name is read as
    the offered table it means, noted. A name that matches nothing stays the model's error."""
    result = run_sql(
        [gamestorm, countries],
        'SELECT "capital" FROM Countries_of_the_world WHERE "name" = \'Australia\'',
    )
    assert result.table.rows == [["Canberra"]]
    assert result.fixes == ["Countries_of_the_world -> t2"]
    # the parser reads the title's last word as an alias; the alias goes with the title
    result = run_sql([medals], 'SELECT COUNT(*) FROM Medal standings WHERE "Gold" > 0')
    assert result.fixes == ["Medal standings -> t"]
    assert result.table.rows == [[str(sum(1 for r in medals.rows if int(r[2]) > 0))]]
    # "t" over two tables: the one with every column the query names; a real alias is kept
    result = run_sql(
        [medals, gamestorm], "SELECT g.Attendance FROM t AS g WHERE Iteration = 'GameStorm 11'"
    )
    assert result.table.rows == [["736"]] and result.fixes == ["t -> t2"]
    assert result.sql == "SELECT g.Attendance FROM t2 AS g WHERE Iteration = 'GameStorm 11'"
    with pytest.raises(SQLError, match="Table with name t does not exist"):  # both have Total
        run_sql([medals, medals], 'SELECT COUNT(*) FROM t WHERE "Total" > 3')
    with pytest.raises(SQLError, match="Table with name t does not exist"):
        run_sql([medals, gamestorm], "SELECT * FROM t", SQLReaderConfig(resolve_tables=False))
    # a common table expression is not an unknown table
    assert resolve_table(
        "WITH x AS (SELECT 1) SELECT * FROM x, y",
        "Catalog Error: Table with name y does not exist!",
        [medals],
    ) == ("WITH x AS (SELECT 1) SELECT * FROM x, t AS y", "y -> t")


def test_a_text_column_used_as_a_number_reads_the_number_each_cell_starts_with(
    gamestorm: Table, shared_data: Path
):
    """GameStorm's attendance is text (the last is "tba"): SUM and a comparison with a number
    fail in DuckDB; read as the number each cell starts with they run (noted), "tba" is NULL.
    Off, the error stays; a text comparison is left alone."""
    assert '"Attendance" VARCHAR' in schema_text([gamestorm])
    total = sum(int(r[3]) for r in gamestorm.rows if r[3].isdigit())
    result = run_sql([gamestorm], 'SELECT SUM("Attendance") FROM t')
    assert result.table.rows == [[str(total)]]
    assert result.fixes == ['numbers read from "Attendance"']
    assert result.sql == 'SELECT SUM(LEADING_NUMBER("Attendance")) FROM t'
    big = [r[0] for r in gamestorm.rows if r[3].isdigit() and int(r[3]) > 900]
    rows = run_sql([gamestorm], "SELECT Iteration FROM t WHERE Attendance > 900").table.rows
    assert [r[0] for r in rows] == big
    with pytest.raises(SQLError, match="sum"):
        run_sql(
            [gamestorm], 'SELECT SUM("Attendance") FROM t', SQLReaderConfig(numbers_in_text=False)
        )
    assert (
        coerce_numbers(
            "SELECT * FROM t WHERE Attendance = 'tba'", "Binder Error: VARCHAR", [gamestorm]
        )
        is None
    )
    # "—" (not charted) is NULL; a chart position is the number the cell starts with
    touch = _table(shared_data, "tbl-wtq-201-0", "A Touch of Class (band)")
    ger = "Peak chart positions GER"
    top10 = [r[1] for r in touch.rows if r[8] != "—" and int(r[8]) <= 10]
    rows = run_sql([touch], f'SELECT "Single" FROM t WHERE "{ger}" BETWEEN 1 AND 10').table.rows
    assert [r[0] for r in rows] == top10
    rows = run_sql([touch], f'SELECT COUNT(*) FROM t WHERE "{ger}" = 1').table.rows
    assert rows == [["1"]]


def test_a_text_column_of_numbers_with_units_is_ordered_by_the_numbers(shared_data: Path):
    """Box office figures are text ("$10.8 billion"): alphabetically "$3.6 billion" (China)
    comes before "$10.8 billion" (Canada/United States); ordered by the numbers the cells start
    with it does not, and MAX/MIN return the cell itself. Dates that start with a day are not
    numbers."""
    office = _table(shared_data, "tbl-wtq-203-448", "Box office by country")
    assert number_led([r[2] for r in office.rows])
    second = 'SELECT "Country" FROM t ORDER BY "Box Office" DESC LIMIT 1 OFFSET 1'
    result = run_sql([office], second)
    assert result.table.rows == [["Canada/United States"]]  # after the World row
    assert result.fixes == ['ordered by the numbers in "Box Office"']
    assert result.sql == (
        'SELECT "Country" FROM t ORDER BY LEADING_NUMBER("Box Office") DESC, "Box Office" DESC '
        "LIMIT 1 OFFSET 1"
    )
    off = SQLReaderConfig(sort_numbers_in_text=False)
    assert run_sql([office], second, off).table.rows == [["China"]]
    # MAX returns the cell as written, the largest by number
    largest = """SELECT MAX("Box Office") FROM t WHERE "Country" <> 'World'"""
    assert _one([office], largest) == [["$10.8 billion"]]
    assert run_sql([office], largest, off).table.rows == [["$3.6 billion"]]
    # MAX(c, n), the n largest as a list, is left as written
    assert run_sql([office], 'SELECT MAX("Box Office", 2) FROM t').fixes == []
    assert sort_numbers('SELECT "Country" FROM t ORDER BY "Country"', [office]) is None
    # day-first dates, and a column of mostly words, are not ordered as numbers
    assert not number_led(["16 May 2010", "13 February 2011", "7 August 2011"])
    assert not number_led(["Winner", "Runner-up", "3rd", "Winner", "Winner"])
    assert number_led(["21:30", "06:15", "9:05", "Destination", "18:00"])


def test_numbers_with_equal_leading_numbers_are_ordered_by_their_text():
    """Times and ISO dates start with a number shared by several cells (the hour, the year):
    ties are ordered by the text, cells that start with no number are not a maximum."""
    t = Table(
        header=["Date", "Time"],
        rows=[
            ["2010-05-16", "21:05"],
            ["2010-11-02", "21:30"],
            ["2011-01-01", "9:05"],
            ["2009-03-03", "N/A"],
            ["2012-02-02", "10:00"],
        ],
    )
    assert _one([t], 'SELECT "Date" FROM t WHERE "Date" > \'2010\' ORDER BY "Date" LIMIT 1') == [
        ["2010-05-16"]
    ]
    assert _one([t], 'SELECT MAX("Time") FROM t') == [["21:30"]]  # not "N/A", not "9:05"
    assert _one([t], 'SELECT MIN("Time") FROM t') == [["9:05"]]
    assert _one([t], 'SELECT "Time" FROM t ORDER BY "Time" DESC LIMIT 2') == [["21:30"], ["21:05"]]


def test_a_repaired_query_is_ordered_by_numbers_too_and_keeps_its_prefixes(gamestorm: Table):
    """The table named by its title, quoted or not, with its name as a column prefix: the
    query runs on t (the name kept as the alias), and its MAX is by numbers."""
    for sql in [
        'SELECT MAX("Attendance") FROM GameStorm_org',
        'SELECT MAX("Attendance") FROM "GameStorm.org"',
        'SELECT GameStorm_org."Attendance" FROM GameStorm_org ORDER BY "Attendance" DESC LIMIT 1',
    ]:
        result = run_sql([gamestorm], sql)
        assert result.table.rows == [["1188"]], sql  # not "tba", and 1188 > 984 as numbers
        assert result.fixes[-1] == 'ordered by the numbers in "Attendance"'
        assert " -> t" in result.fixes[0]


def test_a_query_sqlglot_cannot_handle_is_still_run_or_refused_cleanly(countries: Table):
    """Deep nesting makes sqlglot recurse too far: the rewrites give up, DuckDB decides."""
    deep = "SELECT " + "(" * 300 + "1" + ")" * 300 + " AS one FROM t WHERE \"name\" = 'Chad'"
    assert _one([countries], deep) == [["1"]]
    with pytest.raises(SQLError):
        run_sql([countries], deep.replace('"name"', '"no such column"'))
