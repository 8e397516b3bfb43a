"""Consistency checks for the demo corpus shipped in ``demo/`` (plain Python, no models)."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kbrouter.config import RegistryConfig, load_registry_config
from kbrouter.types import Modality

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo"
MAX_DEMO_BYTES = 2 * 1024 * 1024
MAX_SIDE = 256


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _read_csv(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_question_images", DEMO / "make_question_images.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def registry() -> RegistryConfig:
    return load_registry_config(DEMO / "kbs.toml")


@pytest.fixture(scope="module")
def kb_items(registry: RegistryConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """KB name -> item id -> item record (passage, image row, or table with its cells)."""
    items: dict[str, dict[str, dict[str, Any]]] = {}
    for kb in registry.kb:
        if kb.modality is Modality.TEXT:
            rows = _jsonl(registry.resolve(kb.source.path))
        else:
            manifest = registry.resolve(kb.source.manifest)
            rows = _jsonl(manifest)
            if kb.modality is Modality.TABLE:
                for row in rows:
                    row["cells"] = _read_csv(manifest.parent / row["path"])
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)), f"duplicate ids in KB {kb.name}"
        items[kb.name] = {r["id"]: r for r in rows}
    return items


@pytest.fixture(scope="module")
def questions() -> list[dict[str, Any]]:
    return _jsonl(DEMO / "questions.jsonl")


def _evidence_texts(kb_modality: Modality, item: dict[str, Any]) -> list[str]:
    """The strings a reader would see for one item: passage, caption, or each table row."""
    if kb_modality is Modality.TEXT:
        return [item["title"] + " " + item["text"]]
    if kb_modality is Modality.IMAGE:
        return [item["title"] + " " + item["caption"]]
    return [" | ".join(row) for row in item["cells"][1:]]


def _names(text: str) -> set[str]:
    return {w for w in re.findall(r"\b[A-Z][\w-]{3,}", text) if w not in {"Flag", "Portrait"}}


def test_config_loads_with_three_kbs_and_paper_aliases(registry: RegistryConfig) -> None:
    """kbs.toml validates and registers one KB per modality under the paper's names."""
    by_name = {kb.name: kb for kb in registry.kb}
    assert set(by_name) == {"text", "tables", "images"}
    assert by_name["text"].modality is Modality.TEXT
    assert by_name["tables"].modality is Modality.TABLE
    assert by_name["images"].modality is Modality.IMAGE
    aliases = {a for kb in registry.kb for a in kb.aliases}
    assert aliases == {"Text Retriever", "Table Retriever", "Text Image Retriever"}
    assert registry.index_path == DEMO / ".kbrouter" / "index"


