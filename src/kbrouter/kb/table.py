"""Table knowledge base: a JSONL manifest of CSV/TSV tables, linearised for retrieval.

Each table is linearised as ``[Title] ... [Header] c1 [sep] c2 ... [Rows] [Row] v11 [sep] ...``
(:mod:`kbrouter.kb.linearize`) and searched dense + BM25 like passages. Tables longer than
``rows_per_chunk`` rows are indexed as row blocks with the title and header repeated; a block's
id is ``<table id>#<n>``, a table indexed whole keeps its id.

Evidence: ``text`` = the linearised block, ``title`` = the table title, ``table`` = the block as
a structured :class:`~kbrouter.types.Table` (header + that block's rows), ``metadata`` =
``doc_id`` (table id), ``row_start``/``row_end`` (0-based, end exclusive), ``n_rows`` (whole
table), ``chunk``/``n_chunks``, ``path`` (the CSV file) and ``scores``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kbrouter.config import TableKBConfig
from kbrouter.kb.chunking import chunk_id
from kbrouter.kb.ingest import IngestReport, read_tables, resolve_relative
from kbrouter.kb.linearize import linearize_table, table_blocks
from kbrouter.kb.text import IndexedKB, Item, _resolve
from kbrouter.types import Evidence, Modality, Table


class TableKB(IndexedKB):
    """Tables from a manifest (``id``, ``title``, ``path``), searched by their linearisation."""

    config_type = TableKBConfig
    kb_modality = Modality.TABLE

    @classmethod
    def source_root_of(cls, config: TableKBConfig, base_dir: Path) -> Path:
        return _resolve(config.source.manifest, base_dir).parent

    @classmethod
    def source_files(cls, config: TableKBConfig, base_dir: Path) -> list[tuple[str, Path]]:
        manifest = _resolve(config.source.manifest, base_dir)
        return [(manifest.name, manifest), *_manifest_paths(manifest)]

    @classmethod
    def config_fingerprint(cls, config: TableKBConfig) -> dict[str, Any]:
        return {**super().config_fingerprint(config), "rows_per_chunk": config.rows_per_chunk}

    @classmethod
    def read_items(
        cls, config: TableKBConfig, base_dir: Path, report: IngestReport
    ) -> tuple[list[Item], int]:
        manifest = _resolve(config.source.manifest, base_dir)
        records = read_tables(manifest, on_bad_row=config.on_bad_row, report=report)
        root = manifest.parent
        items: list[Item] = []
        for rec in records:
            blocks = table_blocks(rec.table, config.rows_per_chunk)
            for i, (start, block) in enumerate(blocks):
                text = linearize_table(block, rec.title or None)
                items.append(
                    Item(
                        id=chunk_id(rec.id, i, len(blocks)),
                        text=text,
                        index_text=text,
                        title=rec.title or None,
                        metadata={
                            "doc_id": rec.id,
                            "chunk": i,
                            "n_chunks": len(blocks),
                            "row_start": start,
                            "row_end": start + len(block.rows),
                            "n_rows": len(rec.table.rows),
                            "path": _rel(rec.path, root),
                        },
                        table=block.model_dump(mode="json"),
                    )
                )
        return items, len(records)

    def to_evidence(self, item: Item, score: float, extra: dict[str, Any]) -> Evidence:
        ev = super().to_evidence(item, score, extra)
        table = Table.model_validate(item.table) if item.table is not None else None
        return ev.model_copy(update={"table": table})

    def full_table(self, table_id: str) -> Table:
        """The whole table ``table_id`` (all its row blocks joined), e.g. to answer from it."""
        blocks = [it for it in self.items if it.metadata.get("doc_id") == table_id]
        if not blocks:
            raise KeyError(f"no table {table_id!r} in KB {self.name!r}")
        blocks.sort(key=lambda it: it.metadata.get("chunk", 0))
        first = Table.model_validate(blocks[0].table)
        rows = [r for it in blocks for r in Table.model_validate(it.table).rows]
        return Table(header=first.header, rows=rows, title=first.title)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _manifest_paths(manifest: Path) -> list[tuple[str, Path]]:
    """``(name, path)`` of every file a manifest references (bad lines are ignored here)."""
    out: list[tuple[str, Path]] = []
    if not manifest.is_file():
        return out
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return out
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("path"), str) and obj["path"].strip():
            path = resolve_relative(obj["path"].strip(), manifest)
            out.append((_rel(path, manifest.parent), path))
    return out
