"""Routing-only evaluation: score a router's decision at every state of the gold path, with no
retrieval and no answer generation (``kbrouter eval-routing``).

Routers under test (each gives one :class:`~kbrouter.types.RouteDistribution` per state):

- a saved learned router (:func:`predict_learned`), or a freshly **cross-validated** one
  (:func:`predict_cross_validated`: K routers, each fitted by
  :func:`~kbrouter.routing.router.fit_router` — thresholds included — on the other folds'
  questions, predicting its own fold);
- the **prompted LLM router** (:func:`predict_llm_router`): only the route calls, teacher-forced
  along the gold path — each state's prompt shows the earlier gold hops (released steps: the
  teacher's sub-questions and answers; datasets: the question as the sub-question and the gold
  evidence's title as its answer). Its decision is one-hot (confidence 1); an unparsable reply
  counts as the label ``invalid``;
- **random** (:func:`predict_random`): uniform over the KBs and ``none``, seeded.

:func:`write_routing_report` writes ``summary.json`` (``n``, ``hop1_accuracy``, ``accuracy``,
``abstain_precision``/``abstain_recall``, ``ece``, per-label precision/recall, confusion matrix,
reliability bins), ``predictions.jsonl``, ``misrouted.jsonl`` and the plots
``confusion.png`` and ``reliability.png``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kbrouter.models.base import ChatModel
from kbrouter.policies.prompts import ROUTER_PROMPTS, Hop, PromptBuilder
from kbrouter.routing.data import RouteSample
from kbrouter.routing.metrics import routing_scores
from kbrouter.routing.router import LearnedRouter, RouterConfig, fit_router
from kbrouter.types import NONE_LABEL, KBInfo, Question, RouteDistribution, SamplingParams, kb_key

__all__ = [
    "INVALID_LABEL",
    "predict_cross_validated",
    "predict_learned",
    "predict_llm_router",
    "predict_random",
    "score_routing",
    "write_routing_report",
]

INVALID_LABEL = "invalid"
"""The decision recorded when an LLM router's reply cannot be parsed."""


def _one_hot(label: str, labels: Sequence[str]) -> RouteDistribution:
    return RouteDistribution(
        probs={lab: 1.0 if lab == label else 0.0 for lab in labels}, label=label, confidence=1.0
    )


def predict_learned(
    router: LearnedRouter, samples: Sequence[RouteSample]
) -> list[RouteDistribution]:
    return router.predict([s.state for s in samples])


def predict_random(
    samples: Sequence[RouteSample], labels: Sequence[str], seed: int = 0
) -> list[RouteDistribution]:
    """Uniform over ``labels`` (KBs and ``none``): the decision is a seeded uniform draw."""
    rng = random.Random(seed)
    p = 1.0 / len(labels)
    return [
        RouteDistribution(
            probs=dict.fromkeys(labels, p), label=rng.choice(list(labels)), confidence=p
        )
        for _ in samples
    ]


def predict_cross_validated(
    samples: Sequence[RouteSample],
    kb_names: Sequence[str],
    config: RouterConfig | None = None,
    *,
    folds: int = 5,
    encoder: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[RouteDistribution], list[dict[str, Any]]]:
    """Out-of-fold decisions of K routers, each fitted (thresholds included) without its fold.

    Returns the decisions in sample order and per-fold facts (sizes, thresholds).
    """
    from kbrouter.routing.router import _group_splits

    cfg = (config or RouterConfig()).model_copy(update={"cv_folds": 0})
    if encoder is None:
        from kbrouter.encoders.text import load_text_encoder

        encoder = load_text_encoder(cfg.encoder)
    enc = _MemoEncoder(encoder)
    y = [s.label for s in samples]
    groups = [s.group for s in samples]
    out: list[RouteDistribution | None] = [None] * len(samples)
    facts = []
    splits = _group_splits(y, groups, folds, cfg.seed)
    for f, (tr, te) in enumerate(splits):
        router = fit_router([samples[i] for i in tr], kb_names, cfg, encoder=enc)
        for i, d in zip(te, router.predict([samples[i].state for i in te]), strict=True):
            out[i] = d
        facts.append(
            {
                "fold": f,
                "train": len(tr),
                "test": len(te),
                "thresholds": router.manifest["thresholds"],
            }
        )
        if progress is not None:
            progress(f + 1, len(splits))
    assert all(d is not None for d in out)
    return [d for d in out if d is not None], facts


