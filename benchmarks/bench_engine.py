"""Engine benchmarks -> benchmarks/results/engine.json + engine.md.

1. ``overhead``: engine + policy time per step EXCLUDING model and retrieval time (scripted
   zero-latency model, in-memory instant KB), with and without the replay cache. Target < 1 ms.
2. ``concurrency``: questions/s against the fake OpenAI-compatible server
   (``tests/models/chat_server.py``, fixed 200 ms per call) at concurrency 1, 8, 32, 64.
   Target: speed-up >= 0.8 x N up to 32.
3. ``embedded``: the default embedded llama.cpp model on the demo KBs (dense + image encoders)
   and demo/questions.jsonl: seconds per question, tokens/s, peak memory.

Each part updates engine.json (parts not run keep their previous result) and rewrites engine.md.
``uptime`` load is recorded with every part (the CPU is shared).

    .venv/bin/python benchmarks/bench_engine.py --part all
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEMO = REPO / "demo"


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def env_facts() -> dict[str, Any]:
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "uptime_before": uptime(),
        "loadavg_before": load_avg(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------- 1. overhead


def bench_overhead(n_questions: int = 300) -> dict[str, Any]:
    from kbrouter.engine.engine import Engine, EngineConfig
    from kbrouter.policies.r1router import R1RouterPolicy
    from kbrouter.testing import ScriptedChatModel, StaticKB, StaticKBRegistry
    from kbrouter.types import Evidence, Modality, Query

    timers = {"model": 0.0, "search": 0.0, "model_cpu": 0.0, "search_cpu": 0.0}

    class TimedModel(ScriptedChatModel):
        async def chat(self, messages, params=None):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return await super().chat(messages, params)
            finally:
                timers["model"] += time.perf_counter() - t0
                timers["model_cpu"] += time.thread_time() - c0

    def reply(messages):
        system, last = messages[0].text(), messages[-1].text()
        if "<ret>" in system:
            out = (
                "<think>done</think><sub-question>None</sub-question><ret>None</ret>"
                if "Answer 2:" in last
                else "<think>t</think><sub-question>capital of country</sub-question>"
                "<ret>text, tables</ret>"
            )
        else:
            out = "<think>t</think><answer>Canberra</answer>"
        return out

    class TimedKB(StaticKB):
        def search(self, queries: Sequence[Query], k: int | None = None):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return super().search(queries, k)
            finally:
                timers["search"] += time.perf_counter() - t0
                timers["search_cpu"] += time.thread_time() - c0

    ev = [
        Evidence(kb="text", id=f"p{i}", score=0.0, text=f"capital {i} of country {i} is city {i}")
        for i in range(20)
    ]
    kbs = StaticKBRegistry(
        [
            TimedKB("text", ev),
            TimedKB(
                "tables",
                [e.model_copy(update={"kb": "tables"}) for e in ev],
                modality=Modality.TABLE,
            ),
        ]
    )
    questions = [f"What is the capital of country {i}?" for i in range(n_questions)]
    out: dict[str, Any] = {"questions": n_questions}
    for label, cache in (("no_cache", False), ("with_replay_cache", True)):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = EngineConfig(cache_dir=Path(tmp) if cache else None)

            async def run_all(engine: Engine) -> list:
                return [await engine.answer(q) for q in questions]

            warm = Engine(TimedModel(reply), kbs, R1RouterPolicy(), cfg)
            asyncio.run(run_all(warm))  # warm-up; with the cache on it also fills the cache
            warm.close()
            engine = Engine(TimedModel(reply), kbs, R1RouterPolicy(), cfg)
            timers.update(dict.fromkeys(timers, 0.0))
            t0, c0 = time.perf_counter(), time.process_time()
            trajs = asyncio.run(run_all(engine))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            engine.close()
        steps = sum(len(t.steps) for t in trajs)
        calls = sum(len(t.model_calls()) for t in trajs)
        overhead = wall - timers["model"] - timers["search"]
        overhead_cpu = cpu - timers["model_cpu"] - timers["search_cpu"]
        out[label] = {
            "wall_s": round(wall, 4),
            "steps": steps,
            "model_calls": calls,
            "retrievals": sum(len(t.retrievals()) for t in trajs),
            "model_s": round(timers["model"], 4),
            "search_s": round(timers["search"], 4),
            "overhead_ms_per_step": round(1000 * overhead / steps, 4),
            "overhead_ms_per_question": round(1000 * overhead / n_questions, 4),
            "overhead_cpu_ms_per_step": round(1000 * overhead_cpu / steps, 4),
            "note": "second run: every call replayed from the sqlite cache" if cache else "",
        }
    out["loadavg_after"] = load_avg()
    return out


# --------------------------------------------------------------------------- 2. concurrency


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_concurrency(levels: Sequence[int] = (1, 8, 32, 64), latency: float = 0.2) -> dict:
    from kbrouter.engine.engine import Engine, EngineConfig
    from kbrouter.models.registry import load_model
    from kbrouter.policies.r1router import R1RouterPolicy
    from kbrouter.testing import StaticKB, StaticKBRegistry

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests/models/chat_server.py"),
            "--port",
            str(port),
            "--latency",
            str(latency),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("fake chat server did not start") from None
                time.sleep(0.1)
        kbs = StaticKBRegistry([StaticKB("text"), StaticKB("tables")])
        results: dict[str, Any] = {"latency_s": latency, "levels": {}}
        base_qps = None
        for n in levels:
            n_q = max(8, 2 * n)
            model = load_model(f"openai:fake@http://127.0.0.1:{port}/v1")
            engine = Engine(model, kbs, R1RouterPolicy(), EngineConfig(concurrency=n))
            questions = [f"Question number {i}?" for i in range(n_q)]

            async def go(engine=engine, model=model, questions=questions):
                try:
                    return await engine.answer_many(questions)
                finally:
                    await model.aclose()

            t0 = time.perf_counter()
            trajs = asyncio.run(go())
            wall = time.perf_counter() - t0
            calls = sum(len(t.model_calls()) for t in trajs)
            errors = sum(1 for t in trajs for c in t.model_calls() if c.error)
            qps = n_q / wall
            base_qps = base_qps or qps
            ideal_wall = calls * latency / n
            results["levels"][str(n)] = {
                "questions": n_q,
                "model_calls": calls,
                "call_errors": errors,
                "wall_s": round(wall, 3),
                "questions_per_s": round(qps, 3),
                "speedup_vs_1": round(qps / base_qps, 2),
                "efficiency_vs_ideal": round(ideal_wall / wall, 3),
            }
            print(f"concurrency {n}: {results['levels'][str(n)]}", flush=True)
        # The same runs with an in-process fake of the same latency (no HTTP): what the engine
        # alone achieves, separating engine limits from HTTP client/server CPU limits.
        from kbrouter.testing import ScriptedChatModel

        results["levels_inprocess"] = {}
        base_local = None
        for n in levels:
            n_q = max(8, 2 * n)
            fake = ScriptedChatModel(lambda m: "echo: not router format", latency=latency)
            engine = Engine(fake, kbs, R1RouterPolicy(), EngineConfig(concurrency=n))
            t0 = time.perf_counter()
            engine.answer_many_sync([f"Question number {i}?" for i in range(n_q)])
            wall = time.perf_counter() - t0
            qps = n_q / wall
            base_local = base_local or qps
            results["levels_inprocess"][str(n)] = {
                "questions": n_q,
                "wall_s": round(wall, 3),
                "questions_per_s": round(qps, 3),
                "speedup_vs_1": round(qps / base_local, 2),
                "max_in_flight": fake.max_in_flight,
            }
            print(f"in-process {n}: {results['levels_inprocess'][str(n)]}", flush=True)
        results["calls_per_question"] = "4 (fake server echoes: 3 router tries + final answer)"
        results["loadavg_after"] = load_avg()
        return results
    finally:
        server.terminate()
        server.wait(timeout=10)


# --------------------------------------------------------------------------- 3. embedded


def bench_embedded(
    limit: int | None = None, max_seconds: float = 1800.0, min_steps: int = 1
) -> dict[str, Any]:
    from kbrouter.engine.engine import Engine, EngineConfig
    from kbrouter.models.registry import load_model
    from kbrouter.policies.r1router import R1RouterPolicy
    from kbrouter.testing import demo_registry
    from kbrouter.types import Question

    rows = [json.loads(x) for x in (DEMO / "questions.jsonl").read_text().splitlines() if x]
    rows = rows[:limit] if limit else rows
    out: dict[str, Any] = {"questions_total": len(rows), "min_retrieval_steps": min_steps}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        kbs = demo_registry(Path(tmp), lexical_only=False)
        out["kb_build_s"] = round(time.perf_counter() - t0, 2)
        model = load_model("llama-cpp")
        t0 = time.perf_counter()
        model.load()
        out["model_load_s"] = round(time.perf_counter() - t0, 2)
        out["model"] = model.describe()
        engine = Engine(model, kbs, R1RouterPolicy(min_retrieval_steps=min_steps), EngineConfig())
        per_q = []
        started = time.perf_counter()
        for row in rows:
            if time.perf_counter() - started > max_seconds:
                out["stopped_early"] = f"time cap {max_seconds:.0f}s reached"
                break
            image = DEMO / row["image"] if row.get("image") else None
            traj = engine.answer_sync(Question(text=row["question"], image=image, id=row["id"]))
            calls = traj.model_calls()
            model_s = sum(c.seconds for c in calls)
            per_q.append(
                {
                    "id": row["id"],
                    "seconds": round(traj.seconds, 2),
                    "model_s": round(model_s, 2),
                    "retrieval_s": round(sum(r.seconds for r in traj.retrievals()), 3),
                    "model_calls": len(calls),
                    "steps": len(traj.steps),
                    "stop_reason": traj.stop_reason,
                    "prompt_tokens": traj.prompt_tokens,
                    "completion_tokens": traj.completion_tokens,
                    "answer": traj.answer,
                    "kbs": [kb for st in traj.steps if st.action for kb in st.action.kbs],
                    "notes": [n for st in traj.steps for n in st.notes],
                    "error": traj.error,
                    "gold": row.get("answers"),
                    "loadavg": load_avg(),
                }
            )
            print(f"embedded: {per_q[-1]}", flush=True)
        engine.close()
    out["per_question"] = per_q
    if per_q:
        n = len(per_q)
        comp = sum(q["completion_tokens"] for q in per_q)
        prompt = sum(q["prompt_tokens"] for q in per_q)
        model_s = sum(q["model_s"] for q in per_q)
        out["questions_run"] = n
        out["seconds_per_question"] = round(sum(q["seconds"] for q in per_q) / n, 2)
        out["model_calls_per_question"] = round(sum(q["model_calls"] for q in per_q) / n, 2)
        out["completion_tokens_per_s"] = round(comp / model_s, 2) if model_s else None
        out["total_tokens_per_s"] = round((comp + prompt) / model_s, 2) if model_s else None
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["loadavg_after"] = load_avg()
    return out


# --------------------------------------------------------------------------- report


def write_markdown(data: dict[str, Any]) -> str:
    lines = ["# Engine benchmarks", "", "Generated by `benchmarks/bench_engine.py`.", ""]
    ov = data.get("overhead")
    if ov:
        lines += [
            "## 1. Engine overhead per step (model and retrieval time excluded)",
            "",
            f"Scripted zero-latency model, in-memory KB, {ov['questions']} questions "
            "sequentially, 3 steps each (2 hops querying 2 KBs + stop). Target < 1 ms/step. "
            f"Load: `{ov['env']['uptime_before']}`.",
            "",
            "Wall = elapsed time minus model and search time; CPU = process CPU time minus the "
            "model's and the searches' thread CPU time (less sensitive to other jobs' load).",
            "",
            "| setting | steps | overhead wall ms/step | overhead CPU ms/step | "
            "wall ms/question | wall s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label in ("no_cache", "with_replay_cache"):
            r = ov[label]
            lines.append(
                f"| {label} | {r['steps']} | {r['overhead_ms_per_step']} | "
                f"{r.get('overhead_cpu_ms_per_step')} | {r['overhead_ms_per_question']} | "
                f"{r['wall_s']} |"
            )
        lines.append("")
    cc = data.get("concurrency")
    if cc:
        lines += [
            "## 2. Concurrency against the fake OpenAI-compatible server",
            "",
            f"{cc['latency_s'] * 1000:.0f} ms per call; {cc['calls_per_question']}. "
            f"Target: speed-up >= 0.8 x N up to N = 32. Load: `{cc['env']['uptime_before']}`.",
            "",
            "| concurrency | questions | wall s | questions/s | speed-up | 0.8 x N | "
            "efficiency vs ideal |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, r in cc["levels"].items():
            lines.append(
                f"| {n} | {r['questions']} | {r['wall_s']} | {r['questions_per_s']} | "
                f"{r['speedup_vs_1']} | {0.8 * int(n):.1f} | {r['efficiency_vs_ideal']} |"
            )
        lines.append("")
        local = cc.get("levels_inprocess")
        if local:
            lines += [
                "Same runs with an in-process fake model of the same latency (no HTTP client or "
                "server): the engine's own scaling.",
                "",
                "| concurrency | questions | wall s | questions/s | speed-up | max in flight |",
                "|---:|---:|---:|---:|---:|---:|",
            ]
            for n, r in local.items():
                lines.append(
                    f"| {n} | {r['questions']} | {r['wall_s']} | {r['questions_per_s']} | "
                    f"{r['speedup_vs_1']} | {r['max_in_flight']} |"
                )
            lines.append("")
    em = data.get("embedded")
    if em:
        lines += [
            "## 3. Embedded default model (llama.cpp, Qwen2.5-Coder-0.5B Q4_K_M) on the demo",
            "",
            f"{em.get('questions_run', 0)} of {em['questions_total']} demo questions, dense demo "
            f"KBs, R1-Router with min_retrieval_steps={em.get('min_retrieval_steps', 0)} (the "
            f"`kbrouter ask` default), greedy, grammar on; {em['env']['cpus']} cores shared "
            "with other jobs. "
            f"Load before: `{em['env']['uptime_before']}`; after: {em.get('loadavg_after')}.",
            "",
            f"- seconds per question: **{em.get('seconds_per_question')}** "
            f"({em.get('model_calls_per_question')} model calls/question)",
            f"- completion tokens/s: {em.get('completion_tokens_per_s')}; prompt+completion "
            f"tokens/s: {em.get('total_tokens_per_s')}",
            f"- peak RSS: {em.get('peak_rss_mb')} MB (model + encoders + indexes)",
            f"- model load {em.get('model_load_s')} s; KB build {em.get('kb_build_s')} s",
        ]
        if em.get("stopped_early"):
            lines.append(f"- stopped early: {em['stopped_early']}")
        lines += [
            "",
            "| question | s | model s | calls | steps | KBs | stop | tokens in/out | answer "
            "(gold) | load |",
            "|---|---:|---:|---:|---:|---|---|---:|---|---|",
        ]
        for q in em.get("per_question", []):
            lines.append(
                f"| {q['id']} | {q['seconds']} | {q['model_s']} | {q['model_calls']} | "
                f"{q['steps']} | {', '.join(q.get('kbs', []))} | {q['stop_reason']} | "
                f"{q['prompt_tokens']}/{q['completion_tokens']} | "
                f"{q['answer'][:60].replace('|', '/')} ({', '.join(q['gold'] or [])}) | "
                f"{q['loadavg'][0]} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["overhead", "concurrency", "embedded", "all"], default="all")
    ap.add_argument("--limit", type=int, default=None, help="embedded: first N demo questions")
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="embedded: time cap")
    ap.add_argument(
        "--min-steps", type=int, default=1, help="embedded: retrieval steps before a stop"
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "engine.json"
    parts = ["overhead", "concurrency", "embedded"] if args.part == "all" else [args.part]
    for part in parts:
        env = env_facts()
        if part == "overhead":
            result = bench_overhead()
        elif part == "concurrency":
            result = bench_concurrency()
        else:
            result = bench_embedded(args.limit, args.max_seconds, args.min_steps)
        result["env"] = env
        data = json.loads(path.read_text()) if path.exists() else {}  # other runs may have written
        data[part] = result
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        (RESULTS / "engine.md").write_text(write_markdown(data))
        print(f"{part}: written to {path}", flush=True)


if __name__ == "__main__":
    main()
