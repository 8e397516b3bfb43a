"""Message conversion shared by the backends: image notes and data URLs."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from PIL import Image

from kbrouter.errors import ImageError
from kbrouter.models._messages import (
    IMAGE_NOTE,
    image_data_url,
    message_text,
    openai_messages,
    text_only_messages,
)
from kbrouter.types import ChatMessage, ImagePart, TextPart


@pytest.fixture
def jpeg(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 32), (0, 90, 200)).save(path)
    return path


def test_image_part_becomes_note_on_its_own_line(jpeg: Path):
    """Text-only wire form: the note replaces the image, separated from the text around it."""
    msg = ChatMessage(
        role="user",
        content=[TextPart(text="Question:"), ImagePart(path=jpeg), TextPart(text="Who?")],
    )
    assert message_text(msg) == f"Question:\n{IMAGE_NOTE}\nWho?"
    assert text_only_messages([msg]) == [{"role": "user", "content": message_text(msg)}]


def test_string_content_is_unchanged():
    """Plain string messages pass through untouched."""
    msg = ChatMessage(role="system", content="Be brief.")
    assert text_only_messages([msg]) == [{"role": "system", "content": "Be brief."}]


def test_data_url_has_mime_and_exact_bytes(jpeg: Path):
    """A data URL names the decoded format and carries the file's bytes unchanged."""
    url = image_data_url(jpeg)
    assert url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == jpeg.read_bytes()


def test_data_url_downscales_large_images(jpeg: Path):
    """max_side shrinks the longest side and re-encodes as JPEG."""
    import io

    url = image_data_url(jpeg, max_side=16)
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as img:
        assert max(img.size) == 16


def test_undecodable_image_is_image_error(tmp_path: Path):
    """A file that is not an image raises ImageError naming it."""
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match="bad.png"):
        image_data_url(bad)


def test_vision_parts_keep_order(jpeg: Path):
    """The vision wire form keeps text and image parts in their original order."""
    msg = ChatMessage(role="user", content=[TextPart(text="a"), ImagePart(path=jpeg)])
    cache: dict = {}
    (out,) = openai_messages([msg], vision=True, data_url_cache=cache)
    assert [p["type"] for p in out["content"]] == ["text", "image_url"]
    assert len(cache) == 1
    (again,) = openai_messages([msg], vision=True, data_url_cache=cache)
    assert again == out
