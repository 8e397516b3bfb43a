"""Reports over results directories: a markdown + JSON table in the paper's Table 1 layout and
PNG plots.

Table 1 layout: methods as rows, datasets as columns (the paper's order first), plus the
average over the datasets a row has. Further tables: per-source F1-Recall for datasets with
several sources (mkqa-mini), and routing/cost per method and dataset (retrieval calls per
question, total and per KB; steps; KB-choice accuracy where gold KBs are known; tokens and
seconds per question), and error attribution: the share of questions whose first failed stage
is routing, early stop, budget, retrieval, reading or format (per method and dataset, and per
source). Plots: F1-Recall per dataset per method; retrieval calls per question per KB; stage
shares per method.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kbrouter.errors import DatasetError
from kbrouter.eval.attribution import STAGES
from kbrouter.eval.harness import CONFIG_FILE, RESULTS_FILE, load_results, summarize_results

log = logging.getLogger(__name__)

__all__ = ["Report", "RunResult", "build_report", "find_runs", "write_report"]

DATASET_ORDER = ("infoseek", "dynvqa", "webqa", "2wiki", "openwikitable", "tabfact", "mkqa-mini")
"""Paper column order (visual QA, then text/table QA), then our own benchmark."""

METHOD_ORDER = ("direct", "cot", "single-kb", "all-kbs", "iterretgen", "ircot", "r1-router")


@dataclass
class RunResult:
    """One results directory: its config and recomputed summary."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]

    @property
    def run(self) -> dict[str, Any]:
        return self.config.get("run", {})

    @property
    def dataset(self) -> str:
        info = self.config.get("dataset_info") or {}
        return str(info.get("name") or self.run.get("dataset", "?"))

    @property
    def method(self) -> str:
        return str(self.run.get("method", "?"))

    @property
    def model(self) -> str:
        return str(self.run.get("model", "?"))


@dataclass
class Report:
    """The assembled report (also serialised as ``report.json``)."""

    runs: list[RunResult]
    rows: list[str]
    datasets: list[str]
    table: dict[str, dict[str, float | None]]
    average: dict[str, float | None]
    files: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": "F1-Recall (x100)",
            "rows": self.rows,
            "datasets": self.datasets,
            "table": self.table,
            "average": self.average,
            "runs": [
                {
                    "path": str(r.path),
                    "row": _row_label(r, self.runs),
                    "dataset": r.dataset,
                    "method": r.method,
                    "model": r.model,
                    "paper_compat": r.run.get("paper_compat", False),
                    "seed": r.run.get("seed"),
                    "limit": r.run.get("limit"),
                    "stratify": r.run.get("stratify"),
                    "git": r.config.get("git"),
                    "summary": r.summary,
                }
                for r in self.runs
            ],
        }


# --------------------------------------------------------------------------- loading


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Results directories among ``paths``: each path itself if it holds ``config.json``, else
    its sub-folders (searched up to three levels deep) that do."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DatasetError(f"results path not found: {p}")
        if (p / CONFIG_FILE).is_file():
            found.append(p)
            continue
        subs = sorted(
            c.parent
            for pattern in ("*/" + CONFIG_FILE, "*/*/" + CONFIG_FILE, "*/*/*/" + CONFIG_FILE)
            for c in p.glob(pattern)
        )
        if not subs:
            raise DatasetError(f"no results directory (with {CONFIG_FILE}) under {p}")
        found.extend(subs)
    return list(dict.fromkeys(found))


def load_run(path: Path) -> RunResult:
    try:
        config = json.loads((path / CONFIG_FILE).read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path / CONFIG_FILE}: {e}") from None
    records = load_results(path / RESULTS_FILE)
    summary = summarize_results(records)
    return RunResult(path=path, config=config, summary=summary)


# --------------------------------------------------------------------------- assembling


def _method_rank(method: str) -> tuple[int, str]:
    base = method.split(":", 1)[0]
    try:
        return METHOD_ORDER.index(base), method
    except ValueError:
        return len(METHOD_ORDER), method