def test_text_passages_are_complete(kb_items: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Every passage has an id, a title and a non-trivial text."""
    passages = kb_items["text"]
    assert 30 <= len(passages) <= 45
    for pid, p in passages.items():
        assert set(p) == {"id", "title", "text"}, pid
        assert p["title"].strip() and len(p["text"].split()) >= 30, pid


def test_tables_decode_as_rectangular_csv(kb_items: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Every manifest table exists, has a header and rows of the header's width."""
    tables = kb_items["tables"]
    assert 4 <= len(tables) <= 6
    for tid, t in tables.items():
        assert t["title"].strip(), tid
        header, *rows = t["cells"]
        assert len(set(header)) == len(header) and all(header), tid
        assert rows, tid
        assert all(len(r) == len(header) and all(c.strip() for c in r) for r in rows), tid


def test_images_decode_and_are_small(
    registry: RegistryConfig, kb_items: dict[str, dict[str, dict[str, Any]]]
) -> None:
    """Every manifest image exists, decodes, is at most 256 px and carries its provenance."""
    manifest_dir = registry.resolve(registry.kb[2].source.manifest).parent
    for iid, row in kb_items["images"].items():
        for field in ("path", "title", "caption", "license", "credit", "source"):
            assert str(row.get(field, "")).strip(), f"{iid}: missing {field}"
        with Image.open(manifest_dir / row["path"]) as im:
            im.load()
            assert max(im.size) <= MAX_SIDE, iid


def test_demo_folder_is_small() -> None:
    """The shipped demo corpus stays well under 2 MB (built indexes are not counted)."""
    files = [p for p in DEMO.rglob("*") if p.is_file() and ".kbrouter" not in p.parts]
    assert sum(p.stat().st_size for p in files) < MAX_DEMO_BYTES


def test_questions_reference_existing_kbs_and_evidence(
    questions: list[dict[str, Any]], kb_items: dict[str, dict[str, dict[str, Any]]]
) -> None:
    """Each question names known KBs in hop order, one gold evidence item per hop."""
    ids = [q["id"] for q in questions]
    assert len(ids) == len(set(ids))
    for q in questions:
        assert set(q) == {"id", "question", "image", "answers", "gold_kbs", "gold_evidence"}
        assert q["answers"] and q["question"].strip(), q["id"]
        assert len(q["gold_kbs"]) == len(q["gold_evidence"]) >= 1, q["id"]
        for kb, item in zip(q["gold_kbs"], q["gold_evidence"], strict=True):
            assert item in kb_items[kb], f"{q['id']}: {item} not in KB {kb}"
        if q["image"] is not None:
            assert (DEMO / q["image"]).is_file(), q["id"]
    hops = {len(q["gold_kbs"]) for q in questions}
    assert hops == {1, 2}
    assert {q["gold_kbs"][0] for q in questions if len(q["gold_kbs"]) == 1} == set(kb_items)


def test_answer_is_in_last_hop_evidence_and_hops_connect(
    registry: RegistryConfig,
    questions: list[dict[str, Any]],
    kb_items: dict[str, dict[str, dict[str, Any]]],
) -> None:
    """The gold answer appears in the last hop's evidence, which shares a name with hop one."""
    modality = {kb.name: kb.modality for kb in registry.kb}
    for q in questions:
        last_kb, last_id = q["gold_kbs"][-1], q["gold_evidence"][-1]
        texts = _evidence_texts(modality[last_kb], kb_items[last_kb][last_id])
        hits = [t for t in texts if q["answers"][0] in t]
        assert hits, f"{q['id']}: {q['answers'][0]!r} not in {last_kb}:{last_id}"
        if len(q["gold_kbs"]) == 2:
            first_kb, first_id = q["gold_kbs"][0], q["gold_evidence"][0]
            (first,) = _evidence_texts(modality[first_kb], kb_items[first_kb][first_id])
            assert any(_names(first) & _names(h) for h in hits), f"{q['id']}: hops disconnected"


def test_readme_demo_question_is_listed(questions: list[dict[str, Any]]) -> None:
    """The Makefile's DEMO_QUESTION/DEMO_IMAGE pair is a demo question with a two-KB chain."""
    make = (REPO / "Makefile").read_text(encoding="utf-8")
    question = re.search(r"^DEMO_QUESTION \?= (.+)$", make, re.M)
    image = re.search(r"^DEMO_IMAGE \?= demo/(.+)$", make, re.M)
    assert question and image
    (match,) = [q for q in questions if q["question"] == question.group(1).strip()]
    assert match["image"] == image.group(1).strip()
    assert match["gold_kbs"][0] == "images" and len(set(match["gold_kbs"])) == 2


def test_question_images_are_new_files_closest_to_their_source(
    kb_items: dict[str, dict[str, dict[str, Any]]],
) -> None:
    """Question images differ byte-wise from every KB image yet look most like their source."""
    script = _load_script()

    def thumb(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            rgb = im.convert("RGBA")
        flat = Image.alpha_composite(Image.new("RGBA", rgb.size, "white"), rgb).convert("RGB")
        return np.asarray(flat.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)

    kb_paths = {iid: DEMO / row["path"] for iid, row in kb_items["images"].items()}
    kb_bytes = {p.read_bytes() for p in kb_paths.values()}
    kb_thumbs = {iid: thumb(p) for iid, p in kb_paths.items()}
    for name, source in script.QUESTION_IMAGES.items():
        path = DEMO / "questions" / name
        assert path.read_bytes() not in kb_bytes, name
        with Image.open(path) as im:
            assert max(im.size) <= MAX_SIDE, name
        q = thumb(path)
        dists = {iid: float(np.abs(q - t).mean()) for iid, t in kb_thumbs.items()}
        assert kb_paths[min(dists, key=dists.__getitem__)] == DEMO / source, name


def test_question_images_are_reproducible(tmp_path: Path) -> None:
    """make_question_images.py regenerates the shipped question images (up to JPEG noise)."""
    script = _load_script()
    script.main(["--out", str(tmp_path)])
    for name in script.QUESTION_IMAGES:
        with Image.open(DEMO / "questions" / name) as a, Image.open(tmp_path / name) as b:
            assert a.size == b.size, name
            diff = np.abs(np.asarray(a, np.float32) - np.asarray(b.convert(a.mode), np.float32))
        assert float(diff.mean()) < 2.0, name
