"""Regenerate the demo question images from the demo image-KB images.

Each question image is a slightly shifted, cropped, resized and JPEG re-encoded copy of one
KB image, so a retriever has to match it by content rather than by file bytes. The procedure is
deterministic for a given ``--seed`` (and Pillow version):

1. Open the KB image and flatten it onto white RGB.
2. Cut away a random 2-6 % of the width/height on each of the four sides.
3. Resize (Lanczos) so the long side is a random 200-240 pixels.
4. Save as JPEG, quality 82.

Run from the repository root::

    .venv/bin/python demo/make_question_images.py
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

from PIL import Image

logger = logging.getLogger("make_question_images")

DEMO_DIR = Path(__file__).resolve().parent

# question image (relative to demo/questions) -> KB image (relative to demo/)
QUESTION_IMAGES: dict[str, str] = {
    "flag.jpg": "images/flag_au.png",
    "flag_brazil.jpg": "images/flag_br.png",
    "flag_kenya.jpg": "images/flag_ke.png",
    "person.jpg": "images/grace_hopper.jpg",
}

CROP_FRACTION = (0.02, 0.06)
LONG_SIDE = (200, 240)
JPEG_QUALITY = 82


def derive(source: Path, target: Path, rng: random.Random) -> None:
    """Write a cropped, resized, re-encoded copy of ``source`` to ``target``."""
    with Image.open(source) as im:
        rgba = im.convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    w, h = flat.size
    left = round(w * rng.uniform(*CROP_FRACTION))
    right = w - round(w * rng.uniform(*CROP_FRACTION))
    top = round(h * rng.uniform(*CROP_FRACTION))
    bottom = h - round(h * rng.uniform(*CROP_FRACTION))
    cropped = flat.crop((left, top, right, bottom))
    long_side = rng.randint(*LONG_SIDE)
    scale = long_side / max(cropped.size)
    size = (max(1, round(cropped.width * scale)), max(1, round(cropped.height * scale)))
    resized = cropped.resize(size, Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    resized.save(target, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    box = (left, top, right, bottom)
    logger.info("%s <- %s crop=%s size=%s", target.name, source.name, box, size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=20261126, help="Random seed.")
    parser.add_argument(
        "--out", type=Path, default=DEMO_DIR / "questions", help="Output folder for the images."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, source in sorted(QUESTION_IMAGES.items()):
        # One generator per image, seeded by name, so adding an image changes no other.
        rng = random.Random(f"{args.seed}:{name}")
        derive(DEMO_DIR / source, args.out / name, rng)


if __name__ == "__main__":
    main()
