"""Step samples: the unit of Step-GRPO / SFT training data (method.md sec. 5).

A teacher trajectory is split into *step samples*. Each carries the exact prompt the model saw
at that step (system + user messages, images included as image parts) and a target:

- ``ret`` (router) step: :class:`RouteTarget` — the teacher's sub-question and KB(s), or none;
- intermediate ``ans`` step: the teacher's sub-answer (``str``);
- final ``ans`` step: the dataset's gold answers (``list[str]``).

Two on-disk formats are read and written:

- the **paper format** released with R1-Router (``grpo_dataset_valid_new.jsonl``): one line per
  trajectory, ``{"images": [...], "steps": [{"step_type", "system", "problem", "answer"}]}``,
  with ``<image>`` marking where the image goes in ``problem``;
- **our format**: one :class:`StepSample` per line (``model_dump_json``), which also keeps the
  source dataset, the trajectory id, the step index and the teacher's raw response.

:func:`read_steps` detects the format from the first record.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kbrouter.errors import DataError
from kbrouter.files import iter_jsonl
from kbrouter.types import ChatMessage, ContentPart, ImagePart, TextPart

logger = logging.getLogger(__name__)

StepType = Literal["ret", "ans"]

IMAGE_PLACEHOLDER = "<image>"
"""Where the question's image goes in a paper-format ``problem`` string."""

NONE_KB = "none"
"""The paper's retriever value for "stop, no retrieval"."""


class RouteTarget(BaseModel):
    """Target of a router (``ret``) step.

    ``query`` None and ``retrievers`` empty mean "stop: enough information" (the paper writes
    ``{"query": "none", "retriever": ["none"]}``).
    """

    model_config = ConfigDict(extra="forbid")

    query: str | None = Field(None, description="The teacher's sub-question (None = stop).")
    retrievers: list[str] = Field(
        default_factory=list, description="The teacher's KB name(s); empty = stop."
    )

    @property
    def is_stop(self) -> bool:
        return self.query is None and not self.retrievers

    @classmethod
    def from_paper(cls, answer: dict[str, Any]) -> RouteTarget:
        """Parse the paper's ``{"query": str, "retriever": [str]}`` (``none`` = stop)."""
        query = answer.get("query")
        rets = answer.get("retriever")
        if not isinstance(query, str) or not isinstance(rets, list):
            raise ValueError(
                f"router target must be {{query: str, retriever: [str]}}, got {answer!r}"
            )
        kbs = [str(r).strip() for r in rets if str(r).strip().lower() != NONE_KB]
        q = query.strip()
        return cls(query=None if q.lower() in ("", NONE_KB) else query, retrievers=kbs)

    def to_paper(self) -> dict[str, Any]:
        return {
            "query": NONE_KB if self.query is None else self.query,
            "retriever": list(self.retrievers) or [NONE_KB],
        }


class StepSample(BaseModel):
    """One training step: the exact prompt and its target."""

    model_config = ConfigDict(extra="forbid")

    step_type: StepType = Field(..., description="'ret' (router step) or 'ans' (answer step).")
    final: bool = Field(False, description="True for the final-answer step of a trajectory.")
    messages: list[ChatMessage] = Field(
        ..., min_length=1, description="The prompt exactly as the model saw it (system + user)."
    )
    target: RouteTarget | list[str] | str = Field(
        ...,
        description="RouteTarget for 'ret'; the sub-answer (str) for an intermediate 'ans'; "
        "the gold answers (list[str]) for the final 'ans'.",
    )
    source: str = Field("", description="Source dataset (e.g. '2wikimultihopqa', 'infoseek').")
    trajectory_id: str = Field(..., description="Id of the trajectory this step came from.")
    step_index: int = Field(0, ge=0, description="Position of the step in its trajectory.")
    response: str | None = Field(
        None, description="The teacher's raw output at this step, when known (SFT target)."
    )
    origin: str = Field(
        "",
        description="How the sample was made: 'teacher' (synthesis through the engine), "
        "'gold-path' (assembled from gold annotations), '' (unknown, e.g. the released file).",
    )

    @model_validator(mode="after")
    def _target_matches_type(self) -> StepSample:
        if self.step_type == "ret" and not isinstance(self.target, RouteTarget):
            raise ValueError(f"a 'ret' step needs a RouteTarget target, got {self.target!r}")
        if self.step_type == "ans" and isinstance(self.target, RouteTarget):
            raise ValueError("an 'ans' step needs a str or list[str] target, got a RouteTarget")
        if self.step_type == "ans" and self.final and not isinstance(self.target, list):
            raise ValueError(f"a final 'ans' step needs a gold list target, got {self.target!r}")
        return self

    @property
    def kind(self) -> Literal["ret", "sub_answer", "final"]:
        """'ret', 'sub_answer' (intermediate ans) or 'final'."""
        if self.step_type == "ret":
            return "ret"
        return "final" if self.final else "sub_answer"

    @property
    def system(self) -> str:
        return "\n".join(m.text() for m in self.messages if m.role == "system")

    @property
    def problem(self) -> str:
        """The last user turn's text with ``<image>`` where image parts were."""
        users = [m for m in self.messages if m.role == "user"]
        return _render_with_placeholders(users[-1]) if users else ""

    @property
    def images(self) -> list[Path]:
        return [p for m in self.messages for p in m.images()]

    @property
    def golds(self) -> list[str]:
        """Answer targets as a list (the sub-answer wrapped; empty for 'ret')."""
        if isinstance(self.target, list):
            return list(self.target)
        if isinstance(self.target, str):
            return [self.target]
        return []


