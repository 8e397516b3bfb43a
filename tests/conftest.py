"""Suite-wide fixtures: where the shared real data lives, offline settings, and the
session-scoped real mkqa-mini index (MiniLM + EfficientNet-Lite0, all three KBs) with its dev
questions. Fake encoders and tiny corpora for unit tests are in ``kb/kb_helpers.py``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------- real mkqa-mini

MKQA_TOML = """\
index_dir = "{index_dir}"

[[kb]]
name = "text"
description = "Wikipedia passages about people, places, works and events."
modality = "text"
aliases = ["Text Retriever"]
source = {{ path = "{corpus}/text.jsonl" }}
retrieval = {{ mode = "hybrid", k = 10 }}

[[kb]]
name = "table"
description = "Wikipedia tables: statistics, rankings, results, country facts."
modality = "table"
aliases = ["Table Retriever"]
source = {{ manifest = "{corpus}/tables.jsonl" }}
retrieval = {{ mode = "hybrid", k = 10 }}

[[kb]]
name = "image"
description = "Photos of monuments, animals, planets and flags with captions."
modality = "image"
aliases = ["Text Image Retriever"]
source = {{ manifest = "{corpus}/images.jsonl" }}
retrieval = {{ mode = "hybrid", k = 10 }}
"""


@pytest.fixture(scope="session")
def mkqa_config_path(tmp_path_factory: pytest.TempPathFactory, mkqa_dir: Path) -> Path:
    """A kbs.toml for mkqa-mini (all three KBs, packaged encoders) in a session tmp dir.

    The index goes into that tmp dir too, unless ``KBROUTER_TEST_MKQA_INDEX`` names a folder to
    reuse across sessions (handy while developing; staleness checks still apply).
    """
    folder = tmp_path_factory.mktemp("mkqa_kbs")
    path = folder / "kbs.toml"
    index_dir = os.environ.get("KBROUTER_TEST_MKQA_INDEX") or (folder / "index").as_posix()
    text = MKQA_TOML.format(corpus=(mkqa_dir / "corpus").as_posix(), index_dir=index_dir)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def mkqa_registry(mkqa_config_path: Path) -> Any:
    """The mkqa-mini registry with all three indexes built once per session (~2-4 min)."""
    from kbrouter.config import load_registry_config
    from kbrouter.kb.registry import KBRegistry

    reg = KBRegistry.from_config(load_registry_config(mkqa_config_path))
    report = reg.build(progress=False)
    assert report.ok, report.failed
    yield reg
    reg.close()


@pytest.fixture(scope="session")
def mkqa_dev(mkqa_dir: Path) -> list[dict]:
    with (mkqa_dir / "questions" / "dev.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
