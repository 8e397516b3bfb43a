"""A trained LLM router through the embedded engine: gold-path SFT of the default 0.5B, exported
to GGUF, measured end to end against the prompted 0.5B on the same questions.

Stages (each resumable; re-run the same command to continue):

1. ``steps``: gold-path step samples (kbrouter.train.gold_paths) for the mkqa-mini dev questions
   OUTSIDE the validation subset; the validation subset is the routing benchmark's e2e subset
   (``--limit`` questions, seed 0, source-stratified), so the prompted rows measured there apply.
   wtq is capped at ``--wtq-cap`` training questions (seeded) so one source does not dominate.
2. ``sft``: LoRA SFT of Qwen2.5-Coder-0.5B-Instruct, loaded from its packaged GGUF, on the
   router and sub-answer steps with the compact router prompt (checkpoints every
   ``--save-steps`` updates; an interrupted run resumes from the newest).
3. ``export``: ``kbrouter.train.export.export_gguf`` (merge LoRA, llama.cpp's converter,
   ``--quant``), recording the prompt variant in the GGUF.
4. ``eval``: the R1-Router loop (min_retrieval_steps=1, grammar, top-2, budget 3: the routing
   benchmark's settings) with each ``--models`` entry through llama.cpp; routing-only figures
   come from the same trajectories (hop-1 KB against the gold first KB, the share of questions
   whose router never retrieved).

Writes ``summary.json`` and ``summary.md`` under ``--out``; runs go under ``--runs``.

    .venv/bin/python benchmarks/bench_trained_router.py --stages steps,sft,export,eval \\
        --reference prompted=benchmarks/results/routing/e2e.json#r1-router@min_retrieval_steps=1
    .venv/bin/python benchmarks/bench_trained_router.py --stages latency   # alone, quiet machine
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import time
from pathlib import Path

from kbrouter.files import atomic_write_text

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _se(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--stages", default="steps,sft,export,eval")
    ap.add_argument("--limit", type=int, default=60, help="validation questions (e2e subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wtq-cap", type=int, default=50)
    ap.add_argument("--kbs", type=Path, default=HERE / "mkqa_kbs.toml")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "trained-router")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "trained-router")
    ap.add_argument("--base", default="qwen2.5-coder-0.5b")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument(
        "--max-updates",
        type=int,
        default=-1,
        help="stop SFT after this many optimizer updates (a bounded run: the trainer's seeded "
        "shuffle decides which samples it sees); -1 = --epochs",
    )
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--save-steps", type=int, default=10)
    ap.add_argument("--max-length", type=int, default=768)
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument(
        "--models",
        default="sft=gguf:sft",
        help="name=spec pairs for eval; 'gguf:sft' is the exported SFT model, "
        "'llama-cpp' the prompted default",
    )
    ap.add_argument("--latency-questions", type=int, default=20)
    ap.add_argument(
        "--routing-only",
        action="append",
        default=[],
        help="name=DIR: a routing-only report (kbrouter eval-routing / bench_routing) of the "
        "same validation questions, merged into the model's row by the 'routing' stage",
    )
    ap.add_argument(
        "--reference",
        action="append",
        default=[],
        help="name=FILE#METHOD: a committed row measured with the same settings on the same "
        "subset, e.g. "
        "prompted=benchmarks/results/routing/e2e.json#r1-router@min_retrieval_steps=1",
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    args.runs.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    from kbrouter.eval.datasets import load_dataset, select_examples
    from kbrouter.kb.registry import KBRegistry

    registry = KBRegistry.from_config(args.kbs)
    registry.build(progress=False)
    ds = load_dataset("mkqa-mini")
    val = select_examples(ds.examples, args.limit, seed=args.seed, stratify=True)
    val_ids = {e.id for e in val}
    train = [e for e in ds.examples if e.id not in val_ids]
    rng = random.Random(args.seed)
    wtq = [e for e in train if e.source == "wtq"]
    rng.shuffle(wtq)
    keep_wtq = {e.id for e in wtq[: args.wtq_cap]}
    train = [e for e in train if e.source != "wtq" or e.id in keep_wtq]

    steps_path = args.runs / "gold_steps.jsonl"
    steps_info = args.runs / "gold_steps.json"
    if "steps" in stages and not steps_path.is_file():
        from kbrouter.train.gold_paths import GoldPathBuilder
        from kbrouter.train.steps import write_steps

        t0 = time.perf_counter()
        report = GoldPathBuilder(registry, top_k=2, router_prompt="compact").build(train)
        write_steps(report.samples, steps_path)
        steps_info.write_text(
            json.dumps(
                {
                    "train_questions": len(train),
                    "kept": report.kept,
                    "dropped": dict(report.dropped),
                    "samples": report.counts(),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "validation_ids": sorted(val_ids),
                },
                indent=2,
            )
        )
        print(f"gold paths: kept {report.kept}/{len(train)}, {report.counts()}")

    sft_dir = args.runs / "sft"
    if "sft" in stages and not (sft_dir / "final" / "kbrouter_train.json").is_file():
        from kbrouter.train.config import LoRAConfig, SFTConfig
        from kbrouter.train.sft import train_sft
        from kbrouter.train.steps import read_steps

        samples = read_steps(steps_path)
        config = SFTConfig(
            model=args.base,
            output_dir=sft_dir,
            learning_rate=args.lr,
            num_train_epochs=args.epochs,
            max_steps=args.max_updates,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accum,
            lr_scheduler_type="cosine",
            warmup_steps=5,
            step_kinds=["ret", "sub_answer"],
            max_length=args.max_length,
            save_steps=args.save_steps,
            logging_steps=5,
            seed=args.seed,
            use_cpu=True,
            lora=LoRAConfig(
                enabled=True,
                r=args.lora_r,
                alpha=2 * args.lora_r,
                dropout=0.0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                merge_on_save=False,
            ),
            trl_overrides={"save_total_limit": 2},
        )
        result = train_sft(samples, config, progress=True, use_teacher_response=False)
        print(f"SFT: {result.steps} updates on {result.samples} samples in {result.seconds:.0f} s")

    gguf_path = args.runs / "router-sft.gguf"
    if "export" in stages and not gguf_path.is_file():
        from kbrouter.train.export import export_gguf

        t0 = time.perf_counter()
        export_gguf(sft_dir / "final", gguf_path, quant=args.quant)  # variant from the run
        print(f"export: {gguf_path} in {time.perf_counter() - t0:.0f} s")

    if "eval" in stages:
        _evaluate(args, registry, ds, val, gguf_path)
    if "latency" in stages:
        _latency(args, registry, val, gguf_path)
    if "routing" in stages:
        _merge_routing_only(args)


def _merge_routing_only(args) -> None:  # noqa: ANN001
    """Teacher-forced routing-only figures (hop-1 KB accuracy, the share of hop-1 states the
    router answered ``none`` although the question needs retrieval, abstain recall) into the
    summary rows, from ``--routing-only name=DIR`` reports."""
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"models": {}}
    for pair in args.routing_only:
        name, _, folder = pair.partition("=")
        folder = Path(folder)
        rep = json.loads((folder / "summary.json").read_text())
        missed = [
            json.loads(line)
            for line in (folder / "misrouted.jsonl").read_text().splitlines()
            if line.strip()
        ]
        hop1_none = sum(
            1 for m in missed if m["step"] == 0 and m["predicted"] == "none" and m["gold"] != "none"
        )
        row = summary["models"].setdefault(name, {})
        row["hop1_accuracy"] = rep["hop1_accuracy"]
        row["routing_only"] = {
            "what": "teacher-forced route calls along the gold path (kbrouter.eval.routing_eval)",
            "report": str(folder.resolve().relative_to(REPO)),
            "router": rep.get("router"),
            "states": rep["n"],
            "questions": rep["questions"],
            "hop1_accuracy": rep["hop1_accuracy"],
            "accuracy": rep["accuracy"],
            "abstain_recall": rep["abstain_recall"],
            "ece": rep["ece"],
            "hop1_no_retrieval_rate": hop1_none / rep["hop1_n"] if rep.get("hop1_n") else None,
            "route_seconds_mean": rep.get("route_seconds_mean"),
        }
    # route_seconds: one route call alone (the latency stage); the e2e mean ran two questions
    # at a time and is kept as route_seconds_e2e
    lat = summary.get("route_latency") or {}
    for name, case in (("prompted", "prompted-few-shot"), ("sft", "sft-compact")):
        row = summary["models"].get(name)
        if row is not None and isinstance(lat.get(case), dict):
            if row.get("route_seconds") is not None and "route_seconds_e2e" not in row:
                row["route_seconds_e2e"] = row["route_seconds"]
            row["route_seconds"] = lat[case]["mean_seconds_after_first"]
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    if "benchmark" in summary:
        _write_md(args.out / "summary.md", summary)


def _latency(args, registry, val, gguf_path: Path) -> None:  # noqa: ANN001
    """Seconds of one first-step route call (the engine's grammar, greedy, prefix cache on as
    in the engine) for: the prompted model with the few-shot prompt and with the compact
    prompt, and the SFT model with the compact prompt it was trained on; run alone."""
    import asyncio

    from kbrouter.models.llama_cpp import LlamaCppModel
    from kbrouter.policies.prompts import PromptBuilder
    from kbrouter.types import SamplingParams

    questions = [e.question for e in val][: args.latency_questions]
    cases = [
        ("prompted-few-shot", None, "full"),
        ("prompted-compact", None, "compact"),
        ("sft-compact", gguf_path, "compact"),
    ]
    out: dict[str, dict] = {}
    for name, path, variant in cases:
        model = LlamaCppModel(path)
        builder = PromptBuilder(registry.infos, supports_images=False, router_prompt=variant)
        params = SamplingParams(
            temperature=0.0, max_tokens=256, grammar=builder.route_grammar(allow_stop=False)
        )

        async def run(model=model, builder=builder, params=params) -> list[tuple]:  # noqa: ANN001
            res = []
            for q in questions:
                msgs = builder.route_messages(q, [])
                t = time.perf_counter()
                r = await model.chat(msgs, params)
                res.append((time.perf_counter() - t, r.prompt_tokens, r.completion_tokens))
            await model.aclose()
            return res

        model.load()
        res = asyncio.run(run())
        secs = [r[0] for r in res]
        out[name] = {
            "calls": len(res),
            "mean_seconds": sum(secs) / len(secs),
            "mean_seconds_after_first": sum(secs[1:]) / max(1, len(secs) - 1),
            "first_call_seconds": secs[0],
            "mean_prompt_tokens": sum(r[1] for r in res) / len(res),
            "mean_completion_tokens": sum(r[2] for r in res) / len(res),
        }
        print(name, out[name], flush=True)
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"models": {}}
    summary["route_latency"] = {
        "what": "one first-step route call per question (route grammar without the stop "
        "branch, greedy, llama.cpp prefix cache on as in the engine), questions run one after "
        "another on a quiet machine",
        "questions": len(questions),
        "commit": _commit(),
        **out,
    }
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    if "benchmark" in summary:
        _write_md(args.out / "summary.md", summary)


def _evaluate(args, registry, ds, val, gguf_path: Path) -> None:  # noqa: ANN001
    from kbrouter.engine.engine import EngineConfig
    from kbrouter.eval.attribution import summarize_attribution
    from kbrouter.eval.harness import load_results, run_eval
    from kbrouter.models.registry import load_model

    ids = {e.id for e in val}
    gold_evidence = {e.id: e.gold_evidence for e in val if e.gold_evidence}
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"models": {}}
    summary.update(
        {
            "benchmark": "mkqa-mini dev: the routing e2e subset (validation; never trained on)",
            "questions": len(val),
            "seed": args.seed,
            "settings": "r1-router, min_retrieval_steps=1, route grammar, top_k=2, "
            "max_steps=3, greedy",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        }
    )
    if (args.runs / "gold_steps.json").is_file():
        info = json.loads((args.runs / "gold_steps.json").read_text())
        info.pop("validation_ids", None)
        summary["training_data"] = info
    run_info = args.runs / "sft" / "final" / "kbrouter_train.json"
    if run_info.is_file():  # what the SFT run was: updates, samples, seconds, settings
        info = json.loads(run_info.read_text())
        cfg = info.get("config", {})
        summary["sft"] = {
            "result": info.get("result"),
            "settings": {
                k: cfg.get(k)
                for k in (
                    "model",
                    "learning_rate",
                    "max_steps",
                    "num_train_epochs",
                    "per_device_train_batch_size",
                    "gradient_accumulation_steps",
                    "max_length",
                    "step_kinds",
                    "lora",
                    "seed",
                )
            },
        }
    for ref in args.reference:  # name=FILE#METHOD: a committed row of the routing benchmark
        name, _, where = ref.partition("=")
        file, _, method = where.partition("#")
        row = json.loads(Path(file).read_text())["methods"][method]
        summary["models"][name] = {
            "model": "llama-cpp (prompted default, few-shot router prompt)",
            "source": f"{Path(file).resolve().relative_to(REPO)}#{method}",
            **{k: row.get(k) for k in ROW_KEYS},
        }
    # the routing benchmark's e2e engine settings, so its rows on this subset compare directly
    engine = EngineConfig(max_steps=3, top_k=2, concurrency=2)
    for pair in [p.strip() for p in args.models.split(",") if p.strip()]:
        name, _, spec = pair.partition("=")
        spec = f"llama-cpp:{gguf_path}" if spec == "gguf:sft" else spec
        run_dir = args.runs / f"eval-{name}"
        model = load_model(spec)
        t0 = time.perf_counter()
        result = run_eval(
            "mkqa-mini",
            "r1-router",
            engine,
            spec,
            run_dir,
            args.limit,
            args.seed,
            True,
            kbs=args.kbs,
            model=model,
            registry=registry,
            keep_messages=False,
            method_options={"min_retrieval_steps": 1},
        )
        recs = [r for r in load_results(run_dir) if r["id"] in ids]
        routing = result["routing"]
        blame = summarize_attribution(recs, gold_evidence)
        f1 = [float(r["scores"]["f1_recall"]) for r in recs]
        route_s = [
            float(c.get("seconds") or 0.0)
            for r in recs
            for s in r["trajectory"]["steps"]
            for c in s.get("route_calls", [])
        ]
        summary["models"][name] = {
            "model": spec,
            "model_identity": model.identity(),
            "f1_recall": result["f1_recall"],
            "f1_recall_se": 100 * (_se(f1) or 0.0),
            "questions": result["questions"],
            "by_source": result["by_source"],
            "kb_accuracy_lenient": routing.get("kb_accuracy_lenient"),
            "kb_accuracy_by_hop_lenient": routing.get("kb_accuracy_by_hop_lenient"),
            "retrievals_per_question": routing.get("retrieval_calls_per_question"),
            "model_calls_per_question": routing.get("model_calls_per_question"),
            "seconds_per_question": routing.get("seconds_per_question"),
            "answered_without_retrieving": routing.get("answered_without_retrieving"),
            "attribution": {
                "shares": blame.get("shares"),
                "by_source": {k: v["shares"] for k, v in blame.get("by_source", {}).items()},
            },
            "route_seconds": sum(route_s) / len(route_s) if route_s else None,
            "route_calls": len(route_s),
            "commit": _commit(),
            "run": str(run_dir.relative_to(REPO) if REPO in run_dir.parents else run_dir),
            "wall_seconds_this_run": round(time.perf_counter() - t0, 1),
        }
        atomic_write_text(summary_path, json.dumps(summary, indent=2))
        _write_md(args.out / "summary.md", summary)
        print(name, summary["models"][name]["f1_recall"], flush=True)
        model_close = getattr(model, "aclose", None)
        if model_close is not None:
            import asyncio

            asyncio.run(model_close())
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    _write_md(args.out / "summary.md", summary)


ROW_KEYS = (
    "f1_recall",
    "f1_recall_se",
    "questions",
    "by_source",
    "kb_accuracy_lenient",
    "retrievals_per_question",
    "model_calls_per_question",
    "seconds_per_question",
    "answered_without_retrieving",
    "attribution",
    "commit",
)


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _write_md(path: Path, summary: dict) -> None:
    stages = ("correct", "routing", "retrieval", "reading", "early_stop")
    lines = [
        f"# Trained router vs prompted: {summary['benchmark']}",
        "",
        f"n = {summary['questions']} questions (seed {summary['seed']}, source-stratified); "
        f"{summary['settings']}; {summary['machine']}. F1-Recall with its standard error; KB acc "
        "= hop-level share of gold hops whose KB was searched (lenient); no-retrieval = share of "
        "questions needing retrieval answered without any; first failed stage in % of "
        "questions (kbrouter.eval.attribution); route s = mean seconds of one route call made "
        "alone (the latency stage; the e2e mean, two questions at a time, is route_seconds_e2e).",
        "",
        "| model | F1-Recall | KB acc | no-retrieval | retrievals/q | model calls/q | "
        + " | ".join(stages)
        + " | route s | s/q | commit |",
        "|---|---|---|---|---|---|" + "---|" * len(stages) + "---|---|---|",
    ]
    for name, m in summary["models"].items():
        if "f1_recall" not in m:
            continue
        sh = (m.get("attribution") or {}).get("shares") or {}
        lines.append(
            f"| {name} | {m['f1_recall']:.1f} ± {m['f1_recall_se']:.1f} | "
            f"{_fmt(m.get('kb_accuracy_lenient'), '.2f')} | "
            f"{_fmt(m.get('answered_without_retrieving'), '.2f')} | "
            f"{_fmt(m.get('retrievals_per_question'), '.2f')} | "
            f"{_fmt(m.get('model_calls_per_question'), '.2f')} | "
            + " | ".join(f"{100 * sh.get(s, 0.0):.0f}" for s in stages)
            + f" | {_fmt(m.get('route_seconds'), '.2f')} | "
            f"{_fmt(m.get('seconds_per_question'), '.1f')} | {str(m['commit'])[:7]} |"
        )
    routed = {n: m["routing_only"] for n, m in summary["models"].items() if "routing_only" in m}
    if routed:
        lines += [
            "",
            "Routing-only (teacher-forced route calls along the gold path of the same questions; "
            "no-retrieval = share of hop-1 states answered `none` although the question needs "
            "retrieval):",
            "",
            "| model | states | hop-1 KB acc | no-retrieval at hop 1 | accuracy | abstain recall "
            "| ECE | route s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in routed.items():
            lines.append(
                f"| {name} | {r['states']} | {r['hop1_accuracy']:.3f} | "
                f"{_fmt(r.get('hop1_no_retrieval_rate'), '.3f')} | {r['accuracy']:.3f} | "
                f"{_fmt(r.get('abstain_recall'), '.3f')} | {_fmt(r.get('ece'), '.3f')} | "
                f"{_fmt(r.get('route_seconds_mean'), '.2f')} |"
            )
    data = summary.get("training_data")
    if data:
        lines += [
            "",
            f"Training data (gold paths): {data['kept']} of {data['train_questions']} training "
            f"questions kept ({data['dropped']}); step samples {data['samples']}.",
        ]
    lat = summary.get("route_latency")
    if lat:
        lines += ["", f"Route-call latency ({lat['what']}; {lat['questions']} questions):", ""]
        lines += ["| case | mean s | prompt tokens | completion tokens |", "|---|---|---|---|"]
        for k, v in lat.items():
            if isinstance(v, dict):
                lines.append(
                    f"| {k} | {v['mean_seconds_after_first']:.2f} | "
                    f"{v['mean_prompt_tokens']:.0f} | {v['mean_completion_tokens']:.0f} |"
                )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
