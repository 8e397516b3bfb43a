"""Manifests, fingerprints, staleness reasons and atomic directory swaps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kbrouter.errors import IndexError_, StaleIndexError
from kbrouter.kb.manifest import (
    IndexManifest,
    atomic_directory,
    check_encoder_identity,
    config_hash,
    file_sha256,
    fingerprint_sources,
    read_manifest,
    recover_directory,
    remove_leftovers,
    staleness,
    write_manifest,
)
from kbrouter.types import Modality


def _manifest(sources, **kw) -> IndexManifest:
    base = dict(
        kb="text",
        modality=Modality.TEXT,
        encoder="minilm",
        encoder_id="st:minilm",
        dim=8,
        n_items=3,
        n_source_items=3,
        sources=sources,
        config_hash=config_hash({"a": 1}),
    )
    return IndexManifest(**{**base, **kw})


def test_fingerprint_checksums_and_reuses_unchanged_files(tmp_path: Path, monkeypatch):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    [src] = fingerprint_sources([("a.txt", f)])
    assert src.sha256 == file_sha256(f) and src.size == 5
    calls = []
    import kbrouter.kb.manifest as m

    monkeypatch.setattr(m, "file_sha256", lambda p: calls.append(p) or "x")
    assert fingerprint_sources([("a.txt", f)], [src])[0].sha256 == src.sha256
    assert calls == []  # same path, size and mtime: no re-hash
    [gone] = fingerprint_sources([("b.txt", tmp_path / "b.txt")])
    assert gone.sha256 == "missing"


def test_staleness_reports_every_difference(tmp_path: Path):
    f = tmp_path / "a.txt"
    f.write_text("v1")
    src = fingerprint_sources([("a.txt", f)])
    m = _manifest(src)
    same = dict(
        kb="text",
        modality=Modality.TEXT,
        config_digest=config_hash({"a": 1}),
        sources=src,
        encoder="minilm",
    )
    assert staleness(m, **same) == []
    f.write_text("v2 changed")
    changed = fingerprint_sources([("a.txt", f)], src)
    reasons = staleness(m, **{**same, "sources": changed})
    assert reasons == ["source files changed: a.txt"]
    reasons = staleness(
        m, **{**same, "encoder": "bge", "config_digest": config_hash({"a": 2}), "sources": []}
    )
    assert any("text encoder changed" in r for r in reasons)
    assert any("config hash" in r for r in reasons)
    assert any("source files removed: a.txt" in r for r in reasons)
    assert staleness(m, **{**same, "image_encoder": "efficientnet-lite0"})


def test_encoder_identity_mismatch_is_a_stale_index_error():
    m = _manifest([])
    check_encoder_identity(m, "st:minilm", 8)
    with pytest.raises(StaleIndexError, match="built with text encoder 'st:minilm'"):
        check_encoder_identity(m, "st:other", 8)
    with pytest.raises(StaleIndexError, match="8-d"):
        check_encoder_identity(m, "st:minilm", 16)


def test_manifest_round_trip_and_corruption(tmp_path: Path):
    m = _manifest([])
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    (tmp_path / "manifest.json").write_text('{"kb": "text"')
    with pytest.raises(IndexError_, match="corrupt"):
        read_manifest(tmp_path)
    with pytest.raises(IndexError_, match="not found"):
        read_manifest(tmp_path / "none")


def test_atomic_directory_swaps_in_only_on_success(tmp_path: Path):
    target = tmp_path / "idx"
    with atomic_directory(target) as tmp:
        (tmp / "f").write_text("one")
    assert (target / "f").read_text() == "one"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "f").write_text("two")
        raise RuntimeError("crash mid-build")
    assert (target / "f").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # temp dir cleaned up
    with atomic_directory(target) as tmp:
        (tmp / "f").write_text("three")
    assert (target / "f").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # old copy removed


def test_interrupted_swap_is_recovered_and_leftovers_removed(tmp_path: Path):
    """A crash between 'old aside' and 'new in' leaves only .idx.old-*: it is restored."""
    target = tmp_path / "idx"
    old = tmp_path / ".idx.old-1234"
    old.mkdir()
    write_manifest(old, _manifest([]))
    leftover = tmp_path / ".idx.tmp-abcd"
    leftover.mkdir()
    assert recover_directory(target) is True
    assert read_manifest(target).kb == "text"
    assert recover_directory(target) is False
    assert remove_leftovers(target) == [leftover]
    assert not leftover.exists()
    assert os.listdir(tmp_path) == ["idx"]
