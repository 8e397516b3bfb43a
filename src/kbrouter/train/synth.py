"""Trajectory synthesis (method.md sec. 5): teacher trajectories -> step samples.

A teacher model runs the real loop (:class:`kbrouter.engine.engine.Engine` with its policy and
KBs) over training questions; a trajectory is kept only if its final answer reaches
``threshold`` F1-Recall against the gold answers (paper: recall 1); each kept trajectory is
split into step samples that carry the exact messages the model saw
(:attr:`kbrouter.types.ModelCall.messages`) and targets:

- router step -> ``RouteTarget(query=teacher sub-question, retrievers=[teacher KB])`` (or stop);
- sub-answer step -> the teacher's sub-answer;
- final step -> the dataset's gold answers.

:class:`GoldKBRouter` keeps the teacher on the gold KBs where a question's gold KBs are known
(hop *i* may only search gold KB *i*; the prompt is unchanged, so the samples show the same
prompt a student sees): a teacher that would have searched the wrong KB no longer wastes the
question. Repeated steps are de-duplicated (:func:`trajectory_to_samples`).

:class:`TeacherLabeler` relabels step samples from *another* policy's rollouts by asking the
teacher the same prompts (used by on-policy Step-GRPO).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from kbrouter.policies.r1router import R1RouterPolicy
from kbrouter.train.steps import RouteTarget, StepSample

if TYPE_CHECKING:
    from kbrouter.engine.engine import Engine
    from kbrouter.eval.datasets import EvalExample
    from kbrouter.models.base import ChatModel
    from kbrouter.train.rewards import KBNames
    from kbrouter.types import ModelCall, Question, RouteAction, Trajectory

logger = logging.getLogger(__name__)

UNUSABLE_STOPS = frozenset({"format_fallback", "error"})
"""Stop reasons whose trajectories are not teacher decisions (fallbacks), never kept."""


@dataclass
class SynthReport:
    """Outcome of a synthesis run."""

    samples: list[StepSample] = field(default_factory=list)
    total: int = 0
    """Questions run."""
    kept: int = 0
    """Trajectories kept (recall >= threshold, no fallback)."""
    dropped: Counter[str] = field(default_factory=Counter)
    """Why trajectories were dropped: 'low_recall', 'format_fallback', 'error', ..."""
    recalls: dict[str, float] = field(default_factory=dict)
    """Final-answer F1-Recall per example id."""
    deduplicated: int = 0
    """Kept trajectories with repeated steps left out (see :func:`trajectory_to_samples`)."""
    kept_at_attempt: Counter[int] = field(default_factory=Counter)
    """Kept trajectories by the attempt that produced them (0: the first, as configured)."""
    runs: int = 0
    """Trajectories run, over all attempts."""

    def counts(self) -> dict[str, int]:
        return dict(Counter(s.kind for s in self.samples))


def _usable_call(calls: Sequence[ModelCall]) -> ModelCall | None:
    """The last successful call (earlier ones were format retries)."""
    for c in reversed(calls):
        if c.error is None and c.output:
            return c
    return None


def _step_key(action: RouteAction) -> tuple[str, tuple[str, ...]]:
    """What makes two router steps the same: the normalised sub-question and the KBs."""
    from kbrouter.eval.metrics import normalize_answer

    return normalize_answer(action.sub_question or ""), tuple(sorted(action.kbs))


def _repeated_steps(traj: Trajectory) -> dict[int, bool]:
    """Indices of steps repeating an earlier step (same sub-question, same KBs) -> whether the
    trajectory is cut there (True for the first repeat when no new step follows it)."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    repeats: dict[int, bool] = {}
    new_after: dict[int, bool] = {}
    for i, step in enumerate(traj.steps):
        action = step.action
        if action is None or action.is_stop:
            continue
        key = _step_key(action)
        if key in seen:
            repeats[i] = False
        else:
            seen.add(key)
            for r in repeats:
                new_after[r] = True
    if repeats:
        first = min(repeats)
        if not new_after.get(first):
            return {first: True}  # cut at the first repeat
    return repeats


