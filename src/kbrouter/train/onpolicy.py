"""Rollouts of the current policy through the real engine, for on-policy Step-GRPO.

:func:`engine_rollout` returns the ``rollout(checkpoint, examples)`` function that
:func:`kbrouter.train.step_grpo.train_step_grpo_on_policy` calls each round: it loads the
round's checkpoint with the transformers chat backend (``transformers:<folder>``) and runs the
R1-Router policy over the KB registry with sampling at ``on_policy.rollout_temperature``.

:func:`gguf_rollout_model` is the deployment-shaped alternative for CPU machines: each round's
checkpoint is exported to a GGUF (:func:`kbrouter.train.export.export_gguf`, about a minute for
the 0.5B) and rolled out by llama.cpp, several times faster than transformers generation. The
rollouts only choose the states (step prompts) GRPO trains on; the completions GRPO scores are
sampled from the training model itself, so a quantised rollout model does not bias the update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kbrouter.engine.runtime import KBSource
    from kbrouter.eval.datasets import EvalExample
    from kbrouter.models.base import ChatModel
    from kbrouter.policies.base import Policy
    from kbrouter.train.config import StepGRPOConfig
    from kbrouter.types import Trajectory


def gguf_rollout_model(
    folder: str | Path,
    *,
    quant: str = "q4_k_m",
    router_prompt: str | None = "auto",
    n_threads: int | None = None,
) -> Callable[[str], ChatModel]:
    """A ``model_factory`` for :func:`engine_rollout`: exports each round's checkpoint to
    ``<folder>/<checkpoint-name>-<hash>.gguf`` and loads it with the llama.cpp backend.

    The hash covers the folder and its run info's time; an existing file is reused, so an
    interrupted run resumes. The router prompt variant the checkpoint was trained with is
    recorded in the file (``router_prompt``, as in :func:`~kbrouter.train.export.export_gguf`),
    so the engine builds that prompt."""
    import hashlib

    out_dir = Path(folder)

    def make(spec: str) -> ChatModel:
        from kbrouter.models.llama_cpp import LlamaCppModel
        from kbrouter.train.export import export_gguf

        path = Path(spec).resolve()
        # the run info's time too: a round retrained into the same folder is exported again
        info = path / "kbrouter_train.json"
        stamp = info.stat().st_mtime_ns if info.is_file() else 0
        digest = hashlib.sha1(f"{path}:{stamp}".encode()).hexdigest()[:8]
        gguf = out_dir / f"{path.parent.name}-{path.name}-{digest}.gguf"
        if not gguf.is_file():
            out_dir.mkdir(parents=True, exist_ok=True)
            export_gguf(path, gguf, quant=quant, router_prompt=router_prompt)
        kwargs = {} if n_threads is None else {"n_threads": n_threads}
        return LlamaCppModel(gguf, **kwargs)

    return make


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
                top_k=op.top_k,
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
