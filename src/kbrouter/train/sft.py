"""Supervised fine-tuning on step targets with TRL's ``SFTTrainer``.

Each step sample becomes a prompt/completion pair (the exact prompt the teacher saw, and the
teacher's response or a response rendered from the target); the loss covers completion tokens
only. Used as the paper's "SFT" ablation and as a format warm start before Step-GRPO for models
too small to emit the tag format on their own.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from kbrouter.errors import DataError
from kbrouter.train.config import SFTConfig
from kbrouter.train.modeling import load_causal_lm, load_tokenizer, save_trained
from kbrouter.train.records import select_kinds, sft_records
from kbrouter.train.run import (
    TrainResult,
    router_prompt_record,
    trainer_callbacks,
    write_run_info,
)
from kbrouter.train.run import resume_checkpoint as _resume
from kbrouter.train.steps import StepSample

logger = logging.getLogger(__name__)


def train_sft(
    samples: Sequence[StepSample],
    config: SFTConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    progress: bool = False,
    use_teacher_response: bool = True,
    resume: bool = True,
) -> TrainResult:
    """Fine-tune ``config.model`` on the step samples; save ``<output_dir>/final``.

    Args:
        samples: step samples (filtered to ``config.step_kinds``).
        config: the run configuration.
        model, tokenizer: an already loaded model/tokenizer to train instead of loading
            ``config.model`` (tests, notebooks).
        progress: show a rich progress bar.
        use_teacher_response: train on the teacher's raw response when a sample has one
            (else on a response rendered from the target).
        resume: continue from the newest ``checkpoint-*`` in ``config.output_dir`` (written
            every ``config.save_steps`` updates) instead of starting over.
    """
    from datasets import Dataset
    from trl import SFTTrainer

    chosen = select_kinds(samples, config.step_kinds)
    if not chosen:
        raise DataError(
            f"no step samples of kinds {config.step_kinds} among {len(samples)} samples"
        )
    logger.info("SFT on %d step samples: %s", len(chosen), dict(Counter(s.kind for s in chosen)))
    tok = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    mdl = model if model is not None else load_causal_lm(config.model)
    dataset = Dataset.from_list(sft_records(chosen, use_teacher_response=use_teacher_response))
    callbacks = trainer_callbacks(config, "SFT", progress)
    trainer = SFTTrainer(
        model=mdl,
        args=config.to_trl(),
        train_dataset=dataset,
        processing_class=tok,
        peft_config=config.lora.to_peft(),
        callbacks=callbacks,
    )
    last = resume_checkpoint(config, chosen, use_teacher_response, resume=resume)
    if last:
        logger.info("resuming SFT from %s", last)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - t0
    final = save_trained(
        trainer, config.output_dir / "final", config.model, merge_lora=config.lora.merge_on_save
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
            "trainer": "sft",
            "kinds": dict(Counter(s.kind for s in chosen)),
            **router_prompt_record(chosen),
        },
    )
    return result


def resume_checkpoint(
    config: SFTConfig,
    samples: Sequence[StepSample],
    use_teacher_response: bool,
    *,
    resume: bool = True,
) -> str | None:
    """The newest complete checkpoint of an interrupted SFT run of the same training (see
    :func:`kbrouter.train.run.resume_checkpoint`); the responses trained on (teacher's or
    rendered targets) are part of what must match."""
    return _resume(
        config,
        samples,
        b"teacher" if use_teacher_response else b"target",
        resume=resume,
        trainer="SFT",
    )
