"""Scoring a model on held-out step samples: mean step reward, routing accuracy, format rate.

This is the training-side check (no retrieval): each step prompt is completed by the model and
scored with the step reward against the sample's target, exactly as Step-GRPO scores it. Whole
question answering goes through ``kbrouter eval`` instead.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kbrouter.policies.prompts import terse_question
from kbrouter.train.records import prompt_messages
from kbrouter.train.rewards import RewardBreakdown, StepRewarder
from kbrouter.train.steps import StepSample


@dataclass
class StepEvalResult:
    """Aggregates over all scored completions (``samples x num_samples``)."""

    completions: int
    mean_reward: float
    format_rate: float
    routing_accuracy: float | None
    """Share of router completions naming exactly the target KB (None: no router steps)."""
    mean_reward_by_kind: dict[str, float] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    """A few raw completions, for eyeballing."""


def generate_completions(
    model: Any,
    tokenizer: Any,
    samples: Sequence[StepSample],
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
) -> list[list[str]]:
    """``num_samples`` completions per sample (greedy when ``temperature`` is 0)."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    model.eval()
    out: list[list[str]] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        enc = tokenizer.apply_chat_template(
            [prompt_messages(s) for s in chunk],
            add_generation_prompt=True,
            return_tensors="pt",
            padding=True,
            return_dict=True,
            truncation=max_prompt_tokens is not None,
            max_length=max_prompt_tokens,
        )
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "num_return_sequences": num_samples,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=1.0)
        else:
            gen_kwargs.update(do_sample=False)
        with torch.no_grad():
            ids = model.generate(**enc, **gen_kwargs)
        texts = tokenizer.batch_decode(
            ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for i in range(len(chunk)):
            out.append(texts[i * num_samples : (i + 1) * num_samples])
    return out


def evaluate_steps(
    model: Any,
    tokenizer: Any,
    samples: Sequence[StepSample],
    rewarder: StepRewarder,
    **generate_kwargs: Any,
) -> StepEvalResult:
    """Complete every step prompt and score the completions with ``rewarder``."""
    completions = generate_completions(model, tokenizer, samples, **generate_kwargs)
    flat_texts: list[str] = []
    flat_samples: list[StepSample] = []
    for s, texts in zip(samples, completions, strict=True):
        for t in texts:
            flat_texts.append(t)
            flat_samples.append(s)
    scores: list[RewardBreakdown] = rewarder.score_batch(
        flat_texts,
        [s.step_type for s in flat_samples],
        [s.target for s in flat_samples],
        [terse_question(s.messages) for s in flat_samples],
    )
    by_kind: dict[str, list[float]] = defaultdict(list)
    routing: list[float] = []
    for s, sc in zip(flat_samples, scores, strict=True):
        by_kind[s.kind].append(sc.total)
        if s.step_type == "ret":
            routing.append(sc.routing or 0.0)
    return StepEvalResult(
        completions=len(scores),
        mean_reward=statistics.fmean(sc.total for sc in scores) if scores else 0.0,
        format_rate=statistics.fmean(float(sc.parsed) for sc in scores) if scores else 0.0,
        routing_accuracy=statistics.fmean(routing) if routing else None,
        mean_reward_by_kind={k: statistics.fmean(v) for k, v in by_kind.items()},
        examples=flat_texts[:5],
    )
