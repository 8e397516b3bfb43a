"""The evaluation harness: run one method on one dataset, write results incrementally, resume.

A results directory is self-describing::

    <out_dir>/config.json      what ran: dataset, method, model, engine config, seed, selection,
                               kbrouter + library versions, git revision (written atomically)
    <out_dir>/results.jsonl    one JSON line per finished question: id, source, question, golds,
                               gold KBs and evidence, prediction, scores, routing facts, error
                               attribution (kbrouter.eval.attribution), full trajectory
    <out_dir>/summary.json     scores and routing metrics over the selected questions

Lines are appended and flushed as questions finish, so an interrupted run loses at most the
questions in flight; re-running the same command skips the ids already present (a truncated
last line is dropped) except those whose run hit an error (model server down, ...), which are
run again; the summary uses the latest line of each id. Re-using a directory for a *different*
run (other dataset, method, model, seed, scoring mode or engine settings) is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kbrouter.engine.engine import Engine, EngineConfig, check_purposes
from kbrouter.engine.runtime import KBSource
from kbrouter.errors import ConfigError, DatasetError
from kbrouter.eval.attribution import attribute, summarize_attribution
from kbrouter.eval.datasets import EvalDataset, EvalExample, load_dataset, select_examples
from kbrouter.eval.metrics import exact_match, f1_recall, token_f1, yes_no_accuracy
from kbrouter.eval.routing import routing_record, summarize_routing
from kbrouter.models.base import ChatModel
from kbrouter.policies.base import Policy
from kbrouter.types import Trajectory

log = logging.getLogger(__name__)

__all__ = [
    "EvalRunConfig",
    "load_results",
    "run_eval",
    "score_prediction",
    "summarize_results",
]

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"

NO_RETRIEVAL_METHODS = frozenset({"direct", "cot"})
_LIBRARIES = (
    "pydantic",
    "numpy",
    "nltk",
    "llama_cpp_python",
    "sentence-transformers",
    "faiss-cpu",
    "bm25s",
    "torch",
    "transformers",
    "openai",
)
_MAX_STORED_GOLDS = 50


class EvalRunConfig(BaseModel):
    """Everything that defines an evaluation run (stored as ``config.json``)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="Dataset registry name (see kbrouter.eval.datasets).")
    method: str = Field(description="Method name (see kbrouter.policies.baselines.make_policy).")
    model: str = Field("llama-cpp", description="Model spec (see kbrouter.models.registry).")
    purpose_models: dict[str, str] = Field(
        default_factory=dict,
        description="Model specs for some call purposes (e.g. {'read': <spec>}: the SQL table "
        "reader's query with a larger model); the other calls use ``model``.",
    )
    kbs: str | None = Field(None, description="Path of the kbs.toml used (None: injected).")
    limit: int | None = Field(None, ge=1, description="Questions evaluated (None: all).")
    seed: int = Field(0, description="Seed of sampling and of the stratified selection.")
    stratify: bool = Field(False, description="Seeded selection stratified by source.")
    sources: list[str] | None = Field(
        None, description="Only questions of these sources (e.g. mkqa-mini's wtq)."
    )
    paper_compat: bool = Field(False, description="Released-code golds and metric quirks.")
    split: str = Field("dev", description="Dataset split (mkqa-mini).")
    image_dir: str | None = Field(None, description="Folder of the question images.")
    data_dir: str | None = Field(None, description="Shared data folder override.")
    method_options: dict[str, Any] = Field(default_factory=dict, description="Policy settings.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Engine settings.")
    keep_messages: bool = Field(
        True, description="Store the prompt messages of every model call in results.jsonl."
    )

    def fingerprint(self) -> dict[str, Any]:
        """The fields a resumed run must share with the stored one."""
        engine = self.engine.model_dump(mode="json", exclude={"concurrency", "cache_dir"})
        extra = {"purpose_models": self.purpose_models} if self.purpose_models else {}
        return {
            **extra,
            "dataset": self.dataset,
            "method": self.method,
            "model": self.model,
            "seed": self.seed,
            "paper_compat": self.paper_compat,
            "split": self.split,
            "sources": self.sources,
            "method_options": self.method_options,
            "engine": engine,
        }


# --------------------------------------------------------------------------- scoring