def _dataset_rank(name: str) -> tuple[int, str]:
    try:
        return DATASET_ORDER.index(name), name
    except ValueError:
        return len(DATASET_ORDER), name


def _row_label(r: RunResult, runs: Sequence[RunResult]) -> str:
    models = {x.model for x in runs}
    modes = {bool(x.run.get("paper_compat")) for x in runs}
    label = r.method
    options = r.run.get("method_options") or {}
    if options:
        label += " (" + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"
    if len(models) > 1:
        label += f" [{r.model}]"
    if len(modes) > 1 and r.run.get("paper_compat"):
        label += " (paper-compat)"
    return label


def build_report(paths: Sequence[str | Path]) -> Report:
    """Load every results directory under ``paths`` and assemble the tables."""
    runs = [load_run(p) for p in find_runs(paths)]
    runs.sort(key=lambda r: (_method_rank(r.method), _dataset_rank(r.dataset), str(r.path)))
    rows = list(dict.fromkeys(_row_label(r, runs) for r in runs))
    datasets = sorted({r.dataset for r in runs}, key=_dataset_rank)
    table: dict[str, dict[str, float | None]] = {row: {} for row in rows}
    for r in runs:
        row = _row_label(r, runs)
        if r.dataset in table[row]:
            log.warning(
                "several runs for %s on %s; the last one (%s) is shown", row, r.dataset, r.path
            )
        table[row][r.dataset] = r.summary.get("f1_recall")
    average = {}
    for row in rows:
        vals = [v for v in table[row].values() if v is not None]
        average[row] = sum(vals) / len(vals) if vals else None
    return Report(runs=runs, rows=rows, datasets=datasets, table=table, average=average)


# --------------------------------------------------------------------------- rendering


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _display_path(p: Path) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:  # another drive (Windows)
        return str(p)


