"""Image encoders: EfficientNet-Lite0 finds KB images from re-cropped copies; CLIP plug-in path."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest

from kbrouter.encoders.base import ImageEncoder
from kbrouter.encoders.image import (
    ClipEncoder,
    EfficientNetLite0Encoder,
    ImageEncoderCache,
    load_image_encoder,
    open_rgb,
)
from kbrouter.errors import ImageError, ModelError


@pytest.fixture(scope="module")
def effnet() -> ImageEncoder:
    return load_image_encoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny transformers CLIPModel + processor saved to disk."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    out = tmp_path_factory.mktemp("tiny-clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    torch.manual_seed(0)
    text_cfg = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision_cfg = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    cfg = CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=16)
    CLIPModel(cfg).save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def _kb_images(mkqa_dir: Path) -> tuple[list[str], list[Path]]:
    ids, paths = [], []
    with (mkqa_dir / "corpus" / "images.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            ids.append(row["id"])
            paths.append(mkqa_dir / "corpus" / row["path"])
    return ids, paths


def test_effnet_identity(effnet: ImageEncoder) -> None:
    """EfficientNet-Lite0 is 1280-d, image-only, with a stable name."""
    assert isinstance(effnet, EfficientNetLite0Encoder)
    assert effnet.dim == 1280
    assert effnet.supports_text is False
    assert effnet.name == "efficientnet-lite0:efficientnet-lite0-57934424"
    with pytest.raises(NotImplementedError, match="cannot embed text"):
        effnet.encode_texts(["a flag"])


@pytest.mark.slow
@pytest.mark.integration
def test_effnet_finds_gold_kb_image(effnet: ImageEncoder, mkqa_dir: Path) -> None:
    """Question images (re-cropped, re-encoded KB images) have their gold KB image as top-1."""
    ids, paths = _kb_images(mkqa_dir)
    kb = effnet.encode_images(paths, batch_size=32)
    assert kb.shape == (len(paths), 1280) and kb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(kb, axis=1), 1.0, atol=1e-5)

    questions = []
    with (mkqa_dir / "questions" / "dev.jsonl").open(encoding="utf-8") as f:
        for line in f:
            q = json.loads(line)
            gold = [e for e in q["evidence"] if e.startswith("img-")]
            if q["image"] and gold:
                questions.append((mkqa_dir / "questions" / q["image"], gold[0], q["source"]))
    assert len(questions) >= 80
    qv = effnet.encode_images([p for p, _, _ in questions])
    top1 = [ids[i] for i in (qv @ kb.T).argmax(axis=1)]
    correct = [t == g for t, (_, g, _) in zip(top1, questions, strict=True)]
    assert np.mean(correct) >= 0.9
    flags = [c for c, (_, _, s) in zip(correct, questions, strict=True) if "flag" in s]
    monuments = [c for c, (_, _, s) in zip(correct, questions, strict=True) if "monument" in s]
    assert len(flags) >= 20 and np.mean(flags) >= 0.9
    assert len(monuments) >= 5 and np.mean(monuments) >= 0.9


def test_effnet_batching_is_consistent(effnet: ImageEncoder, mkqa_dir: Path) -> None:
    """Encoding in batches of 1 or 4 gives the same vectors."""
    _, paths = _kb_images(mkqa_dir)
    a = effnet.encode_images(paths[:4], batch_size=1)
    b = effnet.encode_images(paths[:4], batch_size=4)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert effnet.encode_images([]).shape == (0, 1280)


def test_missing_and_corrupt_images_name_the_file(effnet: ImageEncoder, tmp_path: Path) -> None:
    """A missing or undecodable file raises ImageError naming it, even mid-batch."""
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    missing = tmp_path / "missing.jpg"
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ImageError, match="missing.jpg"):
        effnet.encode_images([good, missing])
    with pytest.raises(ImageError, match="corrupt.jpg"):
        effnet.encode_images([good, corrupt])
    with pytest.raises(ImageError, match="not a file"):
        effnet.encode_images([tmp_path])


def test_modes_are_converted_to_rgb(effnet: ImageEncoder, tmp_path: Path) -> None:
    """Grayscale, palette and transparent images are read as RGB (transparency on white)."""
    from PIL import Image

    gray = tmp_path / "gray.png"
    Image.new("L", (50, 50), 128).save(gray)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(rgba)
    pal = tmp_path / "pal.gif"
    Image.new("P", (50, 50), 3).save(pal)
    for p in (gray, rgba, pal):
        assert open_rgb(p).mode == "RGB"
    assert open_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    vecs = effnet.encode_images([gray, rgba, pal])
    assert vecs.shape == (3, 1280)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_hf_clip_plugin(tiny_clip_dir: Path, mkqa_dir: Path) -> None:
    """An hf-clip model embeds images and texts as unit vectors in one shared space."""
    enc = load_image_encoder(f"hf-clip:{tiny_clip_dir}")
    assert isinstance(enc, ClipEncoder)
    assert enc.supports_text is True
    assert enc.dim == 16
    assert enc.name == f"hf-clip:{tiny_clip_dir.name}"
    _, paths = _kb_images(mkqa_dir)
    imgs = enc.encode_images(paths[:5], batch_size=2)
    texts = enc.encode_texts(["a flag", "a photo of a cat", "mount rushmore"])
    assert imgs.shape == (5, 16) and texts.shape == (3, 16)
    assert imgs.dtype == np.float32 and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(imgs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(enc.encode_images(paths[:1]), imgs[:1], atol=1e-5)
    scores = texts @ imgs.T
    assert scores.shape == (3, 5) and np.all(np.abs(scores) <= 1.0 + 1e-5)
    assert enc.encode_texts([]).shape == (0, 16)


def test_bad_encoder_names_are_model_errors(tmp_path: Path) -> None:
    """Unknown names, malformed specs and missing folders raise ModelError naming them."""
    with pytest.raises(ModelError, match="resnet-9000"):
        load_image_encoder("resnet-9000")
    with pytest.raises(ModelError, match="open_clip:ViT-B-32"):
        load_image_encoder("open_clip:ViT-B-32")
    with pytest.raises(ModelError, match="absent-clip"):
        load_image_encoder(f"hf-clip:{tmp_path / 'absent-clip'}")
    with pytest.raises(ModelError, match="empty"):
        load_image_encoder("")
    with pytest.raises(ModelError, match="weights not found"):
        EfficientNetLite0Encoder(weights=tmp_path / "nope.pth")


def test_cache_shares_loaded_encoders() -> None:
    """An explicit cache object returns the same encoder for the same name."""
    cache = ImageEncoderCache()
    assert cache.get("efficientnet-lite0") is cache.get("efficientnet-lite0")
    assert len(cache) == 1
