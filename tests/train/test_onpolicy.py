"""``engine_rollout``: a checkpoint's rollouts go through the real engine (the transformers
backend loading the checkpoint folder, the R1-Router loop, real BM25 demo KBs), one trajectory
per question, with the router prompt the engine builds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from train_helpers import tiny_llama

from kbrouter.eval.datasets import EvalExample
from kbrouter.policies.prompts import detect_router_prompt
from kbrouter.types import Question

pytestmark = pytest.mark.slow


def test_engine_rollout_runs_the_checkpoint_through_the_real_engine(
    smollm2_tokenizer_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from kbrouter.config import load_registry_config
    from kbrouter.kb.registry import KBRegistry
    from kbrouter.testing import lexical_demo_config
    from kbrouter.train.config import OnPolicyConfig, StepGRPOConfig
    from kbrouter.train.onpolicy import engine_rollout

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    checkpoint = tmp_path / "round-1"
    tiny_llama(tok, seed=0, context=4096).save_pretrained(checkpoint)  # the few-shot prompt
    tok.save_pretrained(checkpoint)
    registry = KBRegistry.from_config(
        load_registry_config(lexical_demo_config(_mkdir(tmp_path / "kbs")))
    )
    assert registry.build(progress=False).ok
    config = StepGRPOConfig(
        model=str(checkpoint),
        output_dir=tmp_path / "grpo",
        max_completion_length=32,
        on_policy=OnPolicyConfig(enabled=True, max_retrieval_steps=2, rollout_temperature=1.0),
    )
    examples = [
        EvalExample(
            id="q1",
            question=Question(text="Who designed Brasília?"),
            golds=["Niemeyer"],
            source="demo",
        ),
        EvalExample(
            id="q2",
            question=Question(text="Population of Canada?"),
            golds=["40 million"],
            source="demo",
        ),
    ]
    rollout = engine_rollout(registry, config, concurrency=2)
    trajectories = asyncio.run(rollout(str(checkpoint), examples))

    assert [t.question.text for t in trajectories] == [e.question.text for e in examples]
    for t in trajectories:
        assert t.method == "r1router"
        calls = [c for s in t.steps for c in s.route_calls]
        assert calls, t.model_dump_json()[:500]  # the checkpoint was asked to route
        assert all(c.error is None for c in calls)  # it answered (garbage, but it answered)
        first = calls[0]
        if first.messages:
            assert detect_router_prompt(first.messages) == "full"
        assert len(t.steps) <= config.on_policy.max_retrieval_steps + 1
    registry.close()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
