"""Step-GRPO on TRL's ``GRPOTrainer`` (method.md sec. 5).

Every step sample is an independent GRPO prompt: TRL samples ``num_generations`` responses,
scores them with the step-type-specific reward (:mod:`kbrouter.train.rewards`; the sample's
``step_type``/``final``/``target`` columns reach the reward functions as keyword arguments),
normalises within the group and applies the PPO-clip loss. No trainer code is forked.

Two data regimes:

- **teacher-forced** (the paper): :func:`train_step_grpo` on synthesised step samples
  (:mod:`kbrouter.train.synth`) or the released file;
- **on-policy**: :func:`train_step_grpo_on_policy` — an outer loop that, every round, rolls the
  *current* checkpoint out through the real engine and KBs on training questions, turns those
  trajectories into step prompts (states the policy really reaches), labels them (final steps
  with the dataset's golds; router and sub-answer steps by a teacher model answering the same
  prompt, DAgger-style), and runs GRPO on them starting from the last checkpoint. This
  regenerates the dataset from live rollouts each round instead of hooking TRL's experimental
  ``rollout_func``, so it works with every TRL generation backend (transformers, vLLM) and
  every launcher unchanged.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kbrouter.errors import DataError
from kbrouter.files import atomic_write_text
from kbrouter.train.config import StepGRPOConfig
from kbrouter.train.modeling import (
    load_causal_lm,
    load_tokenizer,
    lora_adapter,
    materialize_model,
    model_source,
    save_trained,
)
from kbrouter.train.records import grpo_records, select_kinds
from kbrouter.train.rewards import KBNames, StepRewarder, trl_reward_funcs
from kbrouter.train.run import (
    TrainResult,
    read_run_info,
    resume_checkpoint,
    router_prompt_record,
    trainer_callbacks,
    write_run_info,
)
from kbrouter.train.steps import StepSample

if TYPE_CHECKING:
    from kbrouter.encoders.base import TextEncoder
    from kbrouter.eval.datasets import EvalExample
    from kbrouter.types import Trajectory

logger = logging.getLogger(__name__)


def build_grpo_trainer(
    samples: Sequence[StepSample],
    config: StepGRPOConfig,
    *,
    rewarder: StepRewarder | None = None,
    model: Any = None,
    tokenizer: Any = None,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A ready ``trl.GRPOTrainer`` for the step samples (for callers that drive it themselves)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    chosen = select_kinds(samples, config.step_kinds)
    if not chosen:
        raise DataError(
            f"no step samples of kinds {config.step_kinds} among {len(samples)} samples"
        )
    rewarder = rewarder or StepRewarder(config.rewards)
    funcs, weights = trl_reward_funcs(rewarder)
    if not funcs:
        raise DataError("every reward weight is 0: nothing to optimise")
    args = config.to_trl()
    args.reward_weights = weights
    model_spec = config.model
    if model is None:
        if config.beta > 0 or lora_adapter(config.model) is not None:
            # a LoRA run (e.g. the SFT warm start) is merged into its base once, on disk
            # TRL rebuilds the reference model from the model's folder: it must be a real one.
            model_spec = materialize_model(config.model, Path(config.output_dir) / "base")
        model = load_causal_lm(model_spec)
    tok = tokenizer if tokenizer is not None else load_tokenizer(model_spec, padding_side="left")
    tok.padding_side = "left"
    dataset = Dataset.from_list(grpo_records(chosen))
    return GRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=config.lora.to_peft(),
        callbacks=list(callbacks),
    )


def train_step_grpo(
    samples: Sequence[StepSample],
    config: StepGRPOConfig,
    *,
    rewarder: StepRewarder | None = None,
    kb_names: KBNames | None = None,
    encoder: TextEncoder | None = None,
    model: Any = None,
    tokenizer: Any = None,
    progress: bool = False,
    resume: bool = True,
) -> TrainResult:
    """Run Step-GRPO on teacher-forced step samples; save ``<output_dir>/final``.

    Args:
        samples: step samples (filtered to ``config.step_kinds``).
        config: run configuration (``StepGRPOConfig.paper_preset`` for the paper's).
        rewarder: a ready :class:`StepRewarder`; else one is built from ``config.rewards``,
            ``kb_names`` (default: the paper's KB names) and ``encoder`` (default: loaded
            lazily from ``config.rewards.encoder``).
        model, tokenizer: an already loaded model/tokenizer (else ``config.model`` is loaded).
        progress: show a rich progress bar.
        resume: continue an interrupted run of the same training from its newest
            ``checkpoint-*`` (written every ``config.save_steps`` updates).

    ``config.model`` may be another run's folder, e.g. an SFT run's LoRA ``final``: its adapter
    is merged into its base (once, under ``<output_dir>/base``) and Step-GRPO trains on that.
    """
    rewarder = rewarder or StepRewarder(config.rewards, kb_names=kb_names, encoder=encoder)
    chosen = select_kinds(samples, config.step_kinds)
    rewarder.kb_names.check_targets(chosen)
    logger.info(
        "Step-GRPO on %d step samples: %s", len(chosen), dict(Counter(s.kind for s in chosen))
    )
    trainer = build_grpo_trainer(
        chosen,
        config,
        rewarder=rewarder,
        model=model,
        tokenizer=tokenizer,
        callbacks=trainer_callbacks(config, "Step-GRPO", progress),
    )
    # the starting model's weights are part of what must match (a retrained SFT run is another
    # starting point, though its folder has the same name)
    tag = b"step-grpo" + json.dumps(model_source(config.model), sort_keys=True).encode()
    last = resume_checkpoint(config, chosen, tag, resume=resume, trainer="Step-GRPO")
    if last:
        logger.info("resuming Step-GRPO from %s", last)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - t0
    final = save_trained(
        trainer,
        Path(config.output_dir) / "final",
        config.model,
        merge_lora=config.lora.merge_on_save,
    )
    result = TrainResult(
        checkpoint=final,
        steps=int(trainer.state.global_step),
        samples=len(chosen),
        seconds=seconds,
        log_history=list(trainer.state.log_history),
    )
    write_run_info(
        final,
        config,
        result,
        {
            "trainer": "step-grpo",
            "kinds": dict(Counter(s.kind for s in chosen)),
            **router_prompt_record(chosen),
        },
    )
    return result


# --------------------------------------------------------------------------- on-policy

RolloutFn = Callable[[str, Sequence["EvalExample"]], Awaitable[list["Trajectory"]]]
"""``(checkpoint spec, examples) -> trajectories``: runs the current policy through the engine."""

LabelFn = Callable[[list[StepSample]], Awaitable[list[StepSample]]]
"""Relabels on-policy step samples (e.g. :class:`kbrouter.train.synth.TeacherLabeler`)."""


async def train_step_grpo_on_policy(
    examples: Sequence[EvalExample],
    config: StepGRPOConfig,
    rollout: RolloutFn,
    *,
    labeler: LabelFn | None = None,
    rewarder: StepRewarder | None = None,
    progress: bool = False,
) -> TrainResult:
    """On-policy Step-GRPO: ``config.on_policy.rounds`` rounds of rollout -> label -> GRPO.

    Round ``r`` rolls the round-``r-1`` checkpoint (round 0: ``config.model``) out on the next
    ``questions_per_round`` examples (cycling), splits the trajectories into step samples with
    :func:`kbrouter.train.synth.trajectory_to_samples` (final steps target the golds), lets
    ``labeler`` set targets for router and sub-answer steps (without a labeler those steps are
    dropped: their target is unknown), then trains ``steps_per_round`` GRPO updates and saves
    ``<output_dir>/round-<r>``. The last round's checkpoint is also saved as ``final``.
    """
    from kbrouter.train.synth import trajectory_to_samples

    if not examples:
        raise DataError("on-policy Step-GRPO needs training questions")
    op = config.on_policy
    current = config.model
    history: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    total_steps = 0
    total_samples = 0
    t0 = time.perf_counter()
    last: TrainResult | None = None
    for r in range(op.rounds):
        round_dir = Path(config.output_dir) / f"round-{r}"
        done = _finished_round(round_dir)
        if done is not None:  # an interrupted run resumes after its last finished round
            last, record = done
            logger.info("round %d already trained (%s): kept", r, last.checkpoint)
        else:
            start = (r * op.questions_per_round) % len(examples)
            batch = [examples[(start + i) % len(examples)] for i in range(op.questions_per_round)]
            t_roll = time.perf_counter()
            trajectories = await rollout(current, batch)
            rollout_seconds = time.perf_counter() - t_roll
            samples: list[StepSample] = []
            for ex, traj in zip(batch, trajectories, strict=True):
                samples.extend(
                    trajectory_to_samples(
                        traj, ex.golds, source=ex.source, trajectory_id=f"r{r}:{ex.id}"
                    )
                )
            rolled = len(samples)
            if labeler is not None:
                samples = await labeler(samples)
            else:
                samples = [s for s in samples if s.final]
            samples = select_kinds(samples, config.step_kinds)
            record = {
                "round": r,
                "model": str(current),
                "questions": len(batch),
                "rollout_seconds": round(rollout_seconds, 1),
                "rollout_samples": rolled,
                "samples": len(samples),
                "kinds": dict(Counter(s.kind for s in samples)),
                "retrievals_per_question": sum(len(t.retrievals()) for t in trajectories)
                / max(1, len(trajectories)),
            }
            if not samples:
                logger.warning("round %d produced no usable step samples; skipping", r)
                rounds.append({**record, "skipped": True})
                continue
            round_cfg = config.model_copy(
                update={"model": current, "output_dir": round_dir, "max_steps": op.steps_per_round}
            )
            # each round trains on fresh rollouts: a folder left half-trained is retrained
            last = train_step_grpo(
                samples, round_cfg, rewarder=rewarder, progress=progress, resume=False
            )
            atomic_write_text(round_dir / ROUND_FILE, json.dumps(record, indent=2))
        current = str(last.checkpoint)
        total_steps += last.steps
        total_samples += last.samples
        history.extend({**e, "round": r} for e in last.log_history)
        rounds.append({**record, "updates": last.steps, "train_seconds": round(last.seconds, 1)})
    if last is None:
        raise DataError("no round produced trainable step samples")
    final = Path(config.output_dir) / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(last.checkpoint, final)
    result = TrainResult(
        checkpoint=final,
        steps=total_steps,
        samples=total_samples,
        seconds=time.perf_counter() - t0,
        log_history=history,
    )
    write_run_info(
        final,
        config,
        result,
        {
            "trainer": "step-grpo-on-policy",
            "rounds": rounds,
            "router_prompt": read_run_info(last.checkpoint).get("router_prompt"),
        },
    )
    return result


ROUND_FILE = "kbrouter_round.json"
"""Written into a finished on-policy round's folder: what its rollouts produced."""


def _finished_round(round_dir: Path) -> tuple[TrainResult, dict[str, Any]] | None:
    """A round whose GRPO run saved ``final`` and whose record was written, else None."""
    marker = round_dir / ROUND_FILE
    info = read_run_info(round_dir / "final")
    if not marker.is_file() or not info.get("result"):
        return None
    res = info["result"]
    result = TrainResult(
        checkpoint=round_dir / "final",
        steps=int(res.get("steps", 0)),
        samples=int(res.get("samples", 0)),
        seconds=float(res.get("seconds", 0.0)),
        log_history=list(res.get("log_history", [])),
    )
    return result, json.loads(marker.read_text())
