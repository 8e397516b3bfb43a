"""Every method on a fixed, seeded, stratified-by-source subset of mkqa-mini dev.

Runs each method with the same model and KB registry (loaded once), writes each run's
resumable results directory under ``--runs`` (not committed: it holds full trajectories), and
the report (markdown + JSON + PNG) plus ``bench.json`` (what ran, machine load, wall time per
method) under ``--out``.

Usage (from the repo root; builds the mkqa-mini indexes first if missing)::

    .venv/bin/python benchmarks/run_mkqa_eval.py --limit 30
    .venv/bin/python benchmarks/run_mkqa_eval.py --limit 30 --methods direct,all-kbs
    .venv/bin/python benchmarks/run_mkqa_eval.py --methods 'r1-router@min_retrieval_steps=1'

A method may carry policy settings after ``@`` (``name@key=value;key=value``); they are
recorded in the run and shown in the report's row label.

Interrupted runs resume: re-run the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_METHODS = (
    "direct,all-kbs,r1-router,iterretgen,ircot,cot,single-kb:text,single-kb:table,single-kb:image"
)


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _parse_method(entry: str) -> tuple[str, dict[str, object]]:
    """``name@key=value;key=value`` -> (name, settings); values are JSON when they parse."""
    name, _, opts = entry.partition("@")
    options: dict[str, object] = {}
    for item in filter(None, (o.strip() for o in opts.split(";"))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"method setting {item!r} in {entry!r} is not key=value")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return name.strip(), options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--limit", type=int, default=30, help="questions (stratified by source)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated method names")
    ap.add_argument("--model", default="llama-cpp", help="model spec")
    ap.add_argument("--kbs", type=Path, default=HERE / "mkqa_kbs.toml")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-mkqa")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "mkqa-mini")
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=5, help="evidence items per KB shown")
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from kbrouter.engine.engine import EngineConfig
    from kbrouter.eval.harness import run_eval
    from kbrouter.eval.report import render_markdown, write_report
    from kbrouter.kb.registry import KBRegistry
    from kbrouter.models.registry import load_model

    registry = KBRegistry.from_config(args.kbs)
    t0 = time.perf_counter()
    build = registry.build(progress=False)
    index_seconds = time.perf_counter() - t0
    model = load_model(args.model)
    engine = EngineConfig(max_steps=args.max_steps, top_k=args.top_k, concurrency=args.concurrency)

    bench: dict = {
        "dataset": "mkqa-mini (dev)",
        "limit": args.limit,
        "stratified_by_source": True,
        "seed": args.seed,
        "model": args.model,
        "model_info": model.describe(),
        "kbs": str(args.kbs.relative_to(REPO) if args.kbs.is_relative_to(REPO) else args.kbs),
        "engine": engine.model_dump(mode="json"),
        "index_build_seconds": round(index_seconds, 1),
        "index_build": [r.status for r in build.results],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_before": _load(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "methods": {},
    }
    run_dirs = []
    for entry in [m.strip() for m in args.methods.split(",") if m.strip()]:
        method, options = _parse_method(entry)
        out_dir = args.runs / entry.replace(":", "_").replace("@", "_").replace(";", "_")
        t = time.perf_counter()
        summary = run_eval(
            "mkqa-mini",
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
            keep_messages=False,
            method_options=options,
        )
        bench["methods"][entry] = {
            "wall_seconds": round(time.perf_counter() - t, 1),
            "f1_recall": summary.get("f1_recall"),
            "questions": summary.get("questions"),
            "load_after": _load(),
        }
        run_dirs.append(out_dir)
        print(f"{entry}: F1-Recall {summary.get('f1_recall'):.2f} ({summary['questions']} q)")
        # the report is rewritten after every method, so a stopped benchmark still has one
        bench["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        bench["load_after"] = _load()
        rep = write_report(run_dirs, args.out)
        (args.out / "bench.json").write_text(json.dumps(bench, indent=2, default=str) + "\n")
    if run_dirs:
        print(render_markdown(rep).split("\n## ")[0])
        print(f"report: {args.out}")


if __name__ == "__main__":
    main()
