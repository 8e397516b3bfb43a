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


def write_run_info(folder: Path, config: Any, result: TrainResult, extra: dict[str, Any]) -> None:
    info = {
        "config": json.loads(config.model_dump_json()),
        "result": result.to_json(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    (folder / RUN_INFO).write_text(json.dumps(info, indent=2, default=str))
