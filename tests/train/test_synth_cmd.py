"""``kbrouter synth`` on real mkqa-mini questions and KBs with a scripted teacher: the gold KBs
of each question, mapped to the configured KB names, narrow the teacher's route grammar hop by
hop; ``--free-kbs`` leaves it every KB."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kbrouter.cli.main import app
from kbrouter.testing import ScriptedChatModel
from kbrouter.types import ChatMessage

runner = CliRunner()


def _reply(messages: list[ChatMessage]) -> str:
    system = messages[0].text()
    if "<ret>" in system:
        return "<think>t</think><sub-question>What is asked?</sub-question><ret>text</ret>"
    return "<answer>x</answer>"


def _grammar_kbs(grammar: str) -> list[str]:
    line = next(x for x in grammar.splitlines() if x.startswith("kb ::="))
    return re.findall(r'"([^"]+)"', line)


@pytest.mark.parametrize("gold", [True, False])
def test_synth_holds_the_teacher_to_the_gold_kbs(
    gold: bool, mkqa_registry, mkqa_config_path: Path, tmp_path: Path, monkeypatch
) -> None:
    from kbrouter.eval.datasets import load_dataset, select_examples

    teacher = ScriptedChatModel(_reply, supports_grammar=True)
    monkeypatch.setattr("kbrouter.models.registry.load_model", lambda spec, **kw: teacher)
    out = tmp_path / "steps.jsonl"
    args = [
        "synth", "-d", "mkqa-mini", "--teacher", "scripted", "--kbs", str(mkqa_config_path),
        "--out", str(out), "--limit", "4", "--max-steps", "1", "--concurrency", "1",
        "--threshold", "0", "--router-prompt", "compact",
    ]  # fmt: skip
    result = runner.invoke(app, [*args, "--gold-kbs" if gold else "--free-kbs"])
    assert result.exit_code == 0, result.stdout + (result.stderr or "")
    examples = select_examples(load_dataset("mkqa-mini").examples, 4, seed=0, stratify=True)
    first_kb = {ex.question.text: ex.gold_kbs[0] for ex in examples}
    first_calls = {}
    for messages, params in teacher.requests:
        text = messages[-1].text()
        if "<ret>" in messages[0].text() and "Question:" in text:
            q = next(q for q in first_kb if q in text)
            first_calls.setdefault(q, _grammar_kbs(params.grammar))
            # the compact prompt, listing every KB whatever the grammar allows
            assert "Knowledge bases:" in messages[0].text()
            assert all(f"- {kb} (" in messages[0].text() for kb in ("text", "table", "image"))
    assert set(first_calls) == set(first_kb)
    for q, kbs in first_calls.items():
        assert kbs == ([first_kb[q]] if gold else ["text", "table", "image"]), q


def test_synth_leaves_excluded_questions_out(
    mkqa_registry, mkqa_config_path: Path, tmp_path: Path, monkeypatch
) -> None:
    import json

    from kbrouter.eval.datasets import load_dataset, select_examples

    teacher = ScriptedChatModel(_reply, supports_grammar=True)
    monkeypatch.setattr("kbrouter.models.registry.load_model", lambda spec, **kw: teacher)
    held = select_examples(load_dataset("mkqa-mini").examples, 4, seed=0, stratify=True)
    ids = tmp_path / "holdout.json"
    ids.write_text(json.dumps({"seed": 0, "ids": [e.id for e in held]}))
    args = [
        "synth", "-d", "mkqa-mini", "--teacher", "scripted", "--kbs", str(mkqa_config_path),
        "--out", str(tmp_path / "s.jsonl"), "--limit", "4", "--max-steps", "1",
        "--threshold", "0", "--exclude", str(ids),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stdout + (result.stderr or "")
    progress = (tmp_path / "s.jsonl.progress.jsonl").read_text().splitlines()
    done = {json.loads(line)["id"] for line in progress}
    assert len(done) == 4 and not done & {e.id for e in held}
    ids.write_text("[1, 2]")
    bad = runner.invoke(app, [*args[:-1], str(ids)])
    assert bad.exit_code != 0 and "list of question ids" in bad.stdout + (bad.stderr or "")


def test_synth_attempts_record_the_attempt_that_ended_each_question(
    mkqa_registry, mkqa_config_path: Path, tmp_path: Path, monkeypatch
) -> None:
    """--attempts re-runs a dropped question at --retry-temperature; the progress file says
    which attempt ended it. A greedy retry is refused before any work."""
    import json

    teacher = ScriptedChatModel(_reply, supports_grammar=True)  # answers "x": never right
    monkeypatch.setattr("kbrouter.models.registry.load_model", lambda spec, **kw: teacher)
    args = [
        "synth", "-d", "mkqa-mini", "--teacher", "scripted", "--kbs", str(mkqa_config_path),
        "--out", str(tmp_path / "s.jsonl"), "--limit", "2", "--max-steps", "1",
        "--seed", "3", "--attempts", "2",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stdout + (result.stderr or "")
    lines = (tmp_path / "s.jsonl.progress.jsonl").read_text().splitlines()
    progress = [json.loads(x) for x in lines]
    assert [(p["kept"], p["attempt"]) for p in progress] == [(False, 1), (False, 1)]
    temperatures = {(p.temperature, p.seed) for _, p in teacher.requests}
    assert temperatures == {(0.0, 3), (0.7, 4)}
    bad = runner.invoke(app, [*args, "--retry-temperature", "0", "--out", str(tmp_path / "b")])
    assert bad.exit_code != 0 and "--retry-temperature" in bad.stdout + (bad.stderr or "")
    assert not (tmp_path / "b.progress.jsonl").exists()