def trajectory_to_samples(
    traj: Trajectory,
    golds: Sequence[str],
    *,
    source: str = "",
    trajectory_id: str | None = None,
    dedupe: bool = False,
) -> list[StepSample]:
    """Split one trajectory into step samples (router, sub-answer and final steps).

    Steps without a parsed router action (fallbacks) contribute no router sample; a missing
    final call contributes no final sample. Targets are the trajectory's own decisions, the
    final target is ``golds``.

    A router sample's prompt is the step's first route prompt (a format retry's or gold-KB
    re-ask's corrective turn is not what a student sees), its response the accepted reply.

    ``dedupe``: a router step that repeats an earlier step's sub-question to the same KBs
    (retrieval is deterministic: it found nothing new) is not trained on. When nothing new
    follows the first repeat (only repeats, a stop or the budget's end), that step becomes a
    *stop* sample — what was known before it led to the right final answer — and the samples
    end there (the final prompt carries the repeats in its history). When a new step does
    follow, only the repeated steps (and their sub-answers) are left out. Small teachers repeat
    one sub-question until the budget runs out; without this, SFT teaches the student to.
    """
    tid = trajectory_id or traj.question.id or traj.question.text[:80]
    out: list[StepSample] = []
    idx = 0
    repeats = _repeated_steps(traj) if dedupe else {}
    for i, step in enumerate(traj.steps):
        call = _usable_call(step.route_calls)
        if i in repeats:
            if not repeats[i] or call is None:
                continue  # a repeat with new steps after it: left out, with its sub-answer
            out.append(
                StepSample(
                    step_type="ret",
                    messages=step.route_calls[0].messages or call.messages,
                    target=RouteTarget(query=None, retrievers=[]),
                    source=source,
                    trajectory_id=tid,
                    step_index=idx,
                    origin="teacher-dedup",
                )
            )
            return out
        if call is not None and step.action is not None:
            action = step.action
            target = RouteTarget(
                query=None if action.is_stop else action.sub_question,
                retrievers=[] if action.is_stop else list(action.kbs),
            )
            out.append(
                StepSample(
                    step_type="ret",
                    messages=step.route_calls[0].messages or call.messages,
                    target=target,
                    source=source,
                    trajectory_id=tid,
                    step_index=idx,
                    response=call.output,
                    origin="teacher",
                )
            )
            idx += 1
        ans = step.answer_call
        if ans is not None and ans.error is None and step.sub_answer is not None:
            out.append(
                StepSample(
                    step_type="ans",
                    messages=ans.messages,
                    target=step.sub_answer,
                    source=source,
                    trajectory_id=tid,
                    step_index=idx,
                    response=ans.output,
                    origin="teacher",
                )
            )
            idx += 1
    final = traj.final_call
    if final is not None and final.error is None:
        out.append(
            StepSample(
                step_type="ans",
                final=True,
                messages=final.messages,
                target=[str(g) for g in golds],
                source=source,
                trajectory_id=tid,
                step_index=idx,
                response=final.output,
                origin="teacher",
            )
        )
    return out


def judge_trajectory(
    traj: Trajectory, golds: Sequence[str], threshold: float = 1.0, paper_compat: bool = False
) -> tuple[bool, float, str]:
    """``(keep, recall, reason)`` for one teacher trajectory."""
    from kbrouter.eval.metrics import f1_recall

    if traj.error is not None or traj.stop_reason in UNUSABLE_STOPS:
        return False, 0.0, traj.stop_reason if traj.stop_reason in UNUSABLE_STOPS else "error"
    recall = f1_recall(traj.answer, list(golds), paper_compat=paper_compat)
    if recall < threshold - 1e-9:
        return False, recall, "low_recall"
    if traj.final_call is None:
        return False, recall, "no_final_call"
    return True, recall, "kept"


