"""``kbrouter train gold-paths`` on the demo questions and the demo KBs (BM25 only)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from kbrouter.cli.main import app

REPO = Path(__file__).resolve().parents[2]
QUESTIONS = REPO / "demo" / "questions.jsonl"
runner = CliRunner()


def _out(result) -> str:  # noqa: ANN001
    return result.stdout + (result.stderr or "")


def _sub_answer_prompts(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["messages"][-1]["content"] for r in rows if r["step_type"] == "ans"]


def test_gold_paths_apply_the_relevance_margin_asked_for(tmp_path: Path) -> None:
    """``--relevance-margin`` sets what a sub-answer sample shows, as the policy would; a bad
    value is refused before any index is built."""
    from kbrouter.testing import lexical_demo_config

    kbs = lexical_demo_config(tmp_path)
    bad = runner.invoke(
        app,
        ["train", "gold-paths", "-d", f"jsonl:{QUESTIONS}", "--kbs", str(kbs),
         "-o", str(tmp_path / "x.jsonl"), "--relevance-margin", "1.5"],
    )  # fmt: skip
    assert bad.exit_code == 2 and "--relevance-margin" in _out(bad), _out(bad)
    assert not (tmp_path / "index").exists() and not (tmp_path / "x.jsonl").exists()

    prompts = {}
    for margin in ("none", "0"):
        out = tmp_path / f"{margin}.jsonl"
        result = runner.invoke(
            app,
            ["train", "gold-paths", "-d", f"jsonl:{QUESTIONS}", "--kbs", str(kbs),
             "-o", str(out), "--relevance-margin", margin],
        )  # fmt: skip
        assert result.exit_code == 0, _out(result)
        prompts[margin] = _sub_answer_prompts(out)
    # the architect question's text hop: top-2 without a margin, only the best hit with 0
    (off,), (on,) = prompts["none"], prompts["0"]
    assert "(1) [text] Brasília:" in off and "(2) [text]" in off
    assert "(1) [text] Brasília:" in on and "(2) [text]" not in on
