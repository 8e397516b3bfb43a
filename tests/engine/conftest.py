"""Real but cheap demo KBs (BM25 indexes over the repo's demo data) shared by these tests."""

from __future__ import annotations

import pytest

from kbrouter.testing import demo_registry


@pytest.fixture(scope="session")
def demo_kbs(tmp_path_factory: pytest.TempPathFactory):
    """The demo registry (text, tables, images) with lexical indexes built in a temp dir."""
    reg = demo_registry(tmp_path_factory.mktemp("demo-index"))
    yield reg
    reg.close()