# --------------------------------------------------------------------------- paper format


def _render_with_placeholders(msg: ChatMessage) -> str:
    if isinstance(msg.content, str):
        return msg.content
    return "".join(p.text if isinstance(p, TextPart) else IMAGE_PLACEHOLDER for p in msg.content)


def _user_message(problem: str, images: Sequence[str]) -> ChatMessage:
    """Build the user turn, replacing ``<image>`` placeholders by the record's image paths."""
    if IMAGE_PLACEHOLDER not in problem or not images:
        return ChatMessage(role="user", content=problem)
    chunks = problem.split(IMAGE_PLACEHOLDER)
    parts: list[ContentPart] = []
    for i, chunk in enumerate(chunks):
        if chunk:
            parts.append(TextPart(text=chunk))
        if i < len(chunks) - 1:
            parts.append(ImagePart(path=Path(images[min(i, len(images) - 1)])))
    return ChatMessage(role="user", content=parts)


def infer_paper_source(record: dict[str, Any]) -> str:
    """Guess the source dataset of a paper-format trajectory (the file does not say).

    Heuristic: an image means InfoSeek; a table-retriever step means Open-WikiTable; otherwise
    2WikiMultihopQA (the three training sources named in method.md sec. 5).
    """
    if record.get("images"):
        return "infoseek"
    for s in record.get("steps", []):
        ans = s.get("answer")
        if (
            s.get("step_type") == "ret"
            and isinstance(ans, dict)
            and any("table" in str(r).lower() for r in ans.get("retriever", []))
        ):
            return "openwikitable"
    return "2wikimultihopqa"


def paper_record_to_samples(record: dict[str, Any], trajectory_id: str) -> list[StepSample]:
    """Split one paper-format trajectory record into step samples.

    The last step is the final answer (its ``answer`` is the gold list); raises ``ValueError``
    describing the problem if the record does not have the paper's shape.
    """
    if not isinstance(record, dict) or not isinstance(record.get("steps"), list):
        raise ValueError("record must be an object with a 'steps' list")
    images = [str(p) for p in record.get("images") or []]
    source = str(record.get("source") or infer_paper_source(record))
    steps = record["steps"]
    if not steps:
        raise ValueError("record has no steps")
    out: list[StepSample] = []
    for i, s in enumerate(steps):
        for key in ("step_type", "system", "problem", "answer"):
            if key not in s:
                raise ValueError(f"step {i} lacks field {key!r}")
        stype = s["step_type"]
        messages = [
            ChatMessage(role="system", content=str(s["system"])),
            _user_message(str(s["problem"]), images),
        ]
        answer = s["answer"]
        final = False
        target: RouteTarget | list[str] | str
        if stype == "ret":
            if not isinstance(answer, dict):
                raise ValueError(f"step {i}: a 'ret' answer must be an object, got {answer!r}")
            target = RouteTarget.from_paper(answer)
        elif stype == "ans":
            if isinstance(answer, list):
                final = True
                target = [str(a) for a in answer]
            elif isinstance(answer, str):
                target = answer
            else:
                raise ValueError(f"step {i}: an 'ans' answer must be str or list, got {answer!r}")
        else:
            raise ValueError(f"step {i}: unknown step_type {stype!r} (expected 'ret' or 'ans')")
        out.append(
            StepSample(
                step_type=stype,
                final=final,
                messages=messages,
                target=target,
                source=source,
                trajectory_id=trajectory_id,
                step_index=i,
            )
        )
    return out


