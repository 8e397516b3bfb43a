"""Supervised fine-tuning on step targets with TRL's ``SFTTrainer``.

Each step sample becomes a prompt/completion pair (the exact prompt the teacher saw, and the
teacher's response or a response rendered from the target); the loss covers completion tokens
only. Used as the paper's "SFT" ablation and as a format warm start before Step-GRPO for models
too small to emit the tag format on their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kbrouter.errors import ConfigError, DataError
from kbrouter.files import atomic_write_text
from kbrouter.policies.prompts import ROUTER_PROMPTS, detect_router_prompt
from kbrouter.train.config import SFTConfig
from kbrouter.train.modeling import load_causal_lm, load_tokenizer, save_trained
from kbrouter.train.records import select_kinds, sft_records
from kbrouter.train.run import TrainResult, progress_callback, write_run_info
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
    callbacks = [progress_callback("SFT")] if progress else []
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
    variants = Counter(str(detect_router_prompt(s.messages)) for s in chosen if s.kind == "ret")
    write_run_info(
        final,
        config,
        result,
        {
            "trainer": "sft",
            "kinds": dict(Counter(s.kind for s in chosen)),
            # the router prompt the model was trained on (read by `kbrouter train export`):
            # one variant, else None (mixed, or no kbrouter router prompt)
            "router_prompt": single if (single := _only(variants)) in ROUTER_PROMPTS else None,
            "router_prompt_counts": dict(variants),
        },
    )
    return result


def _only(counts: Counter[str]) -> str | None:
    return next(iter(counts)) if len(counts) == 1 else None


def _recorded_fingerprint(marker: Path) -> str | None:
    """The fingerprint in a run folder's marker; None when it is missing or unreadable."""
    try:
        value = json.loads(marker.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


RESUME_FILE = "kbrouter_resume.json"
"""Written into an SFT run's output folder: the fingerprint a resumed run must match."""


def resume_checkpoint(
    config: SFTConfig,
    samples: Sequence[StepSample],
    use_teacher_response: bool,
    *,
    resume: bool = True,
) -> str | None:
    """The newest complete ``checkpoint-*`` of an interrupted run of the SAME training (same
    settings and data) in ``config.output_dir``, or None to start from scratch.

    Only runs that write checkpoints (``save_steps > 0``) resume; a checkpoint without its
    ``trainer_state.json`` (killed while saving) is skipped. Checkpoints of another run
    (other settings, model or data) in the folder are a :class:`~kbrouter.errors.ConfigError`
    rather than being continued silently: pass ``resume=False`` (start over in the folder) or
    another output folder. The run about to start records its fingerprint in the folder.
    """
    if not config.save_steps:
        return None
    settings = json.loads(config.model_dump_json())
    settings.pop("output_dir", None)
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(b"teacher" if use_teacher_response else b"target")
    for s in samples:
        digest.update(s.model_dump_json().encode())
    fingerprint = digest.hexdigest()
    folder = config.output_dir
    marker = folder / RESUME_FILE
    checkpoints = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    last = None
    if resume and checkpoints:
        if _recorded_fingerprint(marker) != fingerprint:
            raise ConfigError(
                f"{folder} holds checkpoints of another SFT run (other settings or data); "
                "use another output folder, or resume=False to start over in it"
            )
        complete = [p for p in checkpoints if (p / "trainer_state.json").is_file()]
        last = str(complete[-1]) if complete else None
    atomic_write_text(marker, json.dumps({"fingerprint": fingerprint}))
    return last
