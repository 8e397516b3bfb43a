"""Source readers: formats, relative paths, and every kind of bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from kb_helpers import PASSAGES, make_images, make_tables, write_jsonl

from kbrouter.errors import DataError
from kbrouter.kb.ingest import IngestReport, read_images, read_passages, read_tables


def test_jsonl_csv_and_parquet_give_the_same_passages(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = PASSAGES[:3]
    write_jsonl(tmp_path / "p.jsonl", rows)
    import csv

    with (tmp_path / "p.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "title", "text"])
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    got = [
        [(p.id, p.title, p.text) for p in read_passages(tmp_path / f"p.{ext}")]
        for ext in ("jsonl", "csv", "parquet")
    ]
    assert got[0] == got[1] == got[2] == [(r["id"], r["title"], r["text"]) for r in rows]


def test_missing_file_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="not found"):
        read_passages(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="not found"):
        read_tables(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="not found"):
        read_images(tmp_path / "nope.jsonl")


def test_unknown_suffix_needs_a_format(tmp_path: Path):
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(DataError, match="source.format"):
        read_passages(tmp_path / "p.txt")


def test_unreadable_file_is_a_data_error(tmp_path: Path):
    path = write_jsonl(tmp_path / "p.jsonl", PASSAGES)
    (tmp_path / "bin.jsonl").write_bytes(b'{"id": "a", "text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="UTF-8"):
        read_passages(tmp_path / "bin.jsonl")
    if os.geteuid() != 0:  # root can read anything
        path.chmod(0)
        with pytest.raises(DataError, match="cannot read"):
            read_passages(path)


def test_empty_corpus_is_a_data_error(tmp_path: Path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty corpus"):
        read_passages(tmp_path / "empty.jsonl")


def test_duplicate_ids_name_both_lines(tmp_path: Path):
    path = write_jsonl(tmp_path / "p.jsonl", [PASSAGES[0], PASSAGES[1], PASSAGES[0]])
    with pytest.raises(DataError, match=r"duplicate id 'p1'.*p\.jsonl:1.*p\.jsonl:3"):
        read_passages(path)


def test_bad_rows_are_reported_with_file_and_line_and_skipped(tmp_path: Path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps(PASSAGES[0])
        + "\n{broken json\n"
        + json.dumps({"id": "x", "title": "no text"})
        + "\n\n"
        + json.dumps({"text": "no id"})
        + "\n[1, 2]\n"
        + json.dumps(PASSAGES[1])
        + "\n",
        encoding="utf-8",
    )
    report = IngestReport()
    got = read_passages(path, report=report)
    assert [p.id for p in got] == ["p1", "p2"]
    assert [b.line for b in report.bad_rows] == [2, 3, 5, 6]
    assert "invalid JSON" in report.bad_rows[0].reason
    assert "'text'" in report.bad_rows[1].reason
    assert str(report.bad_rows[0]).startswith(f"{path}:2:")


def test_bad_row_is_fatal_with_on_bad_row_fail(tmp_path: Path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(PASSAGES[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"p\.jsonl:2: invalid JSON"):
        read_passages(path, on_bad_row="fail")


def test_csv_bad_rows_report_their_line(tmp_path: Path):
    path = tmp_path / "p.csv"
    path.write_text('id,title,text\na,A,hello\nb,B,\nc,C,"x",extra\nd,D,"multi\nline"\n')
    report = IngestReport()
    got = read_passages(path, report=report)
    assert [p.id for p in got] == ["a", "d"]
    assert [b.line for b in report.bad_rows] == [3, 4]
    with pytest.raises(DataError, match="header lacks"):
        (tmp_path / "h.csv").write_text("key,body\n1,x\n")
        read_passages(tmp_path / "h.csv")


def test_tables_resolve_paths_relative_to_the_manifest(tmp_path: Path):
    data = tmp_path / "deep" / "data"
    manifest = write_jsonl(data / "tables.jsonl", make_tables(data))
    tables = read_tables(manifest)
    assert [t.id for t in tables] == ["tbl-countries", "tbl-cup"]
    assert tables[0].table.header == ["name", "capital", "area_km2"]
    assert tables[0].table.rows[0] == ["France", "Paris", "551695"]
    assert tables[1].table.header == ["year", "winner"]  # TSV
    assert tables[0].table.title == "Countries and capitals"


def test_table_with_missing_file_or_ragged_rows(tmp_path: Path):
    data = tmp_path / "data"
    rows = make_tables(data)
    rows.append({"id": "tbl-gone", "title": "Gone", "path": "tables/gone.csv"})
    (data / "tables" / "countries.csv").write_text("a,b\n1\n2,3,4\n5,6\n")
    manifest = write_jsonl(data / "tables.jsonl", rows)
    report = IngestReport()
    tables = read_tables(manifest, report=report)
    assert [t.id for t in tables] == ["tbl-countries", "tbl-cup"]
    assert tables[0].table.rows == [["1", ""], ["5", "6"]]  # short row padded, long row skipped
    reasons = [str(b) for b in report.bad_rows]
    assert any("countries.csv:3" in r for r in reasons)
    assert any("tables.jsonl:3" in r and "not found" in r for r in reasons)
    with pytest.raises(DataError, match=r"countries\.csv:3: 3 cells, header has 2"):
        read_tables(manifest, on_bad_row="fail")


def test_images_undecodable_is_reported_and_skipped_or_fatal(tmp_path: Path):
    data = tmp_path / "data"
    rows = make_images(data)
    (data / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    rows.append({"id": "img-broken", "path": "img/broken.jpg", "caption": "Broken."})
    rows.append({"id": "img-missing", "path": "img/missing.png", "caption": "Missing."})
    rows.append({"id": "img-nocap", "path": "img/red.png"})
    manifest = write_jsonl(data / "images.jsonl", rows)
    report = IngestReport()
    images = read_images(manifest, report=report)
    assert [i.id for i in images] == ["img-red", "img-blue", "img-green"]
    assert images[0].path == data / "img" / "red.png"
    assert [b.line for b in report.bad_rows] == [4, 5, 6]
    assert "cannot be decoded" in report.bad_rows[0].reason
    assert "not found" in report.bad_rows[1].reason
    with pytest.raises(DataError, match=r"images\.jsonl:4: image cannot be decoded"):
        read_images(manifest, on_bad_row="fail")
