"""``kbrouter train sft|step-grpo`` end to end on a tiny model folder (two updates each), and
clean errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import tiny_llama, warmup_data
from typer.testing import CliRunner

from kbrouter.cli.main import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model_dir(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    out = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(tok, seed=3).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def steps_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kbrouter.train.steps import write_steps

    return write_steps(warmup_data()[:16], tmp_path_factory.mktemp("data") / "steps.jsonl")


def test_train_sft_and_step_grpo_commands(
    tiny_model_dir: Path, steps_file: Path, tmp_path: Path
) -> None:
    """SFT then Step-GRPO from the SFT checkpoint; both write loadable checkpoints."""
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "train",
            "sft",
            "--data",
            str(steps_file),
            "--model",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "sft"),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
        ],
    )
    assert res.exit_code == 0, res.output
    ckpt = tmp_path / "sft" / "final"
    assert (ckpt / "config.json").is_file() and (ckpt / "kbrouter_train.json").is_file()
    cfg = tmp_path / "grpo.json"
    cfg.write_text(json.dumps({"rewards": {"similarity_weight": 0.0, "format_weight": 0.5}}))
    res = runner.invoke(
        app,
        [
            "train",
            "step-grpo",
            "--data",
            str(steps_file),
            "--model",
            str(ckpt),
            "--out",
            str(tmp_path / "grpo"),
            "--config",
            str(cfg),
            "--max-steps",
            "2",
            "--num-generations",
            "4",
            "--batch-size",
            "8",
            "--max-completion-length",
            "16",
            "--lr",
            "1e-4",
        ],
    )
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "grpo" / "final" / "kbrouter_train.json").read_text())
    assert info["config"]["num_generations"] == 4
    assert info["config"]["epsilon"] == 0.2  # from the paper preset
    assert info["config"]["rewards"]["format_weight"] == 0.5  # from the config file
    assert info["result"]["steps"] == 2


def test_bad_inputs_give_clean_errors(tmp_path: Path, steps_file: Path) -> None:
    runner = CliRunner()
    missing = str(tmp_path / "none.jsonl")
    res = runner.invoke(app, ["train", "sft", "--data", missing, "--model", "m"])
    assert res.exit_code == 2 and "step file not found" in res.output
    data = str(steps_file)
    res = runner.invoke(app, ["train", "sft", "--data", data, "--model", "m", "--lr", "0"])
    assert res.exit_code == 2 and "learning_rate" in res.output
    res = runner.invoke(
        app,
        [
            "train",
            "step-grpo",
            "--data",
            str(steps_file),
            "--model",
            "m",
            "--num-generations",
            "3",
            "--batch-size",
            "4",
        ],
    )
    assert res.exit_code == 2 and "divisible by num_generations" in res.output

    # on-policy labelling and rollout options
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "q9", "question": "Who?", "answers": ["x"]}) + "\n")
    kbs = Path(__file__).resolve().parents[2] / "demo" / "kbs.toml"
    base = ["train", "step-grpo", "--on-policy", "--model", "m", "--out", str(tmp_path / "op")]
    base += ["--dataset", f"jsonl:{questions}", "--kbs", str(kbs)]
    res = runner.invoke(app, [*base, "--gold-steps", data, "--teacher", "llama-cpp"])
    assert res.exit_code == 2 and "pass one" in " ".join(res.output.split())
    res = runner.invoke(app, [*base, "--rollout-backend", "vllm"])
    assert res.exit_code == 2 and "unknown --rollout-backend 'vllm'" in " ".join(res.output.split())
    res = runner.invoke(app, [*base, "--gold-steps", data])  # no question of the file has any
    assert res.exit_code == 2 and "has gold steps in" in " ".join(res.output.split())


def test_on_policy_loop_regenerates_prompts_each_round(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The on-policy outer loop rolls out (here: a scripted engine), turns trajectories into
    step prompts with gold final targets, and trains one round per rollout."""
    import asyncio

    from kbrouter.engine.engine import Engine, EngineConfig
    from kbrouter.eval.datasets import EvalExample
    from kbrouter.policies.r1router import R1RouterPolicy
    from kbrouter.testing import ScriptedChatModel, StaticKB, StaticKBRegistry
    from kbrouter.train.config import OnPolicyConfig, StepGRPOConfig
    from kbrouter.train.rewards import RewardConfig
    from kbrouter.train.step_grpo import train_step_grpo_on_policy
    from kbrouter.types import Question

    def reply(messages) -> str:  # noqa: ANN001
        if "<ret>" in messages[0].text():
            return "<think>t</think><sub-question>None</sub-question><ret>None</ret>"
        return "<think>t</think><answer>Paris</answer>"

    seen: list[str] = []

    async def rollout(spec: str, examples):  # noqa: ANN001, ANN202
        seen.append(spec)
        engine = Engine(
            ScriptedChatModel(reply),
            StaticKBRegistry([StaticKB("text")]),
            R1RouterPolicy(),
            EngineConfig(max_steps=1),
        )
        return await engine.answer_many([ex.question for ex in examples])

    examples = [
        EvalExample(
            id=f"q{i}",
            question=Question(text=f"Capital of France {i}?"),
            golds=["Paris"],
            source="toy",
        )
        for i in range(2)
    ]
    cfg = StepGRPOConfig(
        model=str(tiny_model_dir),
        output_dir=tmp_path / "op",
        learning_rate=1e-4,
        num_generations=2,
        per_device_train_batch_size=2,
        max_completion_length=8,
        rewards=RewardConfig(format_weight=0.5),
        on_policy=OnPolicyConfig(enabled=True, rounds=2, questions_per_round=2, steps_per_round=1),
    )
    result = asyncio.run(train_step_grpo_on_policy(examples, cfg, rollout))
    assert seen == [str(tiny_model_dir), str(tmp_path / "op" / "round-0" / "final")]
    assert result.steps == 2 and result.samples == 4  # 2 final-answer prompts per round
    assert (tmp_path / "op" / "final" / "config.json").is_file()
    info = json.loads((tmp_path / "op" / "final" / "kbrouter_train.json").read_text())
    assert info["trainer"] == "step-grpo-on-policy"
    assert [(r["round"], r["questions"], r["samples"], r["updates"]) for r in info["rounds"]] == [
        (0, 2, 2, 1),
        (1, 2, 2, 1),
    ]
    assert info["rounds"][1]["model"] == str(tmp_path / "op" / "round-0" / "final")

    # a finished round is kept: a rerun (e.g. after an interruption) rolls out nothing again
    again = asyncio.run(train_step_grpo_on_policy(examples, cfg, rollout))
    assert len(seen) == 2
    assert again.steps == 2 and again.samples == 4
