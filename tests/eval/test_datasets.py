"""Dataset loaders on the real files (counts from the data READMEs) and the generic JSONL loader."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kbrouter.errors import DatasetError
from kbrouter.eval.datasets import (
    expand_numeric_range,
    load_dataset,
    select_examples,
)
from kbrouter.kb.base import KBInfo
from kbrouter.types import Modality


@pytest.fixture(scope="module")
def data_dir(shared_data: Path) -> Path:
    return shared_data


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("mkqa-mini", 405),
        ("2wiki", 3000),
        ("infoseek", 1000),
        ("dynvqa", 715),
        ("webqa", 1000),
        ("openwikitable", 3000),
        ("tabfact", 1000),
    ],
)
def test_counts_and_unique_ids(data_dir, name, count):
    """Every loader yields the README's record count with unique ids and non-empty golds."""
    ds = load_dataset(name, data_dir=data_dir)
    assert len(ds) == count
    assert len({e.id for e in ds}) == count
    assert all(e.golds and all(isinstance(g, str) for g in e.golds) for e in ds)


def test_mkqa_mini_sources_gold_kbs_and_images(data_dir):
    """mkqa-mini dev: per-source counts, gold KBs in hop order, 101 images that exist."""
    ds = load_dataset("mkqa-mini", data_dir=data_dir)
    by_source = Counter(e.source for e in ds)
    assert by_source["wtq"] == 200 and by_source["hotpotqa"] == 50
    assert by_source["gcompris-solar"] == 28 and by_source["template-flag-capital"] == 11
    assert sum(1 for e in ds if e.question.image is not None) == 101
    assert ds.missing_images() == []
    ds.require_images()  # no error
    assert all(e.gold_kbs and len(e.gold_kbs) == e.extra["hops"] for e in ds)
    cap = next(e for e in ds if e.source == "template-flag-capital")
    assert cap.gold_kbs == ["image", "table"]


def test_mkqa_mini_kb_name_mapping(data_dir):
    """Gold KB kinds map to configured names: by name/alias first, else the only KB of a kind."""
    kbs = [
        KBInfo(name="wiki", description="d", modality=Modality.TEXT),
        KBInfo(name="pics", description="d", modality=Modality.IMAGE),
        KBInfo(name="tables", description="d", modality=Modality.TABLE, aliases=["table"]),
    ]
    ds = load_dataset("mkqa-mini", data_dir=data_dir).with_kb_names(kbs)
    kinds = {k for e in ds for k in e.gold_kbs}
    assert kinds == {"wiki", "pics", "tables"}
    ds2 = load_dataset("mkqa-mini", data_dir=data_dir, kb_map={"text": "T"})
    assert {k for e in ds2 for k in e.gold_kbs} == {"T", "image", "table"}


def test_infoseek_numeric_ranges(data_dir):
    """248 numeric InfoSeek answers expand to a grid; paper mode matches the released quirks."""
    ds = load_dataset("infoseek", data_dir=data_dir)
    numeric = [e for e in ds if e.extra["numeric"]]
    assert len(numeric) == 248
    ex = next(e for e in numeric if e.extra["answer"] == ["6.5-7.0"])
    assert ex.golds[0] == "6.5" and "6.75" in ex.golds and "7" in ex.golds
    assert "6" not in ex.golds  # below the range
    paper = load_dataset("infoseek", data_dir=data_dir, paper_compat=True)
    pex = next(e for e in paper if e.id == ex.id)
    assert "6" in pex.golds and "7" in pex.golds  # int(lo)..int(hi): the released quirk
    assert "6.5" in pex.golds
    text_ans = next(e for e in ds if not e.extra["numeric"])
    assert text_ans.golds == ["energy conversion", "energy transformation", "conversion"]


def test_expand_numeric_range_steps():
    """The grid step depends on the range width (>=50: 1, >=5: .1, >=1: .01, else .001)."""
    wide = expand_numeric_range({"wikidata": 100, "range": [90.0, 150.0]})
    assert wide[:3] == ["90", "91", "92"] and "150" in wide and len(wide) == 61
    assert expand_numeric_range({"range": [1.0, 1.002]}) == ["1", "1.001", "1.002"]
    paper = expand_numeric_range({"range": [1990.0, 2050.0]}, paper_compat=True)
    assert paper[0] == "1990.0" and "1990" in paper