def render_markdown(rep: Report) -> str:
    out = ["# Evaluation report", ""]
    complete = all(r.summary.get("questions", 0) for r in rep.runs)
    out.append(
        "F1-Recall × 100 (token recall of the best-F1 gold; method.md sec. 4). "
        "Avg is over the datasets each row has."
        + ("" if complete else " Runs with no results show –.")
    )
    out.append("")
    header = ["Method", *rep.datasets, "Avg"]
    body = [
        [row, *(_fmt(rep.table[row].get(d)) for d in rep.datasets), _fmt(rep.average[row])]
        for row in rep.rows
    ]
    out += _md_table(header, body)
    out.append("")

    # questions per cell
    out += ["Questions per cell:", ""]
    counts = {(_row_label(r, rep.runs), r.dataset): r.summary.get("questions", 0) for r in rep.runs}
    out += _md_table(
        ["Method", *rep.datasets],
        [[row, *(str(counts.get((row, d), "–")) for d in rep.datasets)] for row in rep.rows],
    )
    out.append("")

    # per-source breakdowns
    for d in rep.datasets:
        runs = [r for r in rep.runs if r.dataset == d]
        sources = sorted({s for r in runs for s in r.summary.get("by_source", {})})
        if len(sources) <= 1:
            continue
        out += [f"## {d}: F1-Recall per source", ""]
        body = []
        for r in runs:
            bs = r.summary.get("by_source", {})
            body.append(
                [_row_label(r, rep.runs)]
                + [
                    f"{_fmt(bs[s]['f1_recall'], 1)} ({bs[s]['questions']})" if s in bs else "–"
                    for s in sources
                ]
            )
        out += _md_table(["Method", *sources], body)
        out.append("")

    # routing and cost
    out += ["## Routing and cost per question", ""]
    for d in rep.datasets:
        runs = [r for r in rep.runs if r.dataset == d]
        kbs = sorted(
            {k for r in runs for k in r.summary["routing"].get("retrieval_calls_per_kb", {})}
        )
        header = ["Method", "retrievals", *(f"→{k}" for k in kbs), "ret. steps", "model calls"]
        header += ["KB acc strict", "KB acc lenient", "no-retrieval", "prompt tok", "compl. tok"]
        header += ["sec", "EM", "yes/no acc"]
        body = []
        for r in runs:
            rt = r.summary["routing"]
            per_kb = rt.get("retrieval_calls_per_kb", {})
            acc_s, acc_l = rt.get("kb_accuracy_strict"), rt.get("kb_accuracy_lenient")
            body.append(
                [
                    _row_label(r, rep.runs),
                    _fmt(rt.get("retrieval_calls_per_question")),
                    *(_fmt(per_kb.get(k, 0.0)) for k in kbs),
                    _fmt(rt.get("retrieval_steps_per_question")),
                    _fmt(rt.get("model_calls_per_question")),
                    _fmt(None if acc_s is None else 100 * acc_s, 1),
                    _fmt(None if acc_l is None else 100 * acc_l, 1),
                    _fmt(100 * (rt.get("no_retrieval_rate") or 0.0), 1),
                    _fmt(rt.get("prompt_tokens_per_question"), 0),
                    _fmt(rt.get("completion_tokens_per_question"), 0),
                    _fmt(rt.get("seconds_per_question")),
                    _fmt(r.summary.get("exact_match"), 1),
                    _fmt(r.summary.get("yes_no_accuracy"), 1),
                ]
            )
        out += [f"### {d}", ""]
        out += _md_table(header, body)
        out.append("")
    out += _attribution_section(rep)
    out += [
        "KB acc: share of gold hops whose retrieval step searched exactly the gold KB (strict) "
        "or searched it among others (lenient); – where the dataset has no gold KBs. "
        "no-retrieval: % of questions answered without any retrieval. Seconds are wall time "
        "per question (concurrent questions overlap).",
        "",
        "## Runs",
        "",
    ]
    for r in rep.runs:
        git = r.config.get("git") or {}
        out.append(
            f"- `{_display_path(r.path)}`: {r.method} on {r.dataset} "
            f"({r.summary.get('questions', 0)} questions), "
            f"model `{r.model}`, seed {r.run.get('seed')}, limit {r.run.get('limit')}, "
            f"stratify {r.run.get('stratify')}, paper-compat {r.run.get('paper_compat')}, "
            f"kbrouter {r.config.get('kbrouter_version')}, git {str(git.get('revision'))[:10]}"
            + (" (dirty)" if git.get("dirty") else "")
        )
    out.append("")
    return "\n".join(out)


def _stages_present(runs: Sequence[RunResult]) -> list[str]:
    seen = {k for r in runs for k in r.summary.get("attribution", {}).get("shares", {})}
    return [s for s in STAGES if s in seen]


def _attribution_section(rep: Report) -> list[str]:
    """Per dataset: stage shares (%) per method, then per source; notes what cannot be told."""
    out: list[str] = []
    for d in rep.datasets:
        runs = [r for r in rep.runs if r.summary.get("attribution", {}).get("questions")]
        runs = [r for r in runs if r.dataset == d]
        stages = _stages_present(runs)
        if not runs or not stages:
            continue
        if not out:
            out += [
                "## Where answers go wrong (error attribution)",
                "",
                "Share of questions (%) by the first stage that failed "
                "(kbrouter.eval.attribution): correct (F1-Recall >= 0.5), routing (a gold hop's "
                "KB never searched), retrieval (gold KB searched, gold evidence not among the "
                "evidence shown), reading (gold evidence shown, answer wrong), early stop / "
                "budget (stopped / out of steps before the gold hops were covered), format (no "
                "usable answer).",
                "",
            ]
        body = []
        for r in runs:
            a = r.summary["attribution"]
            body.append(
                [_row_label(r, rep.runs), str(a["questions"])]
                + [_fmt(100 * a["shares"].get(s, 0.0), 1) for s in stages]
            )
        out += [f"### {d}", ""]
        out += _md_table(["Method", "n", *(s.replace("_", " ") for s in stages)], body)
        out.append("")
        cannot = sorted({c for r in runs for c in r.summary["attribution"]["not_attributable"]})
        if cannot:
            out += ["Cannot be attributed for some questions: " + "; ".join(cannot) + ".", ""]
        sources = sorted({s for r in runs for s in r.summary["attribution"].get("by_source", {})})
        if len(sources) <= 1:
            continue
        out += [f"#### {d}: first failed stage per source (% of the source's questions)", ""]
        body = []
        for r in runs:
            bs = r.summary["attribution"]["by_source"]
            for src in sources:
                if src not in bs:
                    continue
                sh = bs[src]["shares"]
                body.append(
                    [_row_label(r, rep.runs), src, str(bs[src]["questions"])]
                    + [_fmt(100 * sh.get(s, 0.0), 0) for s in stages]
                )
        out += _md_table(["Method", "source", "n", *(s.replace("_", " ") for s in stages)], body)
        out.append("")
    return out