def score_prediction(
    prediction: str, golds: Sequence[str], *, paper_compat: bool = False, yesno: bool = False
) -> dict[str, Any]:
    """The per-question scores: ``f1_recall`` (in the run's mode) plus both modes, exact match,
    token F1 and (yes/no datasets) yes/no accuracy."""
    paper = f1_recall(prediction, golds, paper_compat=True)
    default = f1_recall(prediction, golds, paper_compat=False)
    scores: dict[str, Any] = {
        "f1_recall": paper if paper_compat else default,
        "f1_recall_paper": paper,
        "f1_recall_default": default,
        "exact_match": exact_match(prediction, golds, paper_compat=paper_compat),
        "token_f1": token_f1(prediction, golds, paper_compat=paper_compat),
    }
    if yesno:
        scores["yes_no_accuracy"] = yes_no_accuracy(prediction, golds)
    return scores


def _result_line(
    ex: EvalExample, traj: Trajectory, ds: EvalDataset, cfg: EvalRunConfig
) -> dict[str, Any]:
    scores = score_prediction(
        traj.answer, ex.golds, paper_compat=cfg.paper_compat, yesno=ds.answer_type == "yesno"
    )
    exclude = None if cfg.keep_messages else _MESSAGE_PATHS
    blame = attribute(
        traj,
        ex.golds,
        ex.gold_kbs,
        ex.gold_evidence,
        top_k=cfg.engine.top_k,
        paper_compat=cfg.paper_compat,
        score=scores["f1_recall"],
    )
    return {
        "id": ex.id,
        "dataset": ds.name,
        "source": ex.source,
        "question": ex.question.text,
        "image": str(ex.question.image) if ex.question.image else None,
        "golds": ex.golds[:_MAX_STORED_GOLDS],
        "golds_total": len(ex.golds),
        "gold_kbs": ex.gold_kbs,
        "gold_evidence": ex.gold_evidence,
        "prediction": traj.answer,
        "scores": scores,
        "routing": routing_record(traj, ex.gold_kbs),
        "attribution": blame.model_dump(mode="json"),
        "error": traj.error,
        "trajectory": traj.model_dump(mode="json", exclude=exclude),
    }


_MESSAGE_PATHS: Any = {
    "steps": {"__all__": {"route_calls": {"__all__": {"messages"}}, "answer_call": {"messages"}}},
    "final_call": {"messages"},
}


# --------------------------------------------------------------------------- files


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", "utf-8")
    os.replace(tmp, path)


