"""Suite-wide fixtures: where the shared real data lives, and offline settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spin-waiting is slow on shared CPUs
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# Test helper modules (chat_server, kb_helpers, train_helpers) are imported by name from several
# folders; with --import-mode=importlib test folders are not on sys.path, so put theirs there.
for _folder in ("models", "kb", "train"):
    sys.path.insert(0, str(Path(__file__).resolve().parent / _folder))
SHARED_DATA = Path(
    os.environ.get("KBROUTER_SHARED_DATA", REPO.parent / "shared" / "data")
).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data folder (``../shared/data`` next to the repo)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}; set KBROUTER_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mkqa_dir(shared_data: Path) -> Path:
    return shared_data / "mkqa-mini"


@pytest.fixture(scope="session")
def r1router_dir(shared_data: Path) -> Path:
    return shared_data / "r1router"


# --------------------------------------------------------------------------- learned router


def mkqa_kb_infos():
    """KB descriptions named like mkqa-mini's gold kinds (text / image / table)."""
    from kbrouter.kb.base import KBInfo
    from kbrouter.types import Modality

    return [
        KBInfo(
            name="text",
            description="Wikipedia passages",
            modality=Modality.TEXT,
            aliases=["Text Retriever"],
        ),
        KBInfo(
            name="image",
            description="Photos and flags with captions",
            modality=Modality.IMAGE,
            aliases=["Text Image Retriever"],
        ),
        KBInfo(
            name="table",
            description="Wikipedia tables",
            modality=Modality.TABLE,
            aliases=["Table Retriever"],
        ),
    ]


@pytest.fixture(scope="session")
def mkqa_infos():
    """KB descriptions named like mkqa-mini's gold kinds (text / image / table)."""
    return mkqa_kb_infos()


@pytest.fixture(scope="session")
def minilm():
    """The packaged all-MiniLM-L6-v2 text encoder (real, offline)."""
    from kbrouter.encoders.text import load_text_encoder

    return load_text_encoder("minilm")


@pytest.fixture(scope="session")
def mkqa_route_split(shared_data: Path):
    """mkqa-mini dev split by question with seed 0: (train, held-out) routing samples; the
    held-out part is every fifth question of each source in a seeded order."""
    import random

    from kbrouter.eval.datasets import load_dataset
    from kbrouter.routing.data import LabelResolver
    from kbrouter.train.router import dataset_route_samples

    ds = load_dataset("mkqa-mini", data_dir=shared_data)
    by_source: dict[str, list] = {}
    for e in ds.examples:
        by_source.setdefault(e.source, []).append(e)
    held: set[str] = set()
    rng = random.Random(0)
    for exs in by_source.values():
        exs = sorted(exs, key=lambda e: e.id)
        rng.shuffle(exs)
        held.update(e.id for e in exs[: max(1, len(exs) // 5)])
    samples = dataset_route_samples(ds.examples, LabelResolver(mkqa_kb_infos()))
    train = [s for s in samples if s.group not in held]
    test = [s for s in samples if s.group in held]
    return train, test


@pytest.fixture(scope="session")
def mkqa_router(mkqa_route_split, minilm):
    """A learned router fitted on the training part of mkqa-mini dev (logistic regression)."""
    from kbrouter.routing.router import RouterConfig, fit_router

    train, _ = mkqa_route_split
    return fit_router(train, ["text", "image", "table"], RouterConfig(seed=0), encoder=minilm)
