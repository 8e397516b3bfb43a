"""Training data and the training entry point of the learned router (``kbrouter train router``).

Sources, usable together:

- **step samples** in either format (the paper's released file, or kbrouter's own synthesised
  steps): every router (``ret``) step gives a state — the origin question, whether an image is
  attached, the step index and the KBs of the trajectory's earlier router steps — labelled with
  the teacher's KB (``none`` for a stop); when the teacher wrote a sub-question, the state is
  added a second time with it (for hybrid routing);
- **datasets with gold KBs in hop order** (``mkqa-mini``; ``jsonl:<path>`` with ``gold_kbs``):
  hop ``i`` is labelled ``gold_kbs[i]`` and the state after the last hop ``none``.

KB labels are resolved against the user's KBs (:class:`~kbrouter.routing.data.LabelResolver`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kbrouter.errors import DataError, RouterError, UnknownKBError
from kbrouter.routing.data import LabelResolver, RouteSample, gold_path_samples
from kbrouter.routing.router import LearnedRouter, RouterConfig, fit_router
from kbrouter.train.steps import IMAGE_PLACEHOLDER, StepSample, read_steps
from kbrouter.types import NONE_LABEL, KBInfo, RouteState

__all__ = [
    "dataset_route_samples",
    "load_route_samples",
    "step_route_samples",
    "train_router",
]

_HISTORY = re.compile(
    r"^\s*Sub-question\s*\d+\s*:\s*(.*?)\s*\n\s*Answer\s*\d+\s*:\s*(.*?)\s*$", re.M | re.I
)
_ORIGIN = re.compile(r"^\s*(?:Origin question|Question)\s*:\s*(.+?)\s*$", re.M | re.I)


def _origin_question(sample: StepSample) -> str:
    m = _ORIGIN.search(sample.problem)
    if m is None:
        raise DataError(
            f"router step {sample.trajectory_id}#{sample.step_index}: cannot find the question "
            "('Origin question: ...' or 'Question: ...') in its prompt"
        )
    return m.group(1).replace(IMAGE_PLACEHOLDER, "").strip()


def step_route_samples(
    steps: Sequence[StepSample], resolve: LabelResolver, *, with_sub_questions: bool = True
) -> list[RouteSample]:
    """Routing samples from the router steps of step samples (module docstring)."""
    by_traj: dict[str, list[StepSample]] = defaultdict(list)
    for s in steps:
        if s.step_type == "ret":
            by_traj[s.trajectory_id].append(s)
    out: list[RouteSample] = []
    for tid, rets in by_traj.items():
        prev: list[str] = []
        for i, s in enumerate(sorted(rets, key=lambda r: r.step_index)):
            target = s.target
            assert not isinstance(target, (list, str))  # a 'ret' step has a RouteTarget
            try:
                label = resolve(target.retrievers[0]) if target.retrievers else NONE_LABEL
            except UnknownKBError as e:
                raise DataError(
                    f"router step {tid}#{s.step_index}: retriever {target.retrievers[0]!r} is "
                    f"not a configured KB ({e})"
                ) from None
            history = [(q.strip(), a.strip()) for q, a in _HISTORY.findall(s.problem)]
            state = RouteState(
                question=_origin_question(s),
                has_image=bool(s.images) or IMAGE_PLACEHOLDER in s.problem,
                step=i,
                prev_kbs=list(prev),
            )
            common = {
                "label": label,
                "group": tid,
                "source": s.source,
                "origin": "steps",
                "history": history,
            }
            out.append(RouteSample(state=state, **common))
            if with_sub_questions and target.query and label != NONE_LABEL:
                sub = state.model_copy(update={"sub_question": target.query})
                out.append(RouteSample(state=sub, **common))
            if label != NONE_LABEL:
                prev.append(label)
    return out


def dataset_route_samples(examples: Sequence[Any], resolve: LabelResolver) -> list[RouteSample]:
    """Gold-path samples of dataset examples (:class:`~kbrouter.eval.datasets.EvalExample`-like:
    ``id``, ``question``, ``gold_kbs``, ``source``). Examples without gold KBs are skipped."""
    out: list[RouteSample] = []
    for ex in examples:
        if ex.gold_kbs is None:
            continue
        try:
            out.extend(
                gold_path_samples(
                    str(ex.id),
                    ex.question.text,
                    ex.gold_kbs,
                    has_image=ex.question.image is not None,
                    resolve=resolve,
                    source=ex.source,
                )
            )
        except UnknownKBError as e:
            raise DataError(
                f"question {ex.id}: gold KBs {ex.gold_kbs} do not resolve: {e}"
            ) from None
    return out


def load_route_samples(
    kbs: Sequence[KBInfo],
    *,
    step_files: Sequence[str | Path] = (),
    datasets: Sequence[str] = (),
    data_dir: str | Path | None = None,
    exclude_ids: set[str] | None = None,
) -> tuple[list[RouteSample], dict[str, Any]]:
    """All routing samples of the given step files and datasets, plus facts for the manifest.

    ``exclude_ids`` drops dataset questions (e.g. an evaluation subset kept out of training).
    """
    from kbrouter.eval.datasets import load_dataset

    resolve = LabelResolver(kbs)
    samples: list[RouteSample] = []
    facts: dict[str, Any] = {"step_files": [], "datasets": []}
    for f in step_files:
        got = step_route_samples(read_steps(f), resolve)
        facts["step_files"].append({"path": str(f), "samples": len(got)})
        samples.extend(got)
    for name in datasets:
        ds = load_dataset(name, data_dir=data_dir)
        exs = [e for e in ds.examples if not exclude_ids or e.id not in exclude_ids]
        with_gold = [e for e in exs if e.gold_kbs is not None]
        if not with_gold:
            raise DataError(
                f"dataset {name!r} has no gold KBs (mkqa-mini, or JSONL with 'gold_kbs', has them)"
            )
        got = dataset_route_samples(with_gold, resolve)
        facts["datasets"].append(
            {
                "name": name,
                "questions": len(with_gold),
                "excluded": len(ds.examples) - len(exs),
                "samples": len(got),
            }
        )
        samples.extend(got)
    return samples, facts


def train_router(
    kbs: Sequence[KBInfo],
    out: str | Path,
    *,
    step_files: Sequence[str | Path] = (),
    datasets: Sequence[str] = (),
    config: RouterConfig | None = None,
    data_dir: str | Path | None = None,
    exclude_ids: set[str] | None = None,
    encoder: Any = None,
) -> LearnedRouter:
    """Load the data, fit a router for ``kbs`` and save it to ``out``; returns the router."""
    if not step_files and not datasets:
        raise RouterError("no training data: pass step files (--data) and/or datasets (--dataset)")
    samples, facts = load_route_samples(
        kbs, step_files=step_files, datasets=datasets, data_dir=data_dir, exclude_ids=exclude_ids
    )
    router = fit_router(samples, [kb.name for kb in kbs], config, encoder=encoder, data_facts=facts)
    router.save(out)
    return router
