"""``kbrouter ask``: bad input gives a clear error; a full run builds the index and traces."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kbrouter.cli.main import app
from kbrouter.types import Trajectory

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo"
sys.path.insert(0, str(REPO / "tests" / "models"))

runner = CliRunner()


def _out(result) -> str:
    return result.stdout + (result.stderr or "")


def test_missing_image_is_a_clear_error(tmp_path: Path):
    """A missing --image exits with code 2 and names the file (no traceback)."""
    result = runner.invoke(app, ["ask", "What flag?", "--image", str(tmp_path / "nope.jpg")])
    assert result.exit_code == 2
    assert "image not found" in _out(result) and "nope.jpg" in _out(result)
    assert "Traceback" not in _out(result)


def test_undecodable_image_is_a_clear_error(tmp_path: Path):
    """A file that is not an image exits with code 2 and says it cannot be decoded."""
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    result = runner.invoke(app, ["ask", "What flag?", "--image", str(bad)])
    assert result.exit_code == 2
    assert "cannot decode image" in _out(result)


@pytest.fixture()
def lexical_config(tmp_path: Path) -> Path:
    """The demo KBs (BM25 only) with their index in a fresh temp dir (not built yet)."""
    from kbrouter.testing import lexical_demo_config

    return lexical_demo_config(tmp_path)


@pytest.fixture(scope="module")
def fake_server():
    from chat_server import ChatServer

    with ChatServer() as server:
        yield server


def test_json_run_builds_index_and_prints_trajectory(lexical_config: Path, fake_server):
    """An unbuilt index is built; --json prints only a valid trajectory. The fake server's
    echo replies are not in router format, so the run shows the retry-then-fallback path."""
    model = f"openai:fake@{fake_server.base_url}"
    result = runner.invoke(
        app,
        [
            "ask",
            "What is the capital of Peru?",
            "--kbs",
            str(lexical_config),
            "-m",
            model,
            "--json",
        ],
    )
    assert result.exit_code == 0, _out(result)
    traj = Trajectory.model_validate_json(result.stdout)
    assert traj.question.text == "What is the capital of Peru?"
    assert traj.stop_reason == "format_fallback"
    assert len(traj.steps[0].route_calls) == 3
    assert traj.answer.startswith("echo:")
    assert (lexical_config.parent / "index").is_dir()


def test_live_trace_run_prints_notes_and_answer(lexical_config: Path, fake_server):
    """Without --json the trace (notes) and the answer panel are printed."""
    model = f"openai:fake@{fake_server.base_url}"
    result = runner.invoke(
        app,
        [
            "ask",
            "What is the capital of Peru?",
            "--kbs",
            str(lexical_config),
            "-m",
            model,
            "--max-steps",
            "1",
            "--no-grammar",
        ],
    )
    assert result.exit_code == 0, _out(result)
    assert "note: router output rejected" in result.stdout
    assert "answer" in result.stdout and "echo:" in result.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)


def test_replay_through_the_cli_keys_on_the_model_not_the_server_url(
    lexical_config: Path, tmp_path: Path
):
    """`ask --cache-dir` twice: the second run replays every call, even with the model served
    from another URL that is down (the cache keys on model identity, not the server address)."""
    from chat_server import ChatServer

    cache = tmp_path / "cache"
    args = ["ask", "What is the capital of Peru?", "--kbs", str(lexical_config), "--json"]
    with ChatServer() as server:
        first = runner.invoke(
            app, [*args, "-m", f"openai:fake@{server.base_url}", "--cache-dir", str(cache)]
        )
    assert first.exit_code == 0, _out(first)
    dead = "http://127.0.0.1:9/v1"  # nothing listens there
    second = runner.invoke(app, [*args, "-m", f"openai:fake@{dead}", "--cache-dir", str(cache)])
    assert second.exit_code == 0, _out(second)
    a = Trajectory.model_validate_json(first.stdout)
    b = Trajectory.model_validate_json(second.stdout)
    assert b.answer == a.answer and all(c.cached for c in b.model_calls())
    assert not any(c.cached for c in a.model_calls())


def test_ask_with_a_dead_model_server_fails_fast_naming_the_url(lexical_config: Path):
    dead = "http://127.0.0.1:9/v1"  # nothing listens there
    t0 = time.perf_counter()
    result = runner.invoke(
        app,
        ["ask", "What is the capital of Peru?", "--kbs", str(lexical_config), "-m",
         f"openai:fake@{dead};max_retries=0", "--json"],
    )  # fmt: skip
    assert result.exit_code == 1
    assert f"{dead}/chat/completions" in _out(result) and "Traceback" not in _out(result)
    assert time.perf_counter() - t0 < 60


def test_ask_takes_method_settings_and_rejects_bad_ones_before_any_work(tmp_path: Path):
    from kbrouter.cli.ask_cmd import _policy

    policy = _policy("r1-router", None, None, {"image_entity": True, "table_reader": "sql"})
    assert policy.config.image_entity and policy.config.table_reader == "sql"
    cfg = tmp_path / "kbs.toml"
    cfg.write_text(
        (DEMO / "kbs.toml")
        .read_text()
        .replace('index_dir = ".kbrouter/index"', f'index_dir = "{tmp_path / "ix"}"')
    )
    result = runner.invoke(app, ["ask", "q?", "--kbs", str(cfg), "--option", "table_reader=bogus"])
    assert result.exit_code == 2 and "table_reader" in _out(result)
    assert not (tmp_path / "ix").exists()  # failed before building any index


def test_ask_takes_a_model_per_call_purpose(lexical_config: Path, fake_server):
    """``--model-for PURPOSE=SPEC`` adds a backend for one call purpose (recorded in the
    trajectory); a malformed pair, a purpose named twice or an unknown purpose is refused before
    any work."""
    model = f"openai:fake@{fake_server.base_url}"
    base = ["ask", "What is the capital of Peru?", "--kbs", str(lexical_config), "-m", model]
    result = runner.invoke(app, [*base, "--json", "--model-for", f"final={model};vision=false"])
    assert result.exit_code == 0, _out(result)
    traj = Trajectory.model_validate_json(result.stdout)
    assert set(traj.config["purpose_models"]) == {"final"}
    for bad, message in [
        (["--model-for", "final"], "expects PURPOSE=SPEC"),
        (["--model-for", f"final={model}", "--model-for", "final=llama-cpp"], "twice"),
        (["--model-for", "reading=llama-cpp"], "unknown call purpose 'reading'"),
    ]:
        result = runner.invoke(app, [*base, *bad])
        assert result.exit_code != 0 and message in _out(result), _out(result)
        assert "Traceback" not in _out(result)


@pytest.mark.parametrize("command", ["serve", "mcp"])
def test_serve_and_mcp_refuse_a_bad_model_for_before_any_work(command: str, tmp_path: Path):
    """``serve`` and ``mcp`` take ``--model-for`` as ``ask`` does; a bad pair fails before any
    KB or model is opened (the KB config named here does not even exist)."""
    kbs = str(tmp_path / "missing.toml")
    for bad, message in [
        (["--model-for", "route"], "expects PURPOSE=SPEC"),
        (["--model-for", "reading=llama-cpp"], "unknown call purpose 'reading'"),
    ]:
        result = runner.invoke(app, [command, "--kbs", kbs, *bad])
        assert result.exit_code != 0 and message in _out(result), _out(result)
        assert "Traceback" not in _out(result)
