"""What a training run returns, and the pieces every trainer wrapper shares."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RUN_INFO = "kbrouter_train.json"
"""File written next to the final checkpoint: config, data counts and the metrics history."""


@dataclass
class TrainResult:
    """Outcome of one training run."""

    checkpoint: Path
    """HF folder loadable by ``transformers:<checkpoint>`` (the final model)."""
    steps: int
    """Optimizer updates done."""
    samples: int
    """Step samples in the training set."""
    seconds: float
    log_history: list[dict[str, Any]] = field(default_factory=list)
    """TRL/transformers log entries (loss, rewards, learning rate, ...)."""

    def metric_series(self, key: str) -> list[float]:
        """The logged values of one metric, in order (e.g. ``"loss"``, ``"reward"``)."""
        return [float(e[key]) for e in self.log_history if key in e]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoint"] = str(self.checkpoint)
        return d


def progress_callback(description: str) -> Any:
    """A transformers ``TrainerCallback`` showing a rich progress bar with the latest metrics."""
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from transformers import TrainerCallback

    class _RichProgress(TrainerCallback):
        def __init__(self) -> None:
            self.progress: Progress | None = None
            self.task: Any = None

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            if not state.is_world_process_zero:
                return
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
            )
            self.progress.start()
            self.task = self.progress.add_task(description, total=state.max_steps, metrics="")

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if self.progress is None or not logs:
                return
            shown = {k: v for k, v in logs.items() if k in ("loss", "reward", "reward_std")}
            text = "  ".join(f"{k}={v:.4g}" for k, v in shown.items() if isinstance(v, float))
            self.progress.update(self.task, metrics=text)

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            if self.progress is not None:
                self.progress.stop()
                self.progress = None

    return _RichProgress()


def time_budget_callback(seconds: float) -> Any:
    """A transformers ``TrainerCallback`` ending training after the update during which
    ``seconds`` have passed since training began in this process (``max_train_seconds``)."""
    from transformers import TrainerCallback

    class _TimeBudget(TrainerCallback):
        def __init__(self) -> None:
            self.start: float | None = None

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if self.start is not None and time.perf_counter() - self.start >= seconds:
                logger.info("time budget %.0f s reached: %d updates", seconds, state.global_step)
                control.should_training_stop = True
                # keep the last update resumable when the run writes checkpoints at all
                strategy = getattr(args.save_strategy, "value", args.save_strategy)
                control.should_save = str(strategy) == "steps"

    return _TimeBudget()


def trainer_callbacks(config: Any, description: str, progress: bool) -> list[Any]:
    """The callbacks every trainer wrapper adds: a progress bar, a time budget."""
    out = [progress_callback(description)] if progress else []
    if getattr(config, "max_train_seconds", None):
        out.append(time_budget_callback(config.max_train_seconds))
    return out


def read_run_info(folder: Path) -> dict[str, Any]:
    """The run info written next to a checkpoint ({} when there is none)."""
    from kbrouter.errors import ConfigError

    path = Path(folder) / RUN_INFO
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


def router_prompt_record(samples: Any) -> dict[str, Any]:
    """Which router prompt variant the router samples were written with, for the run info
    (read by ``kbrouter train export``): ``router_prompt`` is the one variant, else None (a mix,
    or no kbrouter router prompt); ``router_prompt_counts`` counts every variant seen."""
    from collections import Counter

    from kbrouter.policies.prompts import ROUTER_PROMPTS, detect_router_prompt

    variants = Counter(str(detect_router_prompt(s.messages)) for s in samples if s.kind == "ret")
    single = next(iter(variants)) if len(variants) == 1 else None
    return {
        "router_prompt": single if single in ROUTER_PROMPTS else None,
        "router_prompt_counts": dict(variants),
    }


def write_run_info(folder: Path, config: Any, result: TrainResult, extra: dict[str, Any]) -> None:
    info = {
        "config": json.loads(config.model_dump_json()),
        "result": result.to_json(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    (folder / RUN_INFO).write_text(json.dumps(info, indent=2, default=str))


RESUME_FILE = "kbrouter_resume.json"
"""Written into a run's output folder: the fingerprint a resumed run must match."""


def _recorded_fingerprint(marker: Path) -> str | None:
    """The fingerprint in a run folder's marker; None when it is missing or unreadable."""
    try:
        value = json.loads(marker.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def resume_checkpoint(
    config: Any,
    samples: Any,
    tag: bytes = b"",
    *,
    resume: bool = True,
    trainer: str = "training",
) -> str | None:
    """The newest complete ``checkpoint-*`` of an interrupted run of the SAME training (same
    settings, data and ``tag``) in ``config.output_dir``, or None to start from scratch.

    Only runs that write checkpoints (``save_steps > 0``) resume; a checkpoint without its
    ``trainer_state.json`` (killed while saving) is skipped. Checkpoints of another run
    (other settings, model or data) in the folder are a :class:`~kbrouter.errors.ConfigError`
    rather than being continued silently: pass ``resume=False`` (start over in the folder) or
    another output folder. The run about to start records its fingerprint in the folder.
    """
    import hashlib

    from kbrouter.errors import ConfigError
    from kbrouter.files import atomic_write_text

    if not config.save_steps:
        return None
    settings = json.loads(config.model_dump_json())
    settings.pop("output_dir", None)
    settings.pop("max_train_seconds", None)  # a time budget is not part of what is trained
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(tag)
    for s in samples:
        digest.update(s.model_dump_json().encode())
    fingerprint = digest.hexdigest()
    folder = Path(config.output_dir)
    marker = folder / RESUME_FILE
    checkpoints = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    last = None
    if resume and checkpoints:
        if _recorded_fingerprint(marker) != fingerprint:
            raise ConfigError(
                f"{folder} holds checkpoints of another {trainer} run (other settings or data); "
                "use another output folder, or start over in it (resume=False; the CLI's "
                "--no-resume)"
            )
        complete = [p for p in checkpoints if (p / "trainer_state.json").is_file()]
        last = str(complete[-1]) if complete else None
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"fingerprint": fingerprint}))
    return last
