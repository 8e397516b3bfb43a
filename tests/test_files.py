"""The shared JSONL reader and file hasher: clear errors naming file and line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kbrouter.errors import DataError, DatasetError
from kbrouter.eval.datasets import load_jsonl
from kbrouter.files import file_sha256, iter_jsonl
from kbrouter.train.steps import read_paper_steps, read_steps


def _latin1(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"question": "ok?", "answers": ["a"]}\n{"question": "caf\xe9?"}\n')
    return path


def test_non_utf8_dataset_and_step_files_name_file_and_line(tmp_path: Path):
    path = _latin1(tmp_path)
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: not UTF-8 text"):
        load_jsonl(path)
    first = tmp_path / "steps.jsonl"
    first.write_bytes(b'{"problem": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"steps\.jsonl:1: not UTF-8 text"):
        read_steps(first)
    with pytest.raises(DataError, match=r"steps\.jsonl:1: not UTF-8 text"):
        read_paper_steps(first)


def test_bad_lines_raise_or_go_to_the_callback(tmp_path: Path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\nnot json\n[1, 2]\n{"b": 2}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.jsonl:3: invalid JSON"):
        list(iter_jsonl(path))
    bad: list[tuple[int, str]] = []
    rows = list(iter_jsonl(path, on_bad_line=lambda n, p: bad.append((n, p))))
    assert rows == [(1, {"a": 1}), (5, {"b": 2})]
    assert [n for n, _ in bad] == [3, 4] and "expected a JSON object" in bad[1][1]
    assert list(iter_jsonl(path, objects=False, on_bad_line=lambda n, p: None))[1] == (4, [1, 2])
    with pytest.raises(DatasetError, match="dataset file not found"):
        list(iter_jsonl(tmp_path / "nope.jsonl", what="dataset file", error=DatasetError))


def test_file_sha256(tmp_path: Path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"kbrouter" * 100_000)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
