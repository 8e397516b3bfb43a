"""The KB registry: names, building, no-op re-index, staleness, corruption, crashes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from kb_helpers import PASSAGES, HashTextEncoder, fake_loaders, tiny_config, write_jsonl

from kbrouter.config import load_registry_config
from kbrouter.errors import ConfigError, DataError, IndexError_, StaleIndexError, UnknownKBError
from kbrouter.kb.registry import KBRegistry
from kbrouter.types import Modality, Query


def _registry(tmp_path: Path, encoder: HashTextEncoder | None = None, **kw) -> KBRegistry:
    return KBRegistry(
        tiny_config(tmp_path, **kw.pop("overrides", {})), **fake_loaders(encoder), **kw
    )


def test_names_resolve_ignoring_case_and_spaces(tmp_path: Path):
    reg = _registry(tmp_path)
    assert reg.resolve("TEXT") == "text"
    assert reg.resolve("  text   retriever ") == "text"
    assert reg.resolve("TextImageRetriever") == "image"
    assert [i.name for i in reg.infos] == ["text", "table", "image"]
    assert reg.infos[2].modality == Modality.IMAGE
    assert reg.infos[0].aliases == ["Text Retriever"]
    with pytest.raises(UnknownKBError, match="unknown knowledge base 'web'.*Table Retriever"):
        reg.resolve("web")
    with pytest.raises(UnknownKBError):
        reg.get("nope")


def test_bad_config_field_names_its_path(tmp_path: Path):
    path = tmp_path / "kbs.toml"
    path.write_text(
        '[[kb]]\nname = "t"\ndescription = "d"\nmodality = "text"\n'
        'source = { path = "x.jsonl" }\nretrieval = { mode = "fuzzy" }\n'
    )
    with pytest.raises(ConfigError, match=r"kb\[0\]\.retrieval\.mode"):
        KBRegistry.from_config(path)
    with pytest.raises(ConfigError, match="not found"):
        KBRegistry.from_config(tmp_path / "missing.toml")


def test_build_then_unchanged_reindex_is_a_noop(tmp_path: Path):
    enc = HashTextEncoder()
    reg = _registry(tmp_path, enc)
    report = reg.build(progress=False)
    assert [r.status for r in report.results] == ["built", "built", "built"]
    assert [r.n_items for r in report.results] == [8, 4, 3]  # p5: 250 words -> 4 windows
    manifest = reg.index_dir("text") / "manifest.json"
    before = manifest.stat().st_mtime_ns
    calls = enc.calls
    report = reg.build(progress=False)
    assert [r.status for r in report.results] == ["up-to-date"] * 3
    assert manifest.stat().st_mtime_ns == before and enc.calls == calls
    assert [r.status for r in reg.build(["text"], force=True, progress=False).results] == [
        "rebuilt"
    ]


def test_text_kb_modes_chunk_ids_and_batched_search(tmp_path: Path):
    enc = HashTextEncoder()
    reg = _registry(tmp_path, enc)
    reg.build(progress=False)
    calls = enc.calls
    res = reg.search(
        "text", ["capital of Germany", "largest planet solar system", "w120 w130"], k=3
    )
    assert enc.calls == calls + 1  # one encoder call for the whole batch
    assert res[0][0].id == "p2" and res[0][0].title == "Berlin" and res[0][0].kb == "text"
    assert res[1][0].id == "p4"
    assert res[2][0].id.startswith("p5#") and res[2][0].metadata["doc_id"] == "p5"
    assert {"dense", "bm25"} & set(res[0][0].metadata["scores"])
    assert all(len(r) <= 3 for r in res)
    for mode in ("dense", "bm25"):
        sub = tmp_path / mode
        sub.mkdir()
        r2 = _registry(sub, overrides={"text": {"retrieval": {"mode": mode}}})
        r2.build(["text"], progress=False)
        [hits] = r2.search("text", ["capital of Germany"], k=2)
        assert hits[0].id == "p2"
        assert set(hits[0].metadata["scores"]) == {mode}
    bm25_dir = tmp_path / "bm25" / "index" / "text"
    assert not (bm25_dir / "store").exists()  # no vectors for a BM25-only KB


@pytest.mark.parametrize("index", ["hnsw", "ivfpq"])
def test_other_faiss_index_types_are_selectable(tmp_path: Path, index: str):
    store = {"index": index, "pq_m": 8}
    reg = _registry(tmp_path, overrides={"text": {"retrieval": {"mode": "dense", "store": store}}})
    reg.build(["text"], progress=False)
    [hits] = reg.search("text", ["capital of Germany"], k=2)
    assert hits[0].id == "p2"


def test_table_kb_evidence_carries_the_structured_block(tmp_path: Path):
    reg = _registry(tmp_path)
    reg.build(["table"], progress=False)
    [hits] = reg.search("Table Retriever", [Query(text="capital of Germany Berlin")], k=4)
    top = hits[0]
    assert top.id == "tbl-countries" and top.modality == Modality.TABLE
    assert top.table is not None and top.table.header == ["name", "capital", "area_km2"]
    assert ["Germany", "Berlin", "357022"] in top.table.rows
    assert top.text.startswith("[Title] Countries and capitals [Header] name [sep] capital")
    [cup] = reg.search("table", ["Football cup winners 1996 Team 6"], k=1)
    block = cup[0]
    assert block.id == "tbl-cup#2" and block.metadata["row_start"] == 6
    assert block.metadata["n_rows"] == 7 and block.table.rows == [["1996", "Team 6"]]
    assert block.table.header == ["year", "winner"]
    assert reg.get("table").full_table("tbl-cup").rows[0] == ["1990", "Team 0"]


def test_image_kb_text_and_image_queries(tmp_path: Path):
    from PIL import Image

    reg = _registry(tmp_path)
    reg.build(["image"], progress=False)
    [by_text] = reg.search("image", ["meadow of green grass"], k=3)
    assert by_text[0].id == "img-green"
    assert by_text[0].image_path == tmp_path / "data" / "img" / "green.png"
    assert by_text[0].text.startswith("Green field. A meadow")
    # a re-cropped, re-encoded copy of the blue image, with a generic question
    src = Image.open(tmp_path / "data" / "img" / "blue.png")
    src.crop((1, 1, 39, 29)).resize((76, 56)).save(tmp_path / "q.jpg", quality=80)
    [hits] = reg.search("image", [Query(text="Which flag is shown?", image=tmp_path / "q.jpg")])
    assert hits[0].id == "img-blue" and hits[0].metadata.get("pinned") is True
    assert hits[0].modality == Modality.IMAGE


def test_missing_query_image_is_an_image_error(tmp_path: Path):
    from kbrouter.errors import ImageError

    reg = _registry(tmp_path)
    reg.build(["image"], progress=False)
    with pytest.raises(ImageError, match="nope.jpg"):
        reg.search("image", [Query(text="x", image=tmp_path / "nope.jpg")])


def test_undecodable_image_is_skipped_or_fatal(tmp_path: Path):
    reg = _registry(tmp_path)
    data = tmp_path / "data"
    (data / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with (data / "images.jsonl").open("a") as fh:
        fh.write('{"id": "img-bad", "path": "img/bad.png", "caption": "Bad."}\n')
    [res] = reg.build(["image"], progress=False).results
    assert res.n_items == 3 and len(res.bad_rows) == 1 and "images.jsonl:4" in res.bad_rows[0]
    strict = _registry(tmp_path, overrides={"image": {"on_bad_row": "fail"}})
    with pytest.raises(DataError, match=r"images\.jsonl:4: image cannot be decoded"):
        strict.build(["image"], progress=False)
    report = strict.build(["image"], progress=False, keep_going=True)
    assert report.failed and "cannot be decoded" in report.failed[0].error


def test_changed_source_is_stale_error_or_rebuild(tmp_path: Path):
    reg = _registry(tmp_path)
    reg.build(["text"], progress=False)
    rows = [*PASSAGES, {"id": "p9", "title": "Rome", "text": "Rome is the capital of Italy."}]
    write_jsonl(tmp_path / "data" / "text.jsonl", rows)
    fresh = _registry(tmp_path)
    assert fresh.status("text").state == "stale"
    with pytest.raises(StaleIndexError, match="source files changed: text.jsonl"):
        fresh.get("text")
    auto = _registry(tmp_path, on_stale="rebuild")
    [hits] = auto.search("text", ["capital of Italy"], k=1)
    assert hits[0].id == "p9"
    assert auto.status("text").state == "fresh"


def test_changed_encoder_or_config_is_stale(tmp_path: Path):
    reg = _registry(tmp_path)
    reg.build(["text"], progress=False)
    other = _registry(tmp_path, overrides={"text": {"retrieval": {"encoder": "bge-m3"}}})
    with pytest.raises(StaleIndexError, match="text encoder changed"):
        other.get("text")
    rechunk = _registry(tmp_path, overrides={"text": {"chunking": {"words": 50, "stride": 25}}})
    with pytest.raises(StaleIndexError, match="config"):
        rechunk.get("text")
    # same config name, but the loaded model differs from the one the index was built with
    swapped = _registry(tmp_path, HashTextEncoder(name="other-model"))
    with pytest.raises(StaleIndexError, match="was built with text encoder"):
        swapped.get("text")


def test_missing_and_corrupt_indexes_are_clear_errors(tmp_path: Path):
    reg = _registry(tmp_path)
    with pytest.raises(IndexError_, match="has no index.*kbrouter index"):
        reg.get("text")
    reg.build(["text"], progress=False)
    (reg.index_dir("text") / "items.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(IndexError_, match="corrupt"):
        _registry(tmp_path).get("text")
    (reg.index_dir("text") / "manifest.json").write_text("{")
    assert _registry(tmp_path).status("text").state == "corrupt"
    with pytest.raises(IndexError_, match="manifest .* is corrupt"):
        _registry(tmp_path).get("text")
    shutil.rmtree(reg.index_dir("text") / "store")
    healed = _registry(tmp_path, on_stale="rebuild")
    assert healed.search("text", ["Berlin"], k=1)[0][0].id == "p2"


def test_crash_mid_build_keeps_the_previous_index(tmp_path: Path):
    enc = HashTextEncoder()
    reg = _registry(tmp_path, enc)
    reg.build(["text"], progress=False)
    before = (reg.index_dir("text") / "manifest.json").read_bytes()
    write_jsonl(tmp_path / "data" / "text.jsonl", PASSAGES[:2])
    enc.fail_after = enc.calls  # the next encoder call crashes
    with pytest.raises(RuntimeError, match="simulated crash"):
        reg.build(["text"], progress=False)
    assert (reg.index_dir("text") / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in reg.index_dir("text").parent.iterdir()) == ["text"]
    enc.fail_after = None
    # the old index is still complete; it is stale (sources changed) until rebuilt
    assert reg.status("text").state == "stale"
    assert reg.build(["text"], progress=False).results[0].n_items == 2


def test_kbs_with_the_same_encoder_share_one_instance(tmp_path: Path):
    loaded: list[str] = []

    def loader(name: str) -> HashTextEncoder:
        loaded.append(name)
        return HashTextEncoder(name=name)

    reg = KBRegistry(
        tiny_config(tmp_path),
        text_encoder_loader=loader,
        image_encoder_loader=fake_loaders()["image_encoder_loader"],
    )
    reg.build(progress=False)
    text, table = reg.get("text"), reg.get("table")
    assert loaded == ["minilm"]
    assert text.text_encoder is table.text_encoder
    assert reg.get("TEXT") is text


def test_registry_from_toml_file_resolves_paths_against_its_folder(tmp_path: Path):
    tiny_config(tmp_path)  # writes the data
    path = tmp_path / "conf" / "kbs.toml"
    path.parent.mkdir()
    path.write_text(
        'index_dir = "../idx"\n[[kb]]\nname = "text"\ndescription = "d"\n'
        'modality = "text"\nsource = { path = "../data/text.jsonl" }\n'
        'retrieval = { mode = "bm25" }\n'
    )
    reg = KBRegistry.from_config(load_registry_config(path))
    reg.build(progress=False)
    assert (tmp_path / "idx" / "text" / "manifest.json").is_file()
    assert reg.search("text", ["Nile river Africa"], k=1)[0][0].id == "p3"


def test_clip_style_encoder_searches_images_by_text(tmp_path: Path):
    """With an encoder whose text and image vectors share a space, text queries match images."""
    from kb_helpers import ColorImageEncoder
    from PIL import Image

    class FakeClip(ColorImageEncoder):
        supports_text = True

        def __init__(self) -> None:
            super().__init__("fake-clip")
            self.text_calls = 0

        def encode_texts(self, texts, batch_size: int = 64):
            self.text_calls += 1
            swatches = []
            for t in texts:  # "a picture of <colour>" -> that colour's image vector
                colours = {"crimson": (220, 20, 20), "navy": (20, 20, 220)}
                rgb = colours.get(t.split()[-1], (0, 0, 0))
                im = Image.new("RGB", (40, 30), rgb)
                for x in range(0, 40, 10):
                    for y in range(30):
                        im.putpixel((x, y), (255, 255, 255))
                path = tmp_path / f"swatch-{len(swatches)}.png"
                im.save(path)
                swatches.append(path)
            return self.encode_images(swatches)

    clip = FakeClip()
    reg = KBRegistry(
        tiny_config(tmp_path, image={"retrieval": {"mode": "bm25"}}),
        text_encoder_loader=lambda name: HashTextEncoder(),
        image_encoder_loader=lambda name: clip,
    )
    reg.build(["image"], progress=False)
    [hits] = reg.search("image", ["a picture of navy"], k=3)
    assert clip.text_calls == 1
    assert hits[0].id == "img-blue" and "clip_text" in hits[0].metadata["scores"]


def test_concurrent_searches_match_sequential_ones(tmp_path: Path):
    """KBs are searched from engine worker threads; results must not depend on interleaving."""
    from concurrent.futures import ThreadPoolExecutor

    reg = _registry(tmp_path)
    reg.build(["text", "table"], progress=False)
    queries = ["capital of Germany", "Nile river", "largest planet", "Team 3 1993"] * 5
    want = [reg.search("text", [q], k=3)[0] for q in queries]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda q: reg.search("text", [q], k=3)[0], queries))
    assert [[e.id for e in r] for r in got] == [[e.id for e in r] for r in want]


def test_fetch_by_source_document_id(tmp_path: Path):
    """KnowledgeBase.fetch returns every indexed block of a document, in order; unknown ids
    give an empty list (the oracle-evidence bound reads gold documents this way)."""
    reg = _registry(tmp_path)
    reg.build(progress=False)
    [cup, none] = reg.get("table").fetch(["tbl-cup", "tbl-nope"])
    assert [e.id for e in cup] == ["tbl-cup#0", "tbl-cup#1", "tbl-cup#2"]  # 7 rows, 3 per block
    assert all(e.metadata["doc_id"] == "tbl-cup" and e.table is not None for e in cup)
    assert none == []
    [[passage]] = reg.get("text").fetch(["p1"])
    assert passage.id == "p1" and passage.text.startswith("Paris is the capital")
    [[img]] = reg.get("image").fetch(["img-blue"])
    assert img.image_path is not None and img.image_path.name == "blue.png"
