"""Step samples -> TRL dataset rows (conversational prompt/completion format).

- SFT rows: ``{"prompt": [messages], "completion": [assistant message]}``; the completion is
  the teacher's raw response when known, else a response rendered from the target in the
  policy's tag format (:func:`render_target_response`).
- GRPO rows: ``{"prompt": [messages], "step_type", "final", "kind", "target"}``; the extra
  columns reach the reward functions as keyword arguments (``target`` is JSON, see
  :func:`kbrouter.train.rewards.encode_target`).

Images: the training path here is text-only; an image part becomes the ``<image>``
placeholder in the text (as in the paper's released files), so text-only models see where the
image was. Vision-language training would pass the images through TRL's ``images`` column.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from kbrouter.train.rewards import encode_target
from kbrouter.train.steps import IMAGE_PLACEHOLDER, RouteTarget, StepSample
from kbrouter.types import ChatMessage, RouteAction, TextPart


def message_dict(msg: ChatMessage) -> dict[str, str]:
    """A text-only chat message dict (image parts become ``<image>``)."""
    if isinstance(msg.content, str):
        text = msg.content
    else:
        text = "".join(
            p.text if isinstance(p, TextPart) else IMAGE_PLACEHOLDER for p in msg.content
        )
    return {"role": msg.role, "content": text}


def prompt_messages(sample: StepSample) -> list[dict[str, str]]:
    return [message_dict(m) for m in sample.messages]


def render_target_response(sample: StepSample) -> str:
    """The response a perfect policy would give for this step, in the tag format of the step's
    router prompt (``terse`` steps: no think block, and no sub-question tag when the target
    searches with the question as asked)."""
    from kbrouter.policies.parser import format_route
    from kbrouter.policies.prompts import terse_question

    if isinstance(sample.target, RouteTarget):
        t = sample.target
        kb = t.retrievers[0] if t.retrievers else None
        action = RouteAction(think="", sub_question=t.query, kbs=[kb] if kb else [])
        return format_route(action, terse=terse_question(sample.messages))
    answer = sample.target if isinstance(sample.target, str) else (sample.target or [""])[0]
    return f"<think></think>\n<answer>{answer.strip()}</answer>"


def select_kinds(samples: Iterable[StepSample], kinds: Sequence[str]) -> list[StepSample]:
    """Samples whose kind ('ret', 'sub_answer', 'final') is in ``kinds``."""
    wanted = set(kinds)
    return [s for s in samples if s.kind in wanted]


def sft_records(
    samples: Iterable[StepSample], use_teacher_response: bool = True
) -> list[dict[str, Any]]:
    rows = []
    for s in samples:
        response = (
            s.response if (use_teacher_response and s.response) else render_target_response(s)
        )
        rows.append(
            {
                "prompt": prompt_messages(s),
                "completion": [{"role": "assistant", "content": response}],
            }
        )
    return rows


def grpo_records(samples: Iterable[StepSample]) -> list[dict[str, Any]]:
    return [
        {
            "prompt": prompt_messages(s),
            "step_type": s.step_type,
            "final": s.final,
            "kind": s.kind,
            "target": encode_target(s.target),
        }
        for s in samples
    ]
