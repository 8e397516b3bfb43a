"""``kbrouter train router``, ``kbrouter route`` and ``kbrouter eval-routing`` on real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kbrouter.cli.main import app

REPO = Path(__file__).resolve().parents[2]
DEMO_KBS = REPO / "demo" / "kbs.toml"
runner = CliRunner()


def _out(result) -> str:
    return result.stdout + (result.stderr or "")


@pytest.fixture(scope="module")
def demo_router(tmp_path_factory, r1router_dir) -> Path:
    """A router for the demo KBs (text / tables / images) trained on mkqa-mini dev + steps."""
    out = tmp_path_factory.mktemp("router") / "r"
    result = runner.invoke(
        app,
        [
            "train", "router", "--dataset", "mkqa-mini",
            "--data", str(r1router_dir / "grpo_dataset_valid_new.jsonl"),
            "--kbs", str(DEMO_KBS), "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, _out(result)
    assert "held-out" in _out(result)
    return out


def test_train_router_writes_a_manifest_for_the_configured_kbs(demo_router):
    m = json.loads((demo_router / "manifest.json").read_text())
    assert m["labels"] == ["text", "tables", "images", "none"]
    assert m["data"]["origins"]["gold"] > 0 and m["data"]["origins"]["steps"] > 0
    assert m["encoder"]["name"] == "sentence-transformers:all-MiniLM-L6-v2"


def test_route_prints_the_distribution(demo_router):
    result = runner.invoke(
        app,
        [
            "route", "--router", str(demo_router), "--json",
            "--image", str(REPO / "demo" / "questions" / "flag.jpg"),
            "In which city is the national capital of the country whose flag is shown?",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, _out(result)
    dist = json.loads(result.stdout)
    assert dist["label"] == "images"
    assert set(dist["probs"]) == {"text", "tables", "images", "none"}
    assert abs(sum(dist["probs"].values()) - 1) < 1e-3
    table = runner.invoke(app, ["route", "--router", str(demo_router), "Who wrote Hamlet?"])
    assert table.exit_code == 0 and "probability" in table.stdout


def test_eval_routing_on_demo_questions_and_mkqa(demo_router, tmp_path):
    out = tmp_path / "eval"
    result = runner.invoke(
        app,
        [
            "eval-routing", "--router", str(demo_router), "--kbs", str(DEMO_KBS),
            "--dataset", f"jsonl:{REPO / 'demo' / 'questions.jsonl'}", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, _out(result)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("hop1_accuracy", "accuracy", "abstain_recall", "ece", "n"):
        assert key in summary
    assert summary["questions"] == 8
    assert (out / "confusion.png").stat().st_size > 0
    assert (out / "reliability.png").stat().st_size > 0
    assert (out / "misrouted.jsonl").is_file()
    # the demo questions are image -> table/text: the first hop is the image KB
    assert summary["hop1_accuracy"] >= 0.75

    cv = runner.invoke(
        app,
        [
            "eval-routing", "--method", "learned", "--cv", "3", "--kbs", str(DEMO_KBS),
            "--dataset", "mkqa-mini", "--limit", "60", "--out", str(tmp_path / "cv"),
        ],
    )  # fmt: skip
    assert cv.exit_code == 0, _out(cv)
    s = json.loads((tmp_path / "cv" / "summary.json").read_text())
    assert s["questions"] == 60 and len(s["folds"]) == 3 and s["hop1_accuracy"] >= 0.7

    rnd = runner.invoke(
        app,
        [
            "eval-routing", "--method", "random", "--kbs", str(DEMO_KBS),
            "--dataset", "mkqa-mini", "--limit", "60", "--out", str(tmp_path / "rnd"),
        ],
    )  # fmt: skip
    assert rnd.exit_code == 0, _out(rnd)
    r = json.loads((tmp_path / "rnd" / "summary.json").read_text())
    assert r["hop1_accuracy"] < s["hop1_accuracy"]


def test_router_errors_are_clear(tmp_path, demo_router):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question": "q?", "answer": "a", "gold_kbs": ["web"]}) + "\n")
    result = runner.invoke(
        app,
        ["train", "router", "--dataset", f"jsonl:{bad}", "--kbs", str(DEMO_KBS),
         "--out", str(tmp_path / "r")],
    )  # fmt: skip
    assert result.exit_code == 2 and "web" in _out(result) and "Traceback" not in _out(result)
    none = runner.invoke(app, ["train", "router", "--kbs", str(DEMO_KBS), "--out", str(tmp_path)])
    assert none.exit_code == 2 and "no training data" in _out(none)
    # a router trained for the demo KBs cannot score the mkqa-mini KBs
    mk = runner.invoke(
        app,
        ["eval-routing", "--router", str(demo_router), "--kbs",
         str(REPO / "benchmarks" / "mkqa_kbs.toml"), "--dataset", "mkqa-mini", "--limit", "5",
         "--out", str(tmp_path / "x")],
    )  # fmt: skip
    assert mk.exit_code == 2 and "retrain" in _out(mk)


def test_the_cli_does_not_force_offline_mode(monkeypatch, tmp_path):
    """A user with network may name a hub model: only the demo and the tests set offline mode."""
    import os

    from typer.testing import CliRunner

    from kbrouter.cli.main import app

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    res = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2
    assert "HF_HUB_OFFLINE" not in os.environ
