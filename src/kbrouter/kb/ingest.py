"""Readers for knowledge-base sources: passages, table manifests and image manifests.

Every ``path`` field in a manifest is relative to the folder of the manifest that contains it
(absolute paths are used as given). Problems are reported precisely:

* a missing or unreadable source file, an empty corpus, or a duplicate id raise
  :class:`~kbrouter.errors.DataError`;
* a bad row (unparseable line, missing/empty required field, missing referenced file,
  undecodable image, ragged table row) is reported with its file and line and either skipped
  (``on_bad_row="skip"``, logged and collected in an :class:`IngestReport`) or fatal
  (``on_bad_row="fail"``: a :class:`DataError` naming file and line).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kbrouter.errors import DataError
from kbrouter.files import iter_jsonl
from kbrouter.types import Table

logger = logging.getLogger(__name__)

OnBadRow = Literal["skip", "fail"]


@dataclass(frozen=True)
class BadRow:
    """One rejected source row."""

    file: Path
    line: int
    """1-based line (JSONL, CSV) or row number (Parquet) in ``file``."""
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class IngestReport:
    """What ingestion skipped (empty when everything was fine)."""

    bad_rows: list[BadRow] = field(default_factory=list)

    def add(self, bad: BadRow, on_bad_row: OnBadRow) -> None:
        if on_bad_row == "fail":
            raise DataError(f"bad row {bad} (on_bad_row='fail')")
        logger.warning("skipping bad row %s", bad)
        self.bad_rows.append(bad)


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    location: str = ""
    """``file:line`` the passage came from."""


@dataclass(frozen=True)
class TableRecord:
    id: str
    title: str
    path: Path
    table: Table
    location: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageRecord:
    id: str
    path: Path
    caption: str
    title: str
    location: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Other manifest fields (license, credit, source, ...)."""


# --------------------------------------------------------------------------- helpers


def _check_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    if not path.is_file():
        raise DataError(f"{what} is not a file: {path}")
    return path


def _iter_jsonl(
    path: Path, report: IngestReport, on_bad_row: OnBadRow
) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line; bad JSON is a bad row."""

    def bad(lineno: int, problem: str) -> None:
        report.add(BadRow(path, lineno, problem), on_bad_row)

    return iter_jsonl(path, error=DataError, on_bad_line=bad)


def _manifest_row(obj: dict, *optional: str) -> tuple[str, str, dict[str, str]]:
    """A manifest row's ``id`` and ``path`` plus optional string fields (``""`` when absent).

    Raises ``ValueError`` naming the problem (the caller reports it as a bad row).
    """
    id_ = _str_field(obj, "id", True)
    rel = _str_field(obj, "path", True)
    extra = {key: _str_field(obj, key, False) or "" for key in optional}
    if id_ is None or rel is None:
        raise ValueError("missing or empty 'id' or 'path'")
    return id_, rel, extra


def _str_field(obj: dict, key: str, required: bool) -> str | None:
    """The field as a stripped string; None if missing/empty (an error when required)."""
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ValueError(f"field {key!r} must be a string, got {type(v).__name__}")
    s = str(v).strip()
    return s or None


def _check_unique(ids: list[tuple[str, str]], path: Path) -> None:
    seen: dict[str, str] = {}
    for id_, loc in ids:
        if id_ in seen:
            raise DataError(f"duplicate id {id_!r} in {path} (at {seen[id_]} and {loc})")
        seen[id_] = loc


def resolve_relative(path: str | Path, manifest: Path) -> Path:
    """Resolve a manifest's ``path`` field against the manifest's folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else manifest.parent / p


# --------------------------------------------------------------------------- passages


def _passage_rows(
    path: Path, fmt: str, report: IngestReport, on_bad_row: OnBadRow
) -> Iterator[tuple[int, dict]]:
    if fmt == "jsonl":
        yield from _iter_jsonl(path, report, on_bad_row)
    elif fmt == "csv":
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        try:
            with path.open("r", encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh, delimiter=delim)
                if reader.fieldnames is None:
                    return
                missing = {"id", "text"} - set(reader.fieldnames)
                if missing:
                    raise DataError(
                        f"{path}:1: header lacks column(s) {sorted(missing)} "
                        f"(has {reader.fieldnames})"
                    )
                for row in reader:
                    if None in row:  # more cells than header columns
                        report.add(
                            BadRow(path, reader.line_num, "more cells than header columns"),
                            on_bad_row,
                        )
                        continue
                    yield reader.line_num, row
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
        except csv.Error as e:
            raise DataError(f"{path}: malformed CSV: {e}") from None
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises many types
            raise DataError(f"cannot read Parquet file {path}: {e}") from None
        missing = {"id", "text"} - set(table.column_names)
        if missing:
            raise DataError(
                f"{path}: Parquet columns lack {sorted(missing)} (has {table.column_names})"
            )
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row
    else:
        raise DataError(f"unknown passage format {fmt!r} for {path}")