class _MemoEncoder:
    """Wraps a text encoder and remembers each text's vector (cross-validation re-embeds)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self._memo: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False):
        todo = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if todo:
            for t, v in zip(todo, self.inner.encode(todo, batch_size=batch_size), strict=True):
                self._memo[t] = v
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._memo[t] for t in texts]).astype(np.float32)


async def predict_llm_router(
    model: ChatModel,
    kbs: Sequence[KBInfo],
    samples: Sequence[RouteSample],
    *,
    few_shot: bool = True,
    use_grammar: bool = True,
    max_tokens: int = 256,
    seed: int = 0,
    on_done: Callable[[int, RouteDistribution, float], None] | None = None,
    done: dict[int, RouteDistribution] | None = None,
    router_prompt: str = "auto",
) -> tuple[list[RouteDistribution], list[float]]:
    """Teacher-forced route calls of the prompted router, one per state, in sample order.

    ``done`` holds decisions already made (resume); ``on_done(index, decision, seconds)`` is
    called after each new call. Returns the decisions and the seconds of each new call.
    ``router_prompt``: ``full``, ``compact``, ``terse``, or ``auto`` (the variant the model
    records it was trained with, else ``full``), as in the R1-Router policy.
    """
    if router_prompt == "auto":
        recorded = model.prompt_variant
        router_prompt = recorded if recorded in ROUTER_PROMPTS else "full"
    if router_prompt not in ROUTER_PROMPTS:
        raise ValueError(f"unknown router prompt {router_prompt!r}; expected {ROUTER_PROMPTS}")
    prompts = PromptBuilder(
        kbs,
        supports_images=model.supports_images,
        few_shot=few_shot,
        router_prompt=router_prompt,  # type: ignore[arg-type]
    )
    labels = [*(kb.name for kb in kbs), NONE_LABEL]
    by_name = {kb_key(n): kb.name for kb in kbs for n in [kb.name, *kb.aliases]}

    def resolve(name: str) -> str:
        from kbrouter.errors import UnknownKBError

        key = kb_key(name)
        if key not in by_name:
            raise UnknownKBError(name, [kb.name for kb in kbs])
        return by_name[key]

    grammar = (
        prompts.route_grammar()
        if use_grammar and getattr(model, "supports_grammar", False)
        else None
    )
    params = SamplingParams(max_tokens=max_tokens, grammar=grammar, seed=seed, temperature=0.0)
    out: list[RouteDistribution] = []
    secs: list[float] = []
    done = done or {}
    for i, s in enumerate(samples):
        if i in done:
            out.append(done[i])
            continue
        question = Question(text=s.state.question)
        history = [
            Hop(q, a, (kb,)) for (q, a), kb in zip(s.history, s.state.prev_kbs, strict=False)
        ]
        messages = prompts.route_messages(question, history)
        if s.state.has_image and not model.supports_images:
            # the prompt says an image is attached (route_messages does it for a real image)
            messages = prompts.route_messages(
                Question(text=s.state.question, image=Path("question-image")), history
            )
        t0 = time.perf_counter()
        try:
            result = await model.chat(messages, params)
            text = result.text
        except Exception as e:  # a failed call is an invalid decision, not a crash
            text = f"(model call failed: {e})"
        sec = time.perf_counter() - t0
        try:
            action = prompts.parse_route(text, resolve, question)
            label = NONE_LABEL if action.is_stop else action.kbs[0]
        except Exception:
            label = INVALID_LABEL
        d = _one_hot(label, labels)
        out.append(d)
        secs.append(sec)
        if on_done is not None:
            on_done(i, d, sec)
    return out, secs


def score_routing(
    samples: Sequence[RouteSample], decisions: Sequence[RouteDistribution], labels: Sequence[str]
) -> dict[str, Any]:
    """:func:`~kbrouter.routing.metrics.routing_scores` plus per-source accuracy."""
    golds = [s.label for s in samples]
    preds = [d.label for d in decisions]
    out = routing_scores(
        golds, preds, [d.confidence for d in decisions], [s.state.step for s in samples], labels
    )
    out["questions"] = len({s.group for s in samples})
    by_source: dict[str, list[bool]] = {}
    for s, p in zip(samples, preds, strict=True):
        by_source.setdefault(s.source, []).append(s.label == p)
    out["accuracy_by_source"] = {
        k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_source.items())
    }
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, "utf-8")
    os.replace(tmp, path)


def write_routing_report(
    out_dir: str | Path,
    samples: Sequence[RouteSample],
    decisions: Sequence[RouteDistribution],
    labels: Sequence[str],
    *,
    router: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the routing report (module docstring) and return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"router": router, **score_routing(samples, decisions, labels), **(extra or {})}
    lines = []
    missed = []
    for s, d in zip(samples, decisions, strict=True):
        rec = {
            "group": s.group,
            "source": s.source,
            "step": s.state.step,
            "question": s.state.question,
            "prev_kbs": s.state.prev_kbs,
            "sub_question": s.state.sub_question,
            "gold": s.label,
            "predicted": d.label,
            "confidence": round(d.confidence, 4),
            "probs": d.probs,
        }
        lines.append(json.dumps(rec, ensure_ascii=False))
        if d.label != s.label:
            missed.append(json.dumps(rec, ensure_ascii=False))
    _atomic_write(out / "predictions.jsonl", "\n".join(lines) + "\n")
    _atomic_write(out / "misrouted.jsonl", "\n".join(missed) + ("\n" if missed else ""))
    summary["misrouted"] = len(missed)
    summary["files"] = _plots(out, summary, router)
    _atomic_write(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _plots(out: Path, summary: dict[str, Any], title: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional (the eval extra)
        return []
    files = []
    conf = summary["confusion"]
    counts = np.asarray(conf["counts"])
    fig, ax = plt.subplots(
        figsize=(1.2 + 0.9 * len(conf["columns"]), 1.0 + 0.8 * len(conf["rows"]))
    )
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(conf["columns"])), conf["columns"], rotation=30, ha="right")
    ax.set_yticks(range(len(conf["rows"])), conf["rows"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for (r, c), v in np.ndenumerate(counts):
        ax.text(
            c,
            r,
            str(v),
            ha="center",
            va="center",
            color="white" if v > counts.max() / 2 else "black",
        )
    ax.set_title(f"{title}: confusion (n={summary['n']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=110)
    plt.close(fig)
    files.append("confusion.png")

    bins = summary["reliability"]
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    if bins:
        ax.bar(
            [b["lo"] for b in bins],
            [b["accuracy"] for b in bins],
            width=0.1,
            align="edge",
            alpha=0.6,
            edgecolor="black",
            label="accuracy",
        )
        ax.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            "o-",
            color="C1",
            label="mean confidence",
        )
    ece = summary.get("ece")
    ax.set_title(f"{title}: reliability (ECE {ece:.3f})" if ece is not None else title, fontsize=9)
    ax.set_xlabel("confidence of the decision")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    files.append("reliability.png")
    return files


def sample_key(sample: RouteSample) -> str:
    """A stable key of a sample (for resumable LLM routing runs)."""
    raw = json.dumps(sample.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:16]


def dataset_samples(
    examples: Sequence[Any],
    kbs: Sequence[KBInfo],
    titles: dict[str, str] | None = None,
) -> list[RouteSample]:
    """Gold-path states of dataset examples (those with gold KBs), with a teacher-forced
    history for LLM routers: hop ``j``'s sub-question is the question and its answer the title
    of its gold evidence item (``extra["evidence"][j]`` looked up in ``titles``)."""
    from kbrouter.routing.data import LabelResolver, gold_path_samples

    resolve = LabelResolver(kbs)
    out: list[RouteSample] = []
    for ex in examples:
        if ex.gold_kbs is None:
            continue
        evidence = list(ex.extra.get("evidence") or [])
        answers = [
            (titles or {}).get(evidence[j], "(found)") if j < len(evidence) else "(found)"
            for j in range(len(ex.gold_kbs))
        ]
        for s in gold_path_samples(
            str(ex.id),
            ex.question.text,
            ex.gold_kbs,
            has_image=ex.question.image is not None,
            resolve=resolve,
            source=ex.source,
        ):
            s.history = [(ex.question.text, answers[j]) for j in range(s.state.step)]
            out.append(s)
    return out