def test_images_missing_message(data_dir, tmp_path):
    """Without the images, questions load but require_images says what to download."""
    ds = load_dataset("infoseek", data_dir=data_dir, image_dir=tmp_path)
    assert ds.examples[0].question.image == tmp_path / "oven_04990048.jpg"
    with pytest.raises(DatasetError, match="--image-dir") as e:
        ds.require_images(ds.examples[:3])
    assert "OVEN" in str(e.value)
    (tmp_path / "oven_04990048.jpg").write_bytes(b"x")
    ds.require_images(ds.examples[:1])


def test_dynvqa_bilingual_and_int_golds(data_dir):
    """Dyn-VQA golds keep Chinese and English variants; ints become strings; NaN query is None."""
    ds = load_dataset("dynvqa", data_dir=data_dir)
    first = ds.examples[0]
    assert first.id == "en1"
    assert "Leonardo DiCaprio does not have any children." in first.golds
    assert any("孩子" in g for g in first.golds)
    with_int = [e for e in ds if "2016" in e.golds]
    assert with_int
    assert any(e.extra["golden_query"] is None for e in ds)


def test_webqa_quotes(data_dir):
    """WebQA's literal quotes are stripped by default and kept in paper mode."""
    default = load_dataset("webqa", data_dir=data_dir).examples[0].golds[0]
    paper = load_dataset("webqa", data_dir=data_dir, paper_compat=True).examples[0].golds[0]
    assert default == "Centennial Olympic Park contains greenery."
    assert paper == '"Centennial Olympic Park contains greenery."'


def test_tabfact_yes_no_and_owt_none(data_dir):
    """TabFact golds are yes/no (522/478); OpenWikiTable has 210 'None' golds."""
    tf = load_dataset("tabfact", data_dir=data_dir)
    assert tf.answer_type == "yesno"
    assert Counter(e.golds[0] for e in tf) == {"yes": 522, "no": 478}
    owt = load_dataset("openwikitable", data_dir=data_dir)
    assert sum(1 for e in owt if e.golds == ["None"]) == 210
    wiki = load_dataset("2wiki", data_dir=data_dir)
    assert Counter(e.golds[0] for e in wiki)["yes"] == 219


def test_generic_jsonl(tmp_path):
    """The generic loader reads question/answers/image/gold_kbs and reports bad lines."""
    (tmp_path / "img.jpg").write_bytes(b"x")
    path = tmp_path / "qs.jsonl"
    rows = [
        {"id": "a", "question": "Q1?", "answers": ["x", 3], "gold_kbs": ["text"], "note": 1},
        {"question": "Q2?", "answer": "y", "image": "img.jpg"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = load_dataset(f"jsonl:{path}")
    assert [e.id for e in ds] == ["a", "qs-2"]
    assert ds.examples[0].golds == ["x", "3"] and ds.examples[0].extra == {"note": 1}
    assert ds.examples[1].question.image == tmp_path / "img.jpg"
    assert ds.examples[1].source == "qs"
    path.write_text('{"question": "Q?", "answers": ["x"]}\n{"question": "no answers"}\n')
    with pytest.raises(DatasetError, match=r"qs.jsonl:2: missing field 'answers'"):
        load_dataset(f"jsonl:{path}")
    path.write_text("{not json\n")
    with pytest.raises(DatasetError, match=r"qs.jsonl:1: invalid JSON"):
        load_dataset(f"jsonl:{path}")


def test_unknown_dataset_and_missing_file(tmp_path):
    """Unknown names and missing files are DatasetErrors naming the problem."""
    with pytest.raises(DatasetError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(f"jsonl:{tmp_path / 'missing.jsonl'}")


def test_select_examples_stratified(data_dir):
    """Stratified selection is seeded, proportional, covers every source, in file order."""
    ds = load_dataset("mkqa-mini", data_dir=data_dir)
    a = select_examples(ds.examples, 40, seed=1, stratify=True)
    b = select_examples(ds.examples, 40, seed=1, stratify=True)
    c = select_examples(ds.examples, 40, seed=2, stratify=True)
    assert [e.id for e in a] == [e.id for e in b] != [e.id for e in c]
    assert len(a) == 40
    counts = Counter(e.source for e in a)
    assert set(counts) == {e.source for e in ds}  # 15 sources, each at least once
    assert counts["wtq"] >= 15
    order = {e.id: i for i, e in enumerate(ds.examples)}
    assert [order[e.id] for e in a] == sorted(order[e.id] for e in a)
    assert [e.id for e in select_examples(ds.examples, 3)] == [e.id for e in ds.examples[:3]]
    assert len(select_examples(ds.examples, None)) == 405