def detect_format(path: Path) -> str:
    """``jsonl`` / ``csv`` / ``parquet`` from the file suffix."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DataError(
        f"cannot tell the format of {path} from its suffix {suffix!r}; "
        "use .jsonl, .csv/.tsv or .parquet, or set source.format"
    )


def read_passages(
    path: str | Path,
    format: str = "auto",
    on_bad_row: OnBadRow = "skip",
    report: IngestReport | None = None,
) -> list[Passage]:
    """Read passages with fields ``id`` and ``text`` (and optional ``title``).

    Formats: JSONL (one object per line), CSV/TSV (header row), Parquet.
    """
    path = _check_file(Path(path), "passage file")
    report = report if report is not None else IngestReport()
    fmt = detect_format(path) if format == "auto" else format
    passages: list[Passage] = []
    for line, row in _passage_rows(path, fmt, report, on_bad_row):
        try:
            id_ = _str_field(row, "id", True)
            text = _str_field(row, "text", True)
            title = _str_field(row, "title", False) or ""
        except ValueError as e:
            report.add(BadRow(path, line, str(e)), on_bad_row)
            continue
        if id_ is None:
            report.add(BadRow(path, line, "missing or empty 'id'"), on_bad_row)
            continue
        if text is None:
            report.add(BadRow(path, line, f"missing or empty 'text' (id {id_!r})"), on_bad_row)
            continue
        passages.append(Passage(id_, title, text, f"{path}:{line}"))
    if not passages:
        raise DataError(f"no passages in {path} (empty corpus)")
    _check_unique([(p.id, p.location) for p in passages], path)
    return passages


# --------------------------------------------------------------------------- tables


def read_table_file(path: Path, report: IngestReport, on_bad_row: OnBadRow) -> Table:
    """Read one CSV (or ``.tsv``) table: header row first; short rows are padded with ''.

    Rows with more cells than the header are bad rows; a file without a header raises
    :class:`DataError`.
    """
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    rows: list[list[str]] = []
    try:
        with path.open("r", encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh, delimiter=delim)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise DataError(f"{path}:1: table has no header row")
            header = [" ".join(h.split()) for h in header]
            for row in reader:
                if not any(c.strip() for c in row):
                    continue
                if len(row) > len(header):
                    report.add(
                        BadRow(
                            path, reader.line_num, f"{len(row)} cells, header has {len(header)}"
                        ),
                        on_bad_row,
                    )
                    continue
                rows.append([" ".join(c.split()) for c in row] + [""] * (len(header) - len(row)))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return Table(header=header, rows=rows)


def read_tables(
    manifest: str | Path, on_bad_row: OnBadRow = "skip", report: IngestReport | None = None
) -> list[TableRecord]:
    """Read a table manifest (JSONL: ``id``, ``path``, optional ``title``) and its tables.

    A manifest row whose table file is missing or unreadable is a bad row.
    """
    manifest = _check_file(Path(manifest), "table manifest")
    report = report if report is not None else IngestReport()
    out: list[TableRecord] = []
    for line, obj in _iter_jsonl(manifest, report, on_bad_row):
        try:
            id_, rel, extra = _manifest_row(obj, "title")
        except ValueError as e:
            report.add(BadRow(manifest, line, str(e)), on_bad_row)
            continue
        title = extra["title"]
        path = resolve_relative(rel, manifest)
        if not path.is_file():
            report.add(BadRow(manifest, line, f"table file not found: {path}"), on_bad_row)
            continue
        try:
            table = read_table_file(path, report, on_bad_row)
        except DataError as e:
            if on_bad_row == "fail":
                raise
            report.add(BadRow(manifest, line, f"unreadable table ({e})"), on_bad_row)
            continue
        table = Table(header=table.header, rows=table.rows, title=title or None)
        meta = {k: v for k, v in obj.items() if k not in ("id", "path", "title")}
        out.append(TableRecord(id_, title, path, table, f"{manifest}:{line}", meta))
    if not out:
        raise DataError(f"no tables in {manifest} (empty corpus)")
    _check_unique([(t.id, t.location) for t in out], manifest)
    return out


# --------------------------------------------------------------------------- images


def check_image(path: Path) -> str | None:
    """None if ``path`` decodes as an image, else the reason it does not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
    except FileNotFoundError:
        return f"image file not found: {path}"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return f"image cannot be decoded: {path} ({type(e).__name__}: {e})"
    except Image.DecompressionBombError as e:
        return f"image too large: {path} ({e})"
    return None


def read_images(
    manifest: str | Path,
    on_bad_row: OnBadRow = "skip",
    report: IngestReport | None = None,
    check_decode: bool = True,
) -> list[ImageRecord]:
    """Read an image manifest (JSONL: ``id``, ``path``, ``caption``, optional ``title``).

    A row needs a caption or a title. With ``check_decode`` every image is decoded once; an
    image that is missing or does not decode is a bad row.
    """
    manifest = _check_file(Path(manifest), "image manifest")
    report = report if report is not None else IngestReport()
    out: list[ImageRecord] = []
    for line, obj in _iter_jsonl(manifest, report, on_bad_row):
        try:
            id_, rel, extra = _manifest_row(obj, "caption", "title")
        except ValueError as e:
            report.add(BadRow(manifest, line, str(e)), on_bad_row)
            continue
        caption, title = extra["caption"], extra["title"]
        if not caption and not title:
            report.add(BadRow(manifest, line, f"image {id_!r} has no caption or title"), on_bad_row)
            continue
        path = resolve_relative(rel, manifest)
        problem = check_image(path) if check_decode else None
        if problem is None and not check_decode and not path.is_file():
            problem = f"image file not found: {path}"
        if problem is not None:
            report.add(BadRow(manifest, line, problem), on_bad_row)
            continue
        meta = {k: v for k, v in obj.items() if k not in ("id", "path", "caption", "title")}
        out.append(ImageRecord(id_, path, caption, title, f"{manifest}:{line}", meta))
    if not out:
        raise DataError(f"no images in {manifest} (empty corpus)")
    _check_unique([(r.id, r.location) for r in out], manifest)
    return out
