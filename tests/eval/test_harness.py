"""The evaluation harness (incremental results, resume, refusal of a different run) and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kbrouter.cli.main import app
from kbrouter.engine.engine import EngineConfig
from kbrouter.errors import ConfigError, DatasetError
from kbrouter.eval.harness import load_results, run_eval
from kbrouter.eval.report import write_report
from kbrouter.testing import ScriptedChatModel, StaticKB, StaticKBRegistry
from kbrouter.types import ChatMessage, Evidence, Modality

QUESTIONS = [
    ("q1", "What is the capital of France?", "Paris", ["text"], "geo"),
    ("q2", "Which river flows through Paris?", "Seine", ["text"], "geo"),
    ("q3", "What is the area of France?", "551695", ["table"], "stats"),
    ("q4", "Is Paris in France?", "yes", ["text"], "geo"),
    ("q5", "What is the capital of Italy?", "Rome", ["table"], "geo"),
]


def _answer(messages: list[ChatMessage]) -> str:
    """A fake model: answers with the gold when it was shown evidence, else 'unknown'."""
    text = messages[-1].text()
    for _, q, gold, _, _ in QUESTIONS:
        if q in text and "Evidence:" in text:
            return f"<think>easy</think><answer>{gold}</answer>"
    return "<answer>unknown</answer>"


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    path = tmp_path / "qs.jsonl"
    rows = [
        {"id": i, "question": q, "answers": [a], "gold_kbs": kbs, "source": src}
        for i, q, a, kbs, src in QUESTIONS
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f"jsonl:{path}"


def _registry() -> StaticKBRegistry:
    ev = Evidence(kb="text", id="t1", score=0.0, text="Paris is the capital of France")
    tev = Evidence(
        kb="table", id="b1", score=0.0, text="France area 551695", modality=Modality.TABLE
    )
    return StaticKBRegistry(
        [StaticKB("text", [ev]), StaticKB("table", [tev], modality=Modality.TABLE)]
    )


def _run(dataset, out, method="all-kbs", model=None, **kw):
    model = model or ScriptedChatModel(_answer)
    cfg = EngineConfig(concurrency=kw.pop("concurrency", 2))
    summary = run_eval(
        dataset,
        method,
        cfg,
        "scripted",
        out,
        registry=_registry(),
        model=model,
        progress=False,
        **kw,
    )
    return summary, model


def test_results_are_self_describing(dataset, tmp_path):
    """One line per question with scores, routing and trajectory; config and summary files."""
    out = tmp_path / "run"
    summary, _ = _run(dataset, out, limit=3)
    lines = load_results(out)
    assert [r["id"] for r in sorted(lines, key=lambda r: r["id"])] == ["q1", "q2", "q3"]
    first = next(r for r in lines if r["id"] == "q1")
    assert first["prediction"] == "Paris" and first["scores"]["f1_recall"] == 1.0
    assert first["routing"]["calls_per_kb"] == {"text": 1, "table": 1}
    assert first["routing"]["hop_correct_lenient"] == [True]
    assert first["routing"]["hop_correct_strict"] == [False]  # all-kbs searches both
    assert first["trajectory"]["final_call"]["messages"]  # prompts kept by default
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["run"]["method"] == "all-kbs" and cfg["run"]["seed"] == 0
    assert cfg["run"]["engine"]["seed"] == 0
    assert "kbrouter_version" in cfg and "libraries" in cfg and "git" in cfg
    assert summary["questions"] == 3 and summary["complete"]
    assert summary["f1_recall"] == pytest.approx(100.0)
    assert summary["routing"]["retrieval_calls_per_question"] == 2.0
    assert json.loads((out / "summary.json").read_text())["questions"] == 3


def test_resume_after_interruption_with_truncated_line(dataset, tmp_path):
    """A re-run skips finished ids, drops a truncated last line and runs only what is missing."""
    out = tmp_path / "run"
    _run(dataset, out, limit=3)
    with (out / "results.jsonl").open("a") as f:
        f.write('{"id": "q4", "prediction": "yes", "sco')  # killed mid-write
    summary, model = _run(dataset, out)  # all 5 now
    assert model.calls == 2  # q4 and q5 only
    ids = [r["id"] for r in load_results(out)]
    assert sorted(ids) == ["q1", "q2", "q3", "q4", "q5"] and len(ids) == 5
    assert summary["questions"] == 5
    # every line parses: the truncated fragment is gone
    for line in (out / "results.jsonl").read_text().splitlines():
        json.loads(line)
    # nothing left to do: no model call at all
    _, model = _run(dataset, out)
    assert model.calls == 0


def test_interrupt_keeps_finished_questions(dataset, tmp_path):
    """KeyboardInterrupt mid-run leaves the finished questions on disk for resuming."""
    out = tmp_path / "run"
    calls = {"n": 0}

    def flaky(messages):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return _answer(messages)

    with pytest.raises(KeyboardInterrupt):
        _run(dataset, out, model=ScriptedChatModel(flaky), concurrency=1)
    assert [r["id"] for r in load_results(out)] == ["q1", "q2"]
    summary, model = _run(dataset, out, concurrency=1)
    assert model.calls == 3 and summary["questions"] == 5


def test_a_different_run_is_refused(dataset, tmp_path):
    """Re-using a results directory for another method or seed is a ConfigError."""
    out = tmp_path / "run"
    _run(dataset, out, limit=2)
    with pytest.raises(ConfigError, match="different run.*method"):
        _run(dataset, out, method="direct", limit=2)
    with pytest.raises(ConfigError, match="seed"):
        _run(dataset, out, limit=2, seed=7)


def test_missing_images_fail_before_running(tmp_path):
    """A retrieval method on questions whose images are absent fails with --image-dir advice;
    direct answering with a text-only model does not need them."""
    path = tmp_path / "img.jsonl"
    path.write_text(json.dumps({"question": "What is shown?", "answers": ["x"], "image": "a.jpg"}))
    with pytest.raises(DatasetError, match="--image-dir"):
        _run(f"jsonl:{path}", tmp_path / "r1")
    summary, _ = _run(f"jsonl:{path}", tmp_path / "r2", method="direct")
    assert summary["questions"] == 1


def test_report_tables_and_plots(dataset, tmp_path):
    """The report has methods as rows, datasets as columns, an average, routing and plots."""
    runs = tmp_path / "runs"
    _run(dataset, runs / "all", method="all-kbs")
    _run(dataset, runs / "direct", method="direct")
    _run(dataset, runs / "single", method="single-kb:table")
    rep = write_report([runs], tmp_path / "report")
    assert rep.rows == ["direct", "single-kb:table", "all-kbs"]
    ds_name = rep.datasets[0]
    assert rep.table["all-kbs"][ds_name] == pytest.approx(100.0)
    assert rep.table["direct"][ds_name] < 100.0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| Method |" in md and "Avg" in md and "per source" in md
    js = json.loads((tmp_path / "report" / "report.json").read_text())
    single = next(r for r in js["runs"] if r["method"] == "single-kb:table")
    assert single["summary"]["routing"]["kb_accuracy_strict"] == pytest.approx(2 / 5)
    for png in ("score_by_dataset.png", "retrieval_calls.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rows_name_method_settings(dataset, tmp_path):
    """Two runs of one method with different policy settings get distinct report rows."""
    runs = tmp_path / "runs"
    _run(dataset, runs / "ircot", method="ircot")
    _run(dataset, runs / "ircot2", method="ircot", method_options={"max_steps": 1})
    rep = write_report([runs], tmp_path / "report")
    assert sorted(rep.rows) == ["ircot", "ircot (max_steps=1)"]


def test_cli_report_and_errors(dataset, tmp_path):
    """`kbrouter report` writes the files; bad input to `kbrouter eval` is a clean exit 2."""
    _run(dataset, tmp_path / "runs" / "a", method="all-kbs")
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.md").is_file()
    res = runner.invoke(app, ["eval", "--dataset", "nope", "--method", "direct"])
    assert res.exit_code == 2 and "unknown dataset" in res.output
    res = runner.invoke(app, ["report", str(tmp_path / "empty-missing")])
    assert res.exit_code == 2 and "not found" in res.output


def test_errored_questions_are_retried_on_resume(dataset, tmp_path):
    """Questions whose model call failed are written with the error and re-run on resume."""
    out = tmp_path / "run"
    summary, _ = _run(dataset, out, limit=2, model=ScriptedChatModel(_answer, fail_at=[0, 1]))
    assert summary["errors"] == 2 and summary["f1_recall"] == 0.0
    summary, model = _run(dataset, out, limit=2)
    assert model.calls == 2
    assert summary["errors"] == 0 and summary["f1_recall"] == pytest.approx(100.0)
    assert len(load_results(out)) == 4  # old error lines kept; the latest line of each id counts


NEEDS = {  # the evidence text a question's gold answer can be read from
    "What is the capital of France?": "Paris is the capital of France",
    "What is the area of France?": "France area 551695",
}


def _reader(messages: list[ChatMessage]) -> str:
    """A fake reader: answers right only when the evidence its question needs is in the prompt
    (or, in a final prompt, a sub-answer already has the gold)."""
    text = messages[-1].text()
    for _, q, gold, _, _ in QUESTIONS:
        if q in text and (NEEDS.get(q, "\x00") in text or f"Answer 1: {gold}" in text):
            return f"<answer>{gold}</answer>"
    return "<answer>unknown</answer>"


def test_error_attribution_per_question_in_the_summary_and_the_report(tmp_path):
    """Each result line says which stage failed first; the summary and report tabulate it;
    oracle-evidence shows exactly the gold documents and needs their ids."""
    ev = {"q1": ["t1"], "q2": ["t-seine"], "q3": ["b1"], "q4": ["t1"], "q5": ["b-italy"]}
    path = tmp_path / "qs.jsonl"
    rows = [
        {"id": i, "question": q, "answers": [a], "gold_kbs": kbs, "gold_evidence": ev[i]}
        for i, q, a, kbs, _ in QUESTIONS
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    runs = tmp_path / "runs"
    model = ScriptedChatModel(_reader)
    _run(f"jsonl:{path}", runs / "table", method="single-kb:table", model=model)
    stages = {r["id"]: r["attribution"]["stage"] for r in load_results(runs / "table")}
    # q1/q2/q4 need the text KB; q3's table was shown and read; q5's gold table is not in the KB
    assert stages == {
        "q1": "routing",
        "q2": "routing",
        "q3": "correct",
        "q4": "routing",
        "q5": "retrieval",
    }
    summary, _ = _run(f"jsonl:{path}", runs / "direct", method="direct", model=model)
    assert summary["attribution"]["counts"] == {"early_stop": 5}
    summary, _ = _run(f"jsonl:{path}", runs / "oracle", method="oracle-evidence", model=model)
    lines = {r["id"]: r for r in load_results(runs / "oracle")}
    assert lines["q1"]["attribution"]["stage"] == "correct"  # t1 fetched by id, read right
    assert [
        e["id"] for e in lines["q1"]["trajectory"]["steps"][0]["retrievals"][0]["evidence"]
    ] == ["t1"]
    assert lines["q2"]["trajectory"]["steps"][0]["retrievals"][0]["error"].startswith("no item")
    assert lines["q4"]["attribution"]["stage"] == "reading"  # shown t1, cannot answer from it
    rep = write_report([runs], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Where answers go wrong" in md and "| oracle-evidence | 5 |" in md
    assert (tmp_path / "report" / "attribution.png").read_bytes()[:4] == b"\x89PNG"
    assert any(p.name == "attribution.png" for p in rep.files)
    # without gold evidence ids, oracle-evidence is refused before running
    with pytest.raises(DatasetError, match="needs gold evidence ids"):
        _run(_plain_dataset(tmp_path), tmp_path / "x", method="oracle-evidence", model=model)


def _plain_dataset(tmp_path: Path) -> str:
    path = tmp_path / "plain.jsonl"
    rows = [{"id": i, "question": q, "answers": [a], "gold_kbs": k} for i, q, a, k, _ in QUESTIONS]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f"jsonl:{path}"


def test_sources_filter_selects_before_the_limit(dataset, tmp_path):
    summary, _ = _run(dataset, tmp_path / "stats", sources=["stats"])
    assert summary["questions"] == 1 and list(summary["by_source"]) == ["stats"]
    with pytest.raises(DatasetError, match="no source 'nope'; its sources: geo, stats"):
        _run(dataset, tmp_path / "x", sources=["nope"])


def test_a_dead_model_server_stops_the_eval_with_one_clear_error(dataset, tmp_path):
    """Circuit breaker: after a few calls in a row cannot reach the server, the eval stops with
    one error naming the URL instead of writing an error row for every question."""
    import socket

    from kbrouter.errors import ModelUnavailableError
    from kbrouter.models.openai_compat import OpenAICompatibleModel

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    model = OpenAICompatibleModel("m", base_url=url, api_key="x", max_retries=0, timeout=5)
    with pytest.raises(ModelUnavailableError, match="3 model calls in a row") as err:
        _run(dataset, tmp_path / "dead", method="direct", model=model, concurrency=1)
    assert f"{url}/chat/completions" in str(err.value)
    lines = load_results(tmp_path / "dead")
    assert len(lines) == 2 and all(r["error"] for r in lines)  # then it stopped


def test_resuming_with_another_dataset_file_or_model_is_refused(dataset, tmp_path):
    """The run fingerprint covers content: the dataset file's sha256 and the model identity."""
    out = tmp_path / "run"
    _run(dataset, out, limit=2)
    config = json.loads((out / "config.json").read_text())
    assert config["identity"]["model"] == {"backend": "ScriptedChatModel", "name": "scripted"}
    assert len(config["identity"]["dataset_sha256"]) == 64
    other = ScriptedChatModel(_answer, name="other-model")
    with pytest.raises(ConfigError, match="different model"):
        _run(dataset, out, limit=3, model=other)
    path = Path(dataset.split(":", 1)[1])
    path.write_text(path.read_text().replace("Paris", "Lyon"))
    with pytest.raises(ConfigError, match="different dataset file.*would mix two runs"):
        _run(dataset, out, limit=3)


def test_a_model_for_an_unknown_call_purpose_is_refused_before_any_work(dataset, tmp_path):
    """``purpose_models`` names call purposes; a misspelt one is a ConfigError and nothing
    runs (no results directory is written)."""
    model = ScriptedChatModel(_answer)
    with pytest.raises(ConfigError, match="unknown call purpose 'reader'"):
        _run(dataset, tmp_path / "run", model=model, purpose_models={"reader": "llama-cpp"})
    assert model.calls == 0 and not (tmp_path / "run").exists()