async def synthesize_async(
    examples: Sequence[EvalExample],
    engine: Engine,
    threshold: float = 1.0,
    *,
    paper_compat: bool = False,
    concurrency: int | None = None,
    on_example: Callable[[EvalExample, Trajectory, list[StepSample]], None] | None = None,
    dedupe: bool = True,
    attempts: int = 1,
    retry_temperature: float = 0.7,
) -> SynthReport:
    """Run the teacher ``engine`` on the examples and keep trajectories with recall >= threshold.

    ``dedupe``: leave repeated steps of kept trajectories out of the samples, cutting at the
    first repeat when nothing new follows it (see :func:`trajectory_to_samples`).

    ``attempts``: rejection sampling. A question whose trajectory is dropped is run again, up to
    ``attempts`` trajectories in all; attempt *a* >= 1 samples at ``retry_temperature`` with
    seed ``engine seed + a`` (reproducible), and the first trajectory that passes is kept. The
    first attempt runs as the engine is configured (greedy by default). Attempts go in passes:
    every question's first attempt, then the second attempt of the ones dropped, and so on.

    ``on_example(example, trajectory, kept_samples)`` is called once per question, when it is
    kept or its last attempt is dropped (``kept_samples`` empty then), e.g. to write
    incrementally.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    if attempts > 1 and retry_temperature <= 0.0:
        raise ValueError(
            "attempts > 1 needs retry_temperature > 0: a greedy re-run repeats the first attempt"
        )
    report = SynthReport(total=len(examples))
    per_example: list[list[StepSample]] = [[] for _ in examples]
    # questions carry their example's id (a policy such as GoldKBRouter looks them up by it)
    questions = [
        ex.question if ex.question.id else ex.question.model_copy(update={"id": ex.id})
        for ex in examples
    ]

    def judge(i: int, traj: Trajectory, attempt: int, last: bool) -> bool:
        """Record question ``i``'s trajectory; False when it is to be run again."""
        ex = examples[i]
        report.runs += 1
        keep, recall, reason = judge_trajectory(traj, ex.golds, threshold, paper_compat)
        report.recalls[ex.id] = max(recall, report.recalls.get(ex.id, 0.0))
        if not keep and not last:
            return False
        if keep:
            per_example[i] = trajectory_to_samples(
                traj, ex.golds, source=ex.source, trajectory_id=ex.id, dedupe=dedupe
            )
            report.kept += 1
            report.kept_at_attempt[attempt] += 1
            if _repeated_steps(traj):
                report.deduplicated += 1
        else:
            report.dropped[reason] += 1
        if on_example is not None:
            on_example(ex, traj, per_example[i])
        return True

    def collect(order: list[int], retry: list[int], attempt: int, j: int, traj: Trajectory) -> None:
        if not judge(order[j], traj, attempt, last=attempt == attempts - 1):
            retry.append(order[j])

    pending = list(range(len(examples)))
    for attempt in range(attempts):
        if not pending:
            break
        runner = engine if attempt == 0 else _resampling(engine, attempt, retry_temperature)
        retry: list[int] = []
        try:
            await runner.answer_many(
                [questions[i] for i in pending],
                concurrency=concurrency,
                on_result=partial(collect, pending, retry, attempt),
            )
        finally:
            if runner is not engine:
                runner.close()  # its replay cache; the model is the caller's
        pending = sorted(retry)
    report.samples = [s for group in per_example for s in group]
    logger.info(
        "synthesis: kept %d/%d trajectories (%s; by attempt %s), %d step samples %s",
        report.kept,
        report.total,
        dict(report.dropped),
        dict(report.kept_at_attempt),
        len(report.samples),
        report.counts(),
    )
    return report


def _resampling(engine: Engine, attempt: int, temperature: float) -> Engine:
    """The teacher engine for a later attempt: the same model, KBs and policy, sampling at
    ``temperature`` with the seed moved by ``attempt``."""
    from kbrouter.engine.engine import Engine

    cfg = engine.config
    config = cfg.model_copy(
        update={
            "seed": cfg.seed + attempt,
            "sampling": cfg.sampling.model_copy(update={"temperature": temperature}),
        }
    )
    return Engine(
        engine.model,
        engine.kbs,
        engine.policy,
        config,
        on_event=engine.on_event,
        purpose_models=engine.purpose_models,
    )


