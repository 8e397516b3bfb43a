"""KB test fixtures: the session-scoped real mkqa-mini index (MiniLM + EfficientNet-Lite0, all
three KBs) and its dev questions. Fake encoders and tiny corpora for unit tests are in
``kb_helpers.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kbrouter.config import load_registry_config

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
