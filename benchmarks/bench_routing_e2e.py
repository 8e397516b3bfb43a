"""End-to-end: does routing earn its keep? Every method on one fixed, seeded, source-stratified
mkqa-mini dev subset with the embedded model, the learned router trained on the dev questions
outside that subset (plus the released router steps).

Writes ``e2e.json`` (per method: ``f1_recall`` with its standard error, per source, KB accuracy,
retrievals, model calls and seconds per question, ``questions``, and the error attribution:
shares of the first failed stage, overall and per source) and ``e2e.md`` under ``--out``;
each method's resumable results directory goes under ``--runs`` (not committed). Re-run the same
command to resume; methods are run in the order given and the files are rewritten after each.
Methods already in ``e2e.json`` from a run on the same subset, model, engine settings and router
training data are kept (each entry records the commit it was measured at and, if routed, the
router's fitted thresholds), so the table can be filled in over
several sessions; a method named again is re-measured (resuming from its results directory).

    .venv/bin/python benchmarks/bench_routing_e2e.py --limit 60
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_METHODS = (
    "learned-router,all-kbs,direct,oracle-kb,random-kb@min_retrieval_steps=1,iterretgen,"
    "hybrid,r1-router@min_retrieval_steps=1"
)


def _se(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    return 100 * math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--model", default="llama-cpp")
    ap.add_argument("--kbs", type=Path, default=HERE / "mkqa_kbs.toml")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-routing-e2e")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "routing")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import sys

    sys.path.insert(0, str(HERE))
    from kbrouter.engine.engine import EngineConfig
    from kbrouter.eval.attribution import summarize_attribution
    from kbrouter.eval.datasets import load_dataset, select_examples
    from kbrouter.eval.harness import load_results, run_eval
    from kbrouter.kb.registry import KBRegistry
    from kbrouter.models.registry import load_model
    from kbrouter.routing.router import RouterConfig
    from kbrouter.train.router import train_router
    from run_mkqa_eval import _parse_method

    registry = KBRegistry.from_config(args.kbs)
    registry.build(progress=False)
    ds = load_dataset("mkqa-mini")
    subset = select_examples(ds.examples, args.limit, seed=args.seed, stratify=True)
    ids = {e.id for e in subset}
    gold_evidence = {e.id: e.gold_evidence for e in subset if e.gold_evidence}
    router_dir = args.runs / "router"
    if not (router_dir / "manifest.json").is_file():
        train_router(
            registry.infos,
            router_dir,
            step_files=[REPO.parent / "shared/data/r1router/grpo_dataset_valid_new.jsonl"],
            datasets=["mkqa-mini"],
            config=RouterConfig(seed=args.seed),
            exclude_ids=ids,
        )
    manifest = json.loads((router_dir / "manifest.json").read_text())
    model = load_model(args.model)
    engine = EngineConfig(max_steps=args.max_steps, top_k=args.top_k, concurrency=2)
    result = {
        "dataset": "mkqa-mini dev",
        "subset": {
            "limit": args.limit,
            "seed": args.seed,
            "stratified_by_source": True,
            "ids": sorted(ids),
        },
        "model": args.model,
        "model_info": model.describe(),
        "engine": engine.model_dump(mode="json"),
        "router": {
            "trained_on": manifest["data"],
            "thresholds": manifest["thresholds"],
            "heldout_metrics": manifest["metrics"],
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "methods": {},
    }
    result["methods"] = _previous_methods(args.out / "e2e.json", result)
    commit = _commit()
    for entry in [m.strip() for m in args.methods.split(",") if m.strip()]:
        method, options = _parse_method(entry)
        if method in ("learned-router", "hybrid"):
            options.setdefault("router", str(router_dir))
        out_dir = args.runs / entry.replace(":", "_").replace("@", "_").replace("=", "-")
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
        recs = [r for r in load_results(out_dir) if r["id"] in ids]
        scores = [r["scores"]["f1_recall"] for r in recs]
        routing = summary["routing"]
        blame = summarize_attribution(recs, gold_evidence)
        result["methods"][entry] = {
            "f1_recall": summary["f1_recall"],
            "f1_recall_se": _se(scores),
            "questions": summary["questions"],
            "by_source": summary["by_source"],
            "kb_accuracy_strict": routing.get("kb_accuracy_strict"),
            "kb_accuracy_lenient": routing.get("kb_accuracy_lenient"),
            "retrievals_per_question": routing.get("retrieval_calls_per_question"),
            "model_calls_per_question": routing.get("model_calls_per_question"),
            "seconds_per_question": routing.get("seconds_per_question"),
            "answered_without_retrieving": routing.get("answered_without_retrieving"),
            "attribution": {
                "shares": blame.get("shares"),
                "by_source": {k: v["shares"] for k, v in blame.get("by_source", {}).items()},
            },
            "upper_bound": method.startswith("oracle"),
            "commit": commit,
            "router_thresholds": manifest["thresholds"] if method in ROUTED else None,
            "wall_seconds_this_run": round(time.perf_counter() - t, 1),
        }
        print(entry, result["methods"][entry]["f1_recall"], flush=True)
        _write(args.out, result)
    registry.close()


ROUTED = ("learned-router", "hybrid")


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def _previous_methods(path: Path, result: dict) -> dict:
    """Methods measured earlier under the same conditions; anything else is dropped, loudly."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    same = ("dataset", "subset", "model", "engine")
    changed = [k for k in same if old.get(k) != result.get(k)]
    if old.get("model_info", {}).get("name") != result["model_info"].get("name"):
        changed.append("model_info.name")
    if changed:
        print(f"{path}: earlier results differ in {', '.join(changed)}; not kept", flush=True)
        return {}
    kept = dict(old.get("methods", {}))
    # A router retrained on the same data may differ in the last digits of its fitted
    # thresholds (floating point across machines); each routed row records its own thresholds.
    if old.get("router", {}).get("trained_on") != result["router"]["trained_on"]:
        for name in [n for n in kept if n.split("@")[0] in ROUTED]:
            print(f"{path}: router trained on other data; dropping earlier {name}", flush=True)
            del kept[name]
    return kept


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".e2e.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, out / "e2e.json")

    def f(x, d=1):
        return "–" if x is None else f"{x:.{d}f}"

    lines = [
        "# End to end on mkqa-mini dev (embedded model)",
        "",
        f"{result['subset']['limit']} questions, stratified by source, seed "
        f"{result['subset']['seed']}; model {result['model']}; top-{result['engine']['top_k']} "
        f"evidence per KB, budget {result['engine']['max_steps']} steps; greedy decoding.",
        "",
        "| method | F1-Recall ± SE | n | KB acc (strict) | retrievals/q | model calls/q | s/q |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in result["methods"].items():
        label = name + (" (upper bound)" if m["upper_bound"] else "")
        kb = m["kb_accuracy_strict"]
        lines.append(
            f"| {label} | {f(m['f1_recall'])} ± {f(m['f1_recall_se'])} | {m['questions']} | "
            f"{f(None if kb is None else 100 * kb)} | {f(m['retrievals_per_question'], 2)} | "
            f"{f(m['model_calls_per_question'], 2)} | {f(m['seconds_per_question'])} |"
        )
    stages = ("correct", "routing", "retrieval", "reading", "early_stop", "budget", "format")
    lines += [
        "",
        "First failed stage per question (% of questions; kbrouter.eval.attribution: correct = "
        "F1-Recall >= 0.5; routing = a gold hop's KB never searched; retrieval = gold KB "
        "searched, gold evidence not among the top-k shown; reading = gold evidence shown, "
        "answer wrong; early stop / budget = stopped / out of steps before the gold hops):",
        "",
        "| method | " + " | ".join(s.replace("_", " ") for s in stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    for name, m in result["methods"].items():
        sh = (m.get("attribution") or {}).get("shares")
        if not sh:
            continue
        lines.append(f"| {name} | " + " | ".join(f(100 * sh.get(s, 0.0), 0) for s in stages) + " |")
    (out / "e2e.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