def synthesize(
    examples: Sequence[EvalExample],
    engine: Engine,
    threshold: float = 1.0,
    *,
    paper_compat: bool = False,
    concurrency: int | None = None,
    dedupe: bool = True,
    attempts: int = 1,
    retry_temperature: float = 0.7,
) -> list[StepSample]:
    """Blocking :func:`synthesize_async` returning only the step samples."""
    report = asyncio.run(
        synthesize_async(
            examples,
            engine,
            threshold,
            paper_compat=paper_compat,
            concurrency=concurrency,
            dedupe=dedupe,
            attempts=attempts,
            retry_temperature=retry_temperature,
        )
    )
    return report.samples


class GoldKBRouter(R1RouterPolicy):
    """The R1-Router policy with its KB choice held to the gold KBs: retrieval hop *i* of a
    question with known gold KBs may only search gold KB *i* (by the route grammar; without a
    grammar, another KB is rejected and re-asked). Beyond the gold hops, and for questions
    without gold KBs, the teacher chooses freely. The prompt is the policy's usual one.

    Args:
        gold_kbs: question id -> gold KB names in hop order (configured KB names).
        **options: :class:`~kbrouter.policies.r1router.R1RouterConfig` settings.
    """

    name = "r1-router-gold-kbs"

    def __init__(self, gold_kbs: dict[str, list[str]], **options: object) -> None:
        super().__init__(**options)
        self.gold_kbs = {k: list(v) for k, v in gold_kbs.items() if v}

    def allowed_kbs(self, question: Question, hop: int) -> list[str] | None:
        gold = self.gold_kbs.get(question.id or "")
        if gold is None or hop >= len(gold):
            return None
        return [gold[hop]]


class TeacherLabeler:
    """Sets router and sub-answer targets of step samples by asking a teacher the same prompt.

    Final steps keep their gold targets. A router sample whose teacher reply does not parse is
    dropped (its target is unknown); a sub-answer sample keeps the teacher's answer text.

    Args:
        teacher: the teacher chat model.
        kb_names: the accepted KB names (to parse the teacher's ``<ret>``).
        max_tokens: token cap of a teacher reply.
        concurrency: teacher calls in flight.
    """

    def __init__(
        self, teacher: ChatModel, kb_names: KBNames, max_tokens: int = 256, concurrency: int = 4
    ) -> None:
        self.teacher = teacher
        self.kb_names = kb_names
        self.max_tokens = max_tokens
        self.concurrency = concurrency
        self.failures: list[tuple[str, int, str]] = []
        """(trajectory id, step index, error) of teacher calls that failed: those samples are
        dropped, the rest of the round goes on."""

    async def __call__(self, samples: list[StepSample]) -> list[StepSample]:
        from kbrouter.policies.prompts import terse_question
        from kbrouter.train.rewards import parse_answer_output, parse_route_output
        from kbrouter.types import SamplingParams

        sem = asyncio.Semaphore(self.concurrency)
        params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens)

        async def label(s: StepSample) -> StepSample | None:
            if s.final:
                return s
            async with sem:
                try:
                    result = await self.teacher.chat(s.messages, params)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # one failed call drops one sample, not the round
                    error = f"{type(e).__name__}: {e}"
                    logger.warning(
                        "teacher failed on %s step %d: %s", s.trajectory_id, s.step_index, error
                    )
                    self.failures.append((s.trajectory_id, s.step_index, error))
                    return None
            if s.step_type == "ret":
                action = parse_route_output(result.text, self.kb_names, terse_question(s.messages))
                if action is None:
                    return None
                target = RouteTarget(
                    query=None if action.is_stop else action.sub_question,
                    retrievers=[] if action.is_stop else list(action.kbs),
                )
                return s.model_copy(update={"target": target, "response": result.text})
            answer = parse_answer_output(result.text)
            if answer is None:
                return None
            return s.model_copy(update={"target": answer, "response": result.text})

        labelled = await asyncio.gather(*(label(s) for s in samples))
        return [s for s in labelled if s is not None]
