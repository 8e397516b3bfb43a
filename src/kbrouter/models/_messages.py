"""Message conversion shared by every chat backend.

Backends speak :class:`~kbrouter.types.ChatMessage` (text and image parts). Two wire forms exist:

- **text-only** (llama.cpp, text transformers models, text-only servers): every image part is
  replaced by :data:`IMAGE_NOTE`, so the model knows an image exists and that the image KB can
  search with it (:func:`text_only_messages`);
- **vision** (OpenAI-style servers with a VLM): image parts become ``image_url`` parts carrying a
  base64 ``data:`` URL (:func:`openai_messages`).
"""

from __future__ import annotations

import base64
import io
import mimetypes
from pathlib import Path

from kbrouter.errors import ImageError
from kbrouter.types import ChatMessage, ImagePart, TextPart

IMAGE_NOTE = (
    "[An image is attached to the question; you cannot see it. Route visual sub-questions to "
    "the image knowledge base, which searches with the image itself.]"
)
"""What a text-only model reads in place of an image part."""

_MIME_BY_FORMAT = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
}


def message_text(message: ChatMessage, image_note: str = IMAGE_NOTE) -> str:
    """The text of ``message`` with each image part replaced by ``image_note`` (own line)."""
    if isinstance(message.content, str):
        return message.content
    out = ""
    for part in message.content:
        if isinstance(part, TextPart):
            if out.endswith(image_note) and part.text and not part.text[0].isspace():
                out += "\n"
            out += part.text
        else:
            if out and not out.endswith("\n"):
                out += "\n"
            out += image_note
    return out


def text_only_messages(
    messages: list[ChatMessage], image_note: str = IMAGE_NOTE
) -> list[dict[str, str]]:
    """``[{"role", "content"}]`` dicts with plain-string content for text-only chat templates."""
    return [{"role": m.role, "content": message_text(m, image_note)} for m in messages]


def image_bytes(path: Path, max_side: int | None = None) -> tuple[bytes, str]:
    """Read an image file as ``(bytes, mime type)``, optionally downscaled to ``max_side``.

    Raises :class:`ImageError` if the file is missing or is not a decodable image.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read image {str(path)!r}: {e}") from e
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            fmt = img.format or ""
            if max_side is not None and max(img.size) > max_side:
                img.thumbnail((max_side, max_side))
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="JPEG", quality=90)
                return buf.getvalue(), "image/jpeg"
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode image {str(path)!r}: {e}") from e
    mime = _MIME_BY_FORMAT.get(fmt) or mimetypes.guess_type(path.name)[0] or "image/png"
    return raw, mime


def image_data_url(path: Path, max_side: int | None = None) -> str:
    """A ``data:<mime>;base64,...`` URL of the image file (see :func:`image_bytes`)."""
    raw, mime = image_bytes(path, max_side)
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def openai_messages(
    messages: list[ChatMessage],
    vision: bool,
    image_note: str = IMAGE_NOTE,
    max_image_side: int | None = None,
    data_url_cache: dict[tuple[str, int, int], str] | None = None,
) -> list[dict]:
    """Messages in the OpenAI chat-completions wire format.

    With ``vision`` image parts become ``{"type": "image_url", "image_url": {"url": data-URL}}``;
    without it the text-only form is used. ``data_url_cache`` (keyed by path, size, mtime) avoids
    re-encoding the question image at every step.
    """
    if not vision:
        return text_only_messages(messages, image_note)
    out: list[dict] = []
    for m in messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts: list[dict] = []
        for p in m.content:
            if isinstance(p, ImagePart):
                parts.append(
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": _cached_data_url(p.path, max_image_side, data_url_cache)
                        },
                    }
                )
            else:
                parts.append({"type": "text", "text": p.text})
        out.append({"role": m.role, "content": parts})
    return out


def _cached_data_url(
    path: Path, max_side: int | None, cache: dict[tuple[str, int, int], str] | None
) -> str:
    if cache is None:
        return image_data_url(path, max_side)
    try:
        st = Path(path).stat()
    except OSError as e:
        raise ImageError(f"cannot read image {str(path)!r}: {e}") from e
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    url = cache.get(key)
    if url is None:
        if len(cache) >= 64:
            cache.pop(next(iter(cache)))
        url = cache[key] = image_data_url(path, max_side)
    return url