def load_results(path: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The result lines of a ``results.jsonl`` (or of a results directory).

    A truncated last line (an interrupted write) is ignored, and with ``repair=True`` cut from
    the file so appending can resume; other unreadable lines are skipped with a warning.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    last = max((i for i, x in enumerate(lines) if x.strip()), default=-1)
    out: list[dict[str, Any]] = []
    pos = 0
    for i, line in enumerate(lines):
        start, pos = pos, pos + len(line) + 1
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError("not a result object")
        except ValueError:
            if i == last:
                log.warning("%s: dropping a truncated last line (interrupted write)", path)
                if repair:
                    with path.open("r+b") as f:
                        f.truncate(start)
                return out
            log.warning("%s:%d: unreadable result line skipped", path, i + 1)
            continue
        out.append(rec)
    if repair and raw and not raw.endswith(b"\n"):
        with path.open("ab") as f:  # a complete last line without its newline
            f.write(b"\n")
    return out


def _git_revision() -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[3]
    if not (repo / ".git").exists():
        return {"revision": None}
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return {"revision": rev or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None}


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for lib in _LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    return out


_OWN_KEYS = ("run", "kbrouter_version", "libraries", "git", "written_at")


def _check_or_write_config(
    out_dir: Path, cfg: EvalRunConfig, extra: dict[str, Any], identity: dict[str, Any] | None = None
) -> dict[str, Any]:
    path = out_dir / CONFIG_FILE
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text("utf-8"))
            old_cfg = EvalRunConfig.model_validate(old["run"])
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{path} is not a kbrouter results config ({e})") from None
        a, b = old_cfg.fingerprint(), cfg.fingerprint()
        diff = [k for k in a if a[k] != b[k]]
        if diff:
            detail = "; ".join(f"{k}: stored {a[k]!r}, now {b[k]!r}" for k in diff)
            raise ConfigError(
                f"results directory {out_dir} holds a different run ({detail}); "
                "use another --out or delete it"
            )
        _check_identity(out_dir, old.get("identity"), identity or {})
    from kbrouter import __version__

    # facts of the stored run (e.g. model_info) survive a resume that loads no model
    kept = {k: v for k, v in old.items() if k not in _OWN_KEYS}
    data = {
        **kept,
        "run": cfg.model_dump(mode="json"),
        "kbrouter_version": __version__,
        "libraries": _versions(),
        "git": _git_revision(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **{k: v for k, v in extra.items() if v is not None or k not in kept},
        "identity": {**(old.get("identity") or {}), **(identity or {})},
    }
    _atomic_write_json(path, data)
    return data


def _check_identity(out_dir: Path, stored: Any, now: dict[str, Any]) -> None:
    """A resume must be the same model, dataset file and KB indexes, by content."""
    if not isinstance(stored, dict):
        if now:
            log.warning(
                "%s was written by an older kbrouter without identity facts: the model, dataset "
                "and indexes of the stored run cannot be checked against this one",
                out_dir,
            )
        return
    what = {
        "model": "model",
        "purpose_models": "model for a call purpose",
        "dataset_sha256": "dataset file",
        "kb_indexes": "KB indexes",
    }
    diff = [k for k in now if k in stored and stored[k] != now[k]]
    if diff:
        detail = "; ".join(f"{what.get(k, k)}: stored {stored[k]!r}, now {now[k]!r}" for k in diff)
        raise ConfigError(
            f"results directory {out_dir} was written with a different {what.get(diff[0])} "
            f"({detail}); resuming would mix two runs: use another --out or delete it"
        )


def _model_identity(model: ChatModel, what: str) -> dict[str, Any] | None:
    """The backend's identity facts, or None (then not checked on resume) when it cannot tell."""
    try:
        return dict(model.identity())
    except Exception as e:  # noqa: BLE001 - cannot tell: not checked
        log.warning("%s identity unavailable: %s", what, e)
        return None


def _run_identity(
    ds: EvalDataset,
    model: ChatModel | None,
    registry: KBSource,
    retrieves: bool,
    purpose_models: Mapping[str, ChatModel] | None = None,
) -> dict[str, Any]:
    """Content identity of what a run answers with (compared on resume)."""
    from kbrouter.engine.cache import manifest_id
    from kbrouter.files import file_sha256

    out: dict[str, Any] = {}
    if ds.path is not None and Path(ds.path).is_file():
        out["dataset_sha256"] = file_sha256(ds.path)
    if model is not None and (identity := _model_identity(model, "model")) is not None:
        out["model"] = identity
    for purpose, m in sorted((purpose_models or {}).items()):
        if (identity := _model_identity(m, purpose)) is not None:
            out.setdefault("purpose_models", {})[purpose] = identity
    if retrieves:
        out["kb_indexes"] = {i.name: manifest_id(registry.get(i.name)) for i in registry.infos}
    return out


# --------------------------------------------------------------------------- summary


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_results(
    records: Sequence[dict[str, Any]], selected_ids: Sequence[str] | None = None
) -> dict[str, Any]:
    """Scores (x100) and routing metrics over result lines (restricted to ``selected_ids``)."""
    if selected_ids is not None:
        keep = set(selected_ids)
        records = [r for r in records if r["id"] in keep]
    latest: dict[str, dict[str, Any]] = {}
    for r in records:  # a re-run id keeps its latest line
        latest[r["id"]] = r
    recs = list(latest.values())

    def pct(key: str, rs: Sequence[dict[str, Any]]) -> float | None:
        vals = [r["scores"][key] for r in rs if r["scores"].get(key) is not None]
        m = _mean(vals)
        return None if m is None else 100.0 * m

    keys = ("f1_recall", "f1_recall_paper", "f1_recall_default", "exact_match", "token_f1")
    out: dict[str, Any] = {"questions": len(recs)}
    if selected_ids is not None:
        out["selected"] = len(set(selected_ids))
        out["complete"] = len(recs) == len(set(selected_ids))
    for k in keys:
        out[k] = pct(k, recs)
    if any("yes_no_accuracy" in r["scores"] for r in recs):
        out["yes_no_accuracy"] = pct("yes_no_accuracy", recs)
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in recs:
        by_source[r.get("source", "?")].append(r)
    out["by_source"] = {
        s: {"questions": len(rs), "f1_recall": pct("f1_recall", rs)}
        for s, rs in sorted(by_source.items())
    }
    out["errors"] = sum(1 for r in recs if r.get("error"))
    out["routing"] = summarize_routing([r["routing"] for r in recs])
    out["attribution"] = summarize_attribution(recs)
    return out


# --------------------------------------------------------------------------- run


def _progress(total: int, done: int, label: str, enabled: bool):
    if not enabled:
        return None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("F1-Recall {task.fields[score]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
    task = prog.add_task(label, total=total, completed=done, score="-")
    return prog, task


def run_eval(
    dataset: str,
    method: str,
    engine_config: EngineConfig | None = None,
    model_spec: str = "llama-cpp",
    out_dir: str | Path = "runs/eval",
    limit: int | None = None,
    seed: int = 0,
    stratify: bool = False,
    *,
    kbs: str | Path | None = None,
    paper_compat: bool = False,
    image_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    split: str = "dev",
    sources: Sequence[str] | None = None,
    method_options: dict[str, Any] | None = None,
    keep_messages: bool = True,
    model: ChatModel | None = None,
    registry: KBSource | None = None,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    purpose_models: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``method`` on ``dataset`` and return the summary (also in ``summary.json``).

    Args:
        dataset: dataset registry name (``mkqa-mini``, ``2wiki``, ..., ``jsonl:<path>``).
        method: method name (``direct``, ``cot``, ``single-kb:<kb>``, ``all-kbs``,
            ``iterretgen``, ``ircot``, ``r1-router``).
        engine_config: engine settings (budget, top-k, concurrency...); its seed is set to
            ``seed``.
        model_spec: model spec for :func:`~kbrouter.models.registry.load_model` (ignored when
            ``model`` is given, but recorded).
        out_dir: results directory (created; resumed if it holds the same run).
        limit: evaluate only this many questions (see :func:`select_examples`).
        seed: sampling seed and seed of the stratified selection.
        stratify: select ``limit`` questions stratified by source instead of the first ones.
        kbs: the ``kbs.toml`` of the knowledge bases (ignored when ``registry`` is given).
        paper_compat: golds and metric exactly as the released evaluation code.
        image_dir / data_dir / split: where the question images / shared data are; the split.
        sources: evaluate only the questions of these sources (before ``limit`` applies).
        method_options: settings passed to the policy (e.g. ``{"iterations": 3}``).
        keep_messages: store every call's prompt messages in ``results.jsonl``.
        model / registry: already built backend / KB registry (tests, benchmarks).
        progress: show a rich progress bar.
        on_result: called with each result line as it is written.
        purpose_models: model specs for some call purposes (``route``, ``sub_answer``,
            ``final``, ``generate``, ``read``), loaded with
            :func:`~kbrouter.models.registry.load_model`; e.g. ``{"read": "llama-cpp:
            qwen2.5-coder-1.5b"}`` writes the SQL reader's queries with the 1.5B preset.

    Raises:
        DatasetError: unknown or unreadable dataset, or question images missing for a method
            that needs them.
        ConfigError: unknown method, bad settings, or ``out_dir`` holds a different run.
    """
    from kbrouter.policies.baselines import make_policy

    engine_cfg = (engine_config or EngineConfig()).model_copy(update={"seed": seed})
    cfg = EvalRunConfig(
        dataset=dataset,
        method=method,
        model=model_spec,
        purpose_models=dict(purpose_models or {}),
        kbs=str(kbs) if kbs is not None else None,
        limit=limit,
        seed=seed,
        stratify=stratify,
        paper_compat=paper_compat,
        split=split,
        sources=sorted(set(sources)) if sources else None,
        image_dir=str(image_dir) if image_dir is not None else None,
        data_dir=str(data_dir) if data_dir is not None else None,
        method_options=dict(method_options or {}),
        engine=engine_cfg,
        keep_messages=keep_messages,
    )
    check_purposes(cfg.purpose_models)
    policy: Policy = make_policy(method, **cfg.method_options)
    ds = load_dataset(
        dataset, data_dir=data_dir, image_dir=image_dir, paper_compat=paper_compat, split=split
    )
    pool = ds.examples
    if cfg.sources:
        known = sorted({e.source for e in ds.examples})
        unknown = [x for x in cfg.sources if x not in known]
        if unknown:
            raise DatasetError(
                f"dataset {dataset!r} has no source {unknown[0]!r}; its sources: {', '.join(known)}"
            )
        pool = [e for e in ds.examples if e.source in cfg.sources]
    selected = select_examples(pool, limit, seed=seed, stratify=stratify)
    if not selected:
        raise DatasetError(f"no questions selected from dataset {dataset!r}")
    if len({e.id for e in selected}) != len(selected):
        raise DatasetError(f"dataset {dataset!r} has duplicate question ids")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    done_ids = {r["id"] for r in load_results(results_path, repair=True) if not _failed(r)}
    todo = [e for e in selected if e.id not in done_ids]

    owns_model = model is None
    if registry is None:
        registry = _load_registry(kbs)
    ds.with_kb_names(registry.infos)
    if policy.needs_gold:  # the oracle bounds route along the gold KBs
        missing = [e.id for e in selected if e.gold_kbs is None]
        if missing:
            raise DatasetError(
                f"method {method!r} needs gold KBs, which {len(missing)} selected question(s) of "
                f"{dataset!r} lack (e.g. {missing[0]})"
            )
        policy.set_gold({e.id: e.gold_kbs for e in selected})
    if policy.needs_gold_evidence:
        missing = [e.id for e in selected if not e.gold_evidence]
        if missing:
            raise DatasetError(
                f"method {method!r} needs gold evidence ids, which {len(missing)} selected "
                f"question(s) of {dataset!r} lack (e.g. {missing[0]}); JSONL datasets give "
                "them as gold_evidence"
            )
        policy.set_gold_evidence({e.id: e.gold_evidence for e in selected})
    if model is None and todo:
        from kbrouter.models.registry import load_model

        model = load_model(model_spec)
    extra_models: dict[str, ChatModel] = {}
    if todo and cfg.purpose_models:
        from kbrouter.models.registry import load_model

        extra_models = {p: load_model(spec) for p, spec in cfg.purpose_models.items()}
    retrieves = method.strip().lower() not in NO_RETRIEVAL_METHODS
    if todo and (retrieves or (model is not None and model.supports_images)):
        ds.require_images(todo)
    if todo and retrieves:
        for info in registry.infos:  # fail now, with the index message, not per question
            registry.get(info.name)

    _check_or_write_config(
        out,
        cfg,
        {
            "dataset_info": ds.describe(),
            "policy": policy.describe(),
            "model_info": _describe_model(model),
            "kbs_info": [i.model_dump(mode="json") for i in registry.infos],
            "selected": len(selected),
        },
        _run_identity(ds, model, registry, bool(todo and retrieves), extra_models),
    )
    log.info(
        "%s on %s: %d selected, %d already done, %d to run",
        method,
        dataset,
        len(selected),
        len(selected) - len(todo),
        len(todo),
    )
    if todo:
        assert model is not None
        _run_questions(
            todo,
            ds,
            cfg,
            policy,
            model,
            registry,
            results_path,
            progress,
            on_result,
            done=len(selected) - len(todo),
            total=len(selected),
            close_model=owns_model,
            purpose_models=extra_models,
        )
    summary = summarize_results(load_results(results_path), [e.id for e in selected])
    summary.update(dataset=ds.name, method=method, model=model_spec, paper_compat=paper_compat)
    _atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def _failed(line: dict[str, Any]) -> bool:
    """A result whose question hit a backend/policy error: re-run when resuming."""
    return bool(line.get("error")) or line.get("routing", {}).get("stop_reason") == "error"


def _describe_model(model: ChatModel | None) -> dict[str, Any] | None:
    if model is None:
        return None
    try:
        return dict(model.describe())
    except Exception:
        return {"name": getattr(model, "name", "?")}


def _load_registry(kbs: str | Path | None) -> KBSource:
    if kbs is None:
        raise ConfigError("no knowledge-base config given: pass --kbs path/to/kbs.toml")
    from kbrouter.kb.registry import KBRegistry

    return KBRegistry.from_config(kbs)


def _run_questions(
    todo: list[EvalExample],
    ds: EvalDataset,
    cfg: EvalRunConfig,
    policy: Policy,
    model: ChatModel,
    registry: KBSource,
    results_path: Path,
    progress: bool,
    on_result: Callable[[dict[str, Any]], None] | None,
    *,
    done: int,
    total: int,
    close_model: bool,
    purpose_models: Mapping[str, ChatModel] | None = None,
) -> None:
    engine = Engine(model, registry, policy, cfg.engine, purpose_models=purpose_models)
    bar = _progress(total, done, f"{ds.name} / {cfg.method}", progress)
    scores: list[float] = []
    chunk = max(32, 4 * cfg.engine.concurrency)  # bounds the trajectories held in memory

    async def run_all(f: Any) -> None:
        try:
            for start in range(0, len(todo), chunk):
                part = todo[start : start + chunk]

                def write(i: int, traj: Trajectory, part: list[EvalExample] = part) -> None:
                    line = _result_line(part[i], traj, ds, cfg)
                    f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    scores.append(line["scores"]["f1_recall"])
                    if bar is not None:
                        prog, task = bar
                        prog.update(task, advance=1, score=f"{100 * sum(scores) / len(scores):.1f}")
                    if on_result is not None:
                        on_result(line)

                await engine.answer_many([e.question for e in part], on_result=write)
        finally:
            owned = [model] if close_model else []
            for m in [*owned, *(purpose_models or {}).values()]:
                try:  # in the loop the backend's clients were bound to
                    await m.aclose()
                except Exception:  # closing must never hide the run's outcome
                    log.debug("model close failed", exc_info=True)

    try:
        if bar is not None:
            bar[0].start()
        with results_path.open("a", encoding="utf-8") as f:
            asyncio.run(run_all(f))
    finally:
        engine.close()
        if bar is not None:
            bar[0].stop()
