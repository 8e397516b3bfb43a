"""From evidence to answers: reading-path configurations on mkqa-mini dev with the embedded
model, each with its error attribution (which stage failed first, per question).

A configuration is ``name=method@setting=value;setting=value`` evaluated on a fixed, seeded
selection of one or more mkqa-mini sources. The default compares the table reader on the
table questions (wtq) with the table KB only: rows (today's reading) vs the SQL reader.

Writes ``summary.json`` (per configuration ``f1_recall`` with its standard error,
``reading_failure_share``, ``early_stop_share``, attribution shares, ``questions``) and
``summary.md`` under ``--out``; each configuration's resumable results go under ``--runs`` (not
committed). Every configuration records its selection, model and engine settings; those already
in ``summary.json`` are kept, a configuration named again is re-measured (resuming). Re-run the
same command to resume.

    .venv/bin/python benchmarks/bench_answers.py --sources wtq --limit 40

``--dataset jsonl:demo/questions.jsonl --kbs demo/kbs.toml --top-k 5`` runs the demo questions
with the ``make demo`` setup (``--sources`` does not apply to JSONL datasets).

``--from-runs NAME=DIR[,NAME=DIR...]`` adds configurations scored from existing results
directories (no model: e.g. the end-to-end benchmark's runs before and after a change of the
reading path), with the same fields plus ``early_stop_share_two_hop`` (early stops among the
questions whose gold path has two or more hops).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CONFIGS = (
    "table-rows=single-kb:table@table_reader=rows,table-sql=single-kb:table@table_reader=sql"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated name=method@...")
    ap.add_argument("--dataset", default="mkqa-mini", help="mkqa-mini or jsonl:<path>")
    ap.add_argument("--sources", default="wtq", help="comma-separated mkqa-mini sources")
    ap.add_argument("--limit", type=int, default=None, help="questions (seeded, stratified)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="llama-cpp")
    ap.add_argument(
        "--model-for",
        action="append",
        default=[],
        help="PURPOSE=SPEC: another model for one call purpose, e.g. "
        "read=llama-cpp:qwen2.5-coder-1.5b (the SQL reader's query)",
    )
    ap.add_argument("--kbs", type=Path, default=HERE / "mkqa_kbs.toml")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-answers")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "answers")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--from-runs", default="", help="NAME=DIR,... (score existing results)")
    ap.add_argument("--configs-only", action="store_true", help="with --from-runs: no model runs")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.from_runs:
        _from_runs(args)
        if args.configs_only:
            return

    import sys

    sys.path.insert(0, str(HERE))
    from bench_routing_e2e import _commit, _se
    from kbrouter.cli.common import parse_purpose_models
    from kbrouter.engine.engine import EngineConfig
    from kbrouter.eval.harness import load_results, run_eval
    from kbrouter.kb.registry import KBRegistry
    from kbrouter.models.registry import load_model
    from run_mkqa_eval import _parse_method

    sources = sorted(s.strip() for s in args.sources.split(",") if s.strip())
    if args.dataset != "mkqa-mini":
        sources = []
    registry = KBRegistry.from_config(args.kbs)
    registry.build(progress=False)
    model = load_model(args.model)
    purpose_models = parse_purpose_models(args.model_for)
    engine = EngineConfig(max_steps=args.max_steps, top_k=args.top_k, concurrency=2)
    image_dir = None
    if args.dataset.startswith("jsonl:"):
        image_dir = Path(args.dataset[len("jsonl:") :]).resolve().parent
    selection = {
        "dataset": "mkqa-mini dev" if args.dataset == "mkqa-mini" else args.dataset,
        "sources": sources,
        "limit": args.limit,
        "seed": args.seed,
        "stratified_by_source": True,
    }
    result: dict = {"configurations": {}}
    path = args.out / "summary.json"
    if path.is_file():  # every configuration records its own selection and setup: keep them
        result["configurations"] = json.loads(path.read_text()).get("configurations", {})
    setup = {
        "model": args.model,
        "model_info": model.describe(),
        **({"purpose_models": purpose_models} if purpose_models else {}),
        "engine": engine.model_dump(mode="json"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    commit = _commit()
    for item in [c.strip() for c in args.configs.split(",") if c.strip()]:
        name, _, entry = item.partition("=")
        if not entry:
            raise SystemExit(f"configuration {item!r} is not name=method@settings")
        method, options = _parse_method(entry)
        out_dir = args.runs / name
        t = time.perf_counter()
        summary = run_eval(
            args.dataset,
            method,
            engine,
            args.model,
            out_dir,
            args.limit,
            args.seed,
            True,
            kbs=args.kbs,
            model=model,
            registry=registry,
            sources=sources or None,
            image_dir=image_dir,
            keep_messages=False,
            method_options=options,
            purpose_models=purpose_models,
        )
        recs = load_results(out_dir)
        scores = [r["scores"]["f1_recall"] for r in recs]
        att = summary["attribution"]
        shares = att.get("shares", {})
        routing = summary["routing"]
        result["configurations"][name] = {
            "selection": selection,
            **setup,
            "method": method,
            "settings": options,
            "f1_recall": summary["f1_recall"],
            "f1_recall_se": _se(scores),
            "questions": summary["questions"],
            "full_marks": sum(1 for x in scores if x >= 1.0),
            "reading_failure_share": shares.get("reading", 0.0),
            "early_stop_share": shares.get("early_stop", 0.0),
            "attribution": shares,
            "model_calls_per_question": routing.get("model_calls_per_question"),
            "seconds_per_question": routing.get("seconds_per_question"),
            "commit": commit,
            "wall_seconds_this_run": round(time.perf_counter() - t, 1),
        }
        print(name, summary["f1_recall"], flush=True)
        _write(args.out, result)
    registry.close()


def _from_runs(args) -> None:
    """Score existing results directories into summary.json (see the module docstring)."""
    import sys

    sys.path.insert(0, str(HERE))
    from bench_routing_e2e import _se
    from kbrouter.eval.attribution import attribute_record, summarize_attribution
    from kbrouter.eval.datasets import load_dataset
    from kbrouter.eval.harness import load_results

    gold_evidence = {e.id: e.gold_evidence for e in load_dataset("mkqa-mini").examples}

    path = args.out / "summary.json"
    result = {"configurations": {}}
    if path.is_file():
        result["configurations"] = json.loads(path.read_text()).get("configurations", {})
    for item in [c.strip() for c in args.from_runs.split(",") if c.strip()]:
        name, _, where = item.partition("=")
        run_dir = Path(where)
        recs = load_results(run_dir)
        if not recs:
            raise SystemExit(f"{run_dir}: no results")
        stored = json.loads((run_dir / "config.json").read_text())
        cfg = stored.get("run", {})
        summary = json.loads((run_dir / "summary.json").read_text())
        scores = [r["scores"]["f1_recall"] for r in recs]
        gold = {r["id"]: gold_evidence[r["id"]] for r in recs if gold_evidence.get(r["id"])}
        shares = summarize_attribution(recs, gold or None).get("shares", {})

        def stage(r: dict, gold: dict = gold) -> str | None:
            if r["id"] in gold:
                blame = attribute_record(r, gold[r["id"]])
                return None if blame is None else blame.stage
            return (r.get("attribution") or {}).get("stage")

        two_hop = [r for r in recs if len(r.get("gold_kbs") or []) >= 2]
        early = [r for r in two_hop if stage(r) == "early_stop"]
        routing = summary.get("routing", {})
        result["configurations"][name] = {
            "selection": {
                "dataset": cfg.get("dataset"),
                "sources": cfg.get("sources") or [],
                "limit": cfg.get("limit"),
                "seed": cfg.get("seed"),
                "stratified_by_source": cfg.get("stratify", True),
                "from_run": str(run_dir),
            },
            "model": cfg.get("model"),
            "model_info": stored.get("model_info") or {},
            "policy": stored.get("policy") or {},
            "commit": (stored.get("git") or {}).get("revision", "")[:7],
            "engine": cfg.get("engine") or {},
            "method": cfg.get("method"),
            "settings": cfg.get("method_options") or {},
            "f1_recall": summary["f1_recall"],
            "f1_recall_se": _se(scores),
            "questions": len(recs),
            "full_marks": sum(1 for x in scores if x >= 1.0),
            "reading_failure_share": shares.get("reading", 0.0),
            "early_stop_share": shares.get("early_stop", 0.0),
            "early_stop_share_two_hop": len(early) / len(two_hop) if two_hop else None,
            "two_hop_questions": len(two_hop),
            "attribution": shares,
            "model_calls_per_question": routing.get("model_calls_per_question"),
            "seconds_per_question": routing.get("seconds_per_question"),
        }
    _write(args.out, result)


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, out / "summary.json")

    def f(x, d=1):
        return "–" if x is None else f"{x:.{d}f}"

    stages = ("correct", "routing", "retrieval", "reading", "early_stop", "budget", "format")
    lines = [
        "# From evidence to answers (embedded model)",
        "",
        "mkqa-mini dev; each row's questions are a fixed seeded selection (stratified by source) "
        "of the sources it names; greedy decoding. Attribution columns: % of questions by the "
        "first failed stage (kbrouter.eval.attribution).",
        "",
        "| configuration | questions from | method | settings | model, top-k | F1-Recall ± SE | n "
        "| full marks | model calls/q | s/q | "
        + " | ".join(s.replace("_", " ") for s in stages)
        + " |",
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(stages),
    ]
    for name, c in result["configurations"].items():
        settings = ", ".join(f"{k}={v}" for k, v in sorted(c["settings"].items())) or "–"
        sel = c["selection"]
        where = ", ".join(sel["sources"]) or sel["dataset"]
        picked = f"{where} ({'all' if sel['limit'] is None else sel['limit']}"
        picked += f", seed {sel['seed']})"
        setup = f"{c['model_info'].get('name', c['model'])}, {c['engine']['top_k']}"
        for purpose, spec in (c.get("purpose_models") or {}).items():
            setup += f" ({purpose}: {spec})"
        lines.append(
            f"| {name} | {picked} | {c['method']} | {settings} | {setup} | {f(c['f1_recall'])} ± "
            f"{f(c['f1_recall_se'])} | {c['questions']} | {c.get('full_marks', '–')} | "
            f"{f(c['model_calls_per_question'], 2)} "
            f"| {f(c['seconds_per_question'])} | "
            + " | ".join(f(100 * c["attribution"].get(s, 0.0), 0) for s in stages)
            + " |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
