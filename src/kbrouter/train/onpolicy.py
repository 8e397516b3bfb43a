"""Rollouts of the current policy through the real engine, for on-policy Step-GRPO.

:func:`engine_rollout` returns the ``rollout(checkpoint, examples)`` function that
:func:`kbrouter.train.step_grpo.train_step_grpo_on_policy` calls each round: it loads the
round's checkpoint with the transformers chat backend (``transformers:<folder>``) and runs the
R1-Router policy over the KB registry with sampling at ``on_policy.rollout_temperature``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kbrouter.engine.runtime import KBSource
    from kbrouter.eval.datasets import EvalExample
    from kbrouter.models.base import ChatModel
    from kbrouter.policies.base import Policy
    from kbrouter.train.config import StepGRPOConfig
    from kbrouter.types import Trajectory


def engine_rollout(
    kbs: KBSource,
    config: StepGRPOConfig,
    *,
    policy_factory: Callable[[], Policy] | None = None,
    model_factory: Callable[[str], ChatModel] | None = None,
    concurrency: int = 4,
) -> Callable[[str, Sequence[EvalExample]], Any]:
    """A rollout function running ``policy_factory()`` (default R1-Router) with the checkpoint.

    ``model_factory(checkpoint_spec)`` builds the chat backend (default:
    ``load_model("transformers:<spec>")``; GGUF/preset specs are materialised first).
    """
    from kbrouter.engine.engine import Engine, EngineConfig
    from kbrouter.types import SamplingParams

    op = config.on_policy

    def default_model(spec: str) -> ChatModel:
        from pathlib import Path

        from kbrouter.models.registry import load_model
        from kbrouter.train.modeling import materialize_model

        folder = materialize_model(spec, Path(config.output_dir) / "base")
        return load_model(f"transformers:{folder}")

    def default_policy() -> Policy:
        from kbrouter.policies.r1router import PAPER_READING, R1RouterPolicy

        # the paper's loop: a rollout may stop at once, so Step-GRPO also learns that decision;
        # the paper's reading path, so every step is the router's own (no rewritten
        # sub-questions, no answers without a model call)
        return R1RouterPolicy(min_retrieval_steps=0, **PAPER_READING)

    make_model = model_factory or default_model
    make_policy = policy_factory or default_policy

    async def rollout(spec: str, examples: Sequence[EvalExample]) -> list[Trajectory]:
        model = make_model(spec)
        engine = Engine(
            model,
            kbs,
            make_policy(),
            EngineConfig(
                max_steps=op.max_retrieval_steps,
                concurrency=concurrency,
                seed=config.seed,
                sampling=SamplingParams(temperature=op.rollout_temperature, seed=config.seed),
            ),
        )
        try:
            return await engine.answer_many([ex.question for ex in examples])
        finally:
            engine.close()
            await model.aclose()

    return rollout
