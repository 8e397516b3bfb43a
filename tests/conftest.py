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