def _plot_attribution(rep: Report, out_dir: Path, plt: Any) -> Path | None:
    runs = [r for r in rep.runs if r.summary.get("attribution", {}).get("questions")]
    stages = _stages_present(runs)
    if not runs or not stages:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(runs) + 3), 4.4))
    labels = [f"{_row_label(r, rep.runs)} / {r.dataset}" for r in runs]
    bottom = [0.0] * len(runs)
    for s in stages:
        vals = [100 * r.summary["attribution"]["shares"].get(s, 0.0) for r in runs]
        ax.bar(range(len(runs)), vals, bottom=bottom, label=s.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(runs)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("% of questions")
    ax.set_ylim(0, 100)
    ax.set_title("First failed stage per method")
    ax.legend(fontsize=8, title="stage", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    p = out_dir / "attribution.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def _plot(rep: Report, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[Path] = []
    n_rows, n_ds = len(rep.rows), len(rep.datasets)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * n_ds * max(1, n_rows) * 0.45 + 2), 4.2))
    width = 0.8 / max(1, n_rows)
    for i, row in enumerate(rep.rows):
        xs = [j + (i - (n_rows - 1) / 2) * width for j in range(n_ds)]
        ys = [rep.table[row].get(d) or 0.0 for d in rep.datasets]
        ax.bar(xs, ys, width=width, label=row)
    ax.set_xticks(range(n_ds), rep.datasets)
    ax.set_ylabel("F1-Recall (×100)")
    ax.set_ylim(0, 100)
    ax.set_title("F1-Recall per dataset and method")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method")
    fig.tight_layout()
    p = out_dir / "score_by_dataset.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p)

    fig, axes = plt.subplots(1, n_ds, figsize=(max(5.0, 4.2 * n_ds), 4.2), squeeze=False)
    for ax, d in zip(axes[0], rep.datasets, strict=True):
        runs = [r for r in rep.runs if r.dataset == d]
        kbs = sorted(
            {k for r in runs for k in r.summary["routing"].get("retrieval_calls_per_kb", {})}
        )
        labels = [_row_label(r, rep.runs) for r in runs]
        bottom = [0.0] * len(runs)
        for k in kbs:
            vals = [
                r.summary["routing"].get("retrieval_calls_per_kb", {}).get(k, 0.0) for r in runs
            ]
            ax.bar(range(len(runs)), vals, bottom=bottom, label=k)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_xticks(range(len(runs)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(d)
        ax.set_ylabel("retrieval calls per question")
        if kbs:
            ax.legend(fontsize=8, title="KB", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    p = out_dir / "retrieval_calls.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p)
    att = _plot_attribution(rep, out_dir, plt)
    if att is not None:
        files.append(att)
    return files


def write_report(paths: Sequence[str | Path], out_dir: str | Path, *, plots: bool = True) -> Report:
    """Build the report for ``paths`` and write ``report.md``, ``report.json`` and the PNGs."""
    rep = build_report(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(render_markdown(rep), encoding="utf-8")
    js = out / "report.json"
    js.write_text(json.dumps(rep.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
    rep.files = [md, js]
    if plots:
        rep.files += _plot(rep, out)
    return rep