def samples_to_paper_records(samples: Iterable[StepSample]) -> list[dict[str, Any]]:
    """Group step samples by trajectory (in first-seen order) into paper-format records.

    Only the first system message and the last user message of each step are kept (the paper
    format has no room for more); image parts become ``<image>`` and the record's ``images``.
    """
    groups: dict[str, list[StepSample]] = defaultdict(list)
    for s in samples:
        groups[s.trajectory_id].append(s)
    records = []
    for steps in groups.values():
        steps = sorted(steps, key=lambda s: s.step_index)
        images: list[str] = []
        for s in steps:
            for p in s.images:
                if str(p) not in images:
                    images.append(str(p))
        rec_steps = []
        for s in steps:
            answer: Any = s.target.to_paper() if isinstance(s.target, RouteTarget) else s.target
            rec_steps.append(
                {
                    "step_type": s.step_type,
                    "system": s.system,
                    "problem": s.problem,
                    "answer": answer,
                }
            )
        records.append({"images": images, "steps": rec_steps})
    return records


def read_paper_steps(path: str | Path) -> list[StepSample]:
    """Read the paper's released step format (one trajectory per line)."""
    path = Path(path)
    out: list[StepSample] = []
    for lineno, obj in _iter_jsonl(path):
        try:
            out.extend(paper_record_to_samples(obj, trajectory_id=f"{path.stem}:{lineno}"))
        except (ValueError, ValidationError) as e:
            raise DataError(f"{path}:{lineno}: not a paper-format step record: {e}") from None
    if not out:
        raise DataError(f"{path}: no step records")
    return out


def write_paper_steps(samples: Iterable[StepSample], path: str | Path) -> Path:
    """Write step samples in the paper's format (one trajectory per line)."""
    return _write_jsonl(
        (json.dumps(r, ensure_ascii=False) for r in samples_to_paper_records(samples)), path
    )


# --------------------------------------------------------------------------- our format


def write_steps(samples: Iterable[StepSample], path: str | Path) -> Path:
    """Write step samples in kbrouter's format (one :class:`StepSample` JSON per line)."""
    return _write_jsonl((s.model_dump_json() for s in samples), path)


def read_steps(path: str | Path) -> list[StepSample]:
    """Read step samples from either format (detected from the first record).

    Raises :class:`~kbrouter.errors.DataError` naming the file and line of a bad record.
    """
    path = Path(path)
    out: list[StepSample] = []
    fmt: str | None = None
    for lineno, obj in _iter_jsonl(path):
        if fmt is None:
            fmt = "paper" if isinstance(obj, dict) and "steps" in obj else "kbrouter"
        if fmt == "paper":
            try:
                out.extend(paper_record_to_samples(obj, trajectory_id=f"{path.stem}:{lineno}"))
            except (ValueError, ValidationError) as e:
                raise DataError(f"{path}:{lineno}: not a paper-format step record: {e}") from None
        else:
            try:
                out.append(StepSample.model_validate(obj))
            except ValidationError as e:
                raise DataError(f"{path}:{lineno}: not a step sample: {_short(e)}") from None
    if not out:
        raise DataError(f"{path}: no step records")
    return out


# --------------------------------------------------------------------------- split


def split_steps(
    samples: Sequence[StepSample], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[StepSample], list[StepSample]]:
    """Deterministic train/validation split by trajectory, stratified by ``source``.

    All steps of one trajectory land on the same side (no leakage of a teacher's history).
    Within each source, ``round(val_fraction * n_trajectories)`` trajectories go to validation
    (at least one when the source has two or more trajectories and ``val_fraction > 0``).
    The same ``seed`` and input always give the same split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_source: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for s in samples:
        if s.trajectory_id not in seen:
            seen.add(s.trajectory_id)
            by_source[s.source].append(s.trajectory_id)
    rng = random.Random(seed)
    val_ids: set[str] = set()
    for source in sorted(by_source):
        ids = sorted(by_source[source])
        rng.shuffle(ids)
        n_val = round(val_fraction * len(ids))
        if val_fraction > 0 and n_val == 0 and len(ids) >= 2:
            n_val = 1
        val_ids.update(ids[:n_val])
    train = [s for s in samples if s.trajectory_id not in val_ids]
    val = [s for s in samples if s.trajectory_id in val_ids]
    return train, val


# --------------------------------------------------------------------------- helpers


def _iter_jsonl(path: Path) -> Iterable[tuple[int, Any]]:
    return iter_jsonl(path, what="step file", error=DataError, objects=False)


def _write_jsonl(lines: Iterable[str], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(line + "\n")
    tmp.replace(path)
    return path


def _short(e: ValidationError) -> str:
    errs = e.errors()
    first = errs[0]
    loc = ".".join(str(x) for x in first.get("loc", ()))
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc}: {first.get('msg')}{more}"
