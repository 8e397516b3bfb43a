"""Speed of the embedded default chat model (llama.cpp, Qwen2.5-Coder-0.5B Q4_K_M) on this CPU.

Measures
- prompt processing tok/s (a ~600-token prompt, no prefix reuse, 1 output token);
- generation tok/s (a short prompt, a long greedy reply);
- router-step latency with a realistic ~600-token router system prompt and varying questions,
  for each prefix-reuse mode of :class:`kbrouter.models.llama_cpp.LlamaCppModel`
  (``off`` / ``consecutive`` / ``ram``), in two call patterns: ``route-only`` (route calls back
  to back) and ``alternating`` (route, sub-answer, route, ... as the loop really does, the two
  calls having different system prompts).

Writes ``benchmarks/results/llm.json`` and ``benchmarks/results/llm.md``. The CPU is shared with
other jobs: the load average before and after is recorded with the figures.

    .venv/bin/python benchmarks/bench_llm.py [--questions 4] [--route-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

from kbrouter.models.llama_cpp import LlamaCppModel
from kbrouter.types import ChatMessage, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"

ROUTER_SYSTEM = """You are a research assistant that answers a question step by step by querying \
knowledge bases. At each step you decide whether more information is needed. If it is, you \
write ONE atomic sub-question that can be answered with a single retrieval and choose the ONE \
knowledge base that is most likely to contain the answer. If enough is known, you stop.

Knowledge bases:
- text: Encyclopedia passages about people, places, organisations, history, science and \
culture. Use it for general, non-visual facts: who founded something, when an event happened, \
where a place is, what a word means.
- image: Photos of landmarks, animals, plants, flags, artworks and products, each with a caption \
or an entity description. It searches with the question's image. Use it when the sub-question is \
about what is shown in the image or about the visual appearance of something.
- table: Tables from encyclopedia articles: statistics, rankings, results, populations, dates, \
prices and other structured or numeric facts. Use it for numbers, comparisons and lists.

Rules:
1. The sub-question must not be decomposable further and must need exactly one retrieval.
2. The sub-question must be useful for answering the original question.
3. Never repeat a sub-question that was already answered.
4. When the history already contains everything needed, answer None for both tags.
5. Keep the reasoning short: one or two sentences.

Always reply in exactly this format:
<think>what is still missing and why</think>
<sub-question>one atomic question, or None</sub-question>
<ret>text, image or table, or None</ret>

Example 1 (text)
Question: In which year was the university attended by the author of "Dubliners" founded?
History: (none)
<think>I first need to know which university the author of Dubliners attended.</think>
<sub-question>Which university did James Joyce attend?</sub-question>
<ret>text</ret>

Example 2 (image)
Question: What is the maximum height of the tree species shown in the picture?
History: (none)
<think>I must identify the tree species in the image before looking up its height.</think>
<sub-question>What species of tree is shown in the image?</sub-question>
<ret>image</ret>

Example 3 (table)
Question: How many more inhabitants does the largest city of Norway have than Bergen?
History:
Sub-question 1: What is the largest city of Norway? Answer 1: Oslo
<think>I need the populations of Oslo and Bergen, which a population table lists.</think>
<sub-question>What are the populations of Oslo and Bergen?</sub-question>
<ret>table</ret>

Example 4 (stop)
Question: Who directed the film that won the Palme d'Or in 1994?
History:
Sub-question 1: Which film won the Palme d'Or in 1994? Answer 1: Pulp Fiction
Sub-question 2: Who directed Pulp Fiction? Answer 2: Quentin Tarantino
<think>The director is known: Quentin Tarantino.</think>
<sub-question>None</sub-question>
<ret>None</ret>"""

ANSWER_SYSTEM = """You answer a sub-question using only the retrieved evidence below. Think \
briefly, then give a short answer (a name, a number, a date or a short phrase). Reply as \
<think>...</think><answer>...</answer>."""

QUESTIONS = [
    "Which river flows through the capital of the country that hosted the 2016 Summer Olympics?",
    "What is the population of the city where the Eiffel Tower's designer was born?",
    "How tall is the building shown in the image, and in which year was it completed?",
    "Which team won the most titles in the league where Lionel Messi played in 2022?",
    "What language is spoken in the country whose flag has a red maple leaf?",
    "In which year did the composer of the opera Carmen die?",
]

EVIDENCE = (
    "[text] Rio de Janeiro is the second-most populous city in Brazil. The 2016 Summer Olympics "
    "were held in Rio de Janeiro. [text] Brasília is the federal capital of Brazil; it lies on "
    "Lake Paranoá. [table] City | Population\nRio de Janeiro | 6,747,815\nSão Paulo | 12,325,232"
)


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _route_messages(question: str) -> list[ChatMessage]:
    return [
        ChatMessage(role="system", content=ROUTER_SYSTEM),
        ChatMessage(role="user", content=f"Question: {question}\nHistory: (none)"),
    ]


def _answer_messages(question: str) -> list[ChatMessage]:
    return [
        ChatMessage(role="system", content=ANSWER_SYSTEM),
        ChatMessage(role="user", content=f"Evidence:\n{EVIDENCE}\n\nSub-question: {question}"),
    ]


async def _throughput(model: LlamaCppModel) -> dict:
    long_prompt = _route_messages(QUESTIONS[0])
    res = await model.chat(long_prompt, SamplingParams(max_tokens=1))
    prompt_tps = res.prompt_tokens / res.seconds
    gen_prompt = [
        ChatMessage(
            role="user",
            content="Write the numbers from 1 to 200 in words, separated by commas.",
        )
    ]
    gen = await model.chat(gen_prompt, SamplingParams(max_tokens=48))
    gen_seconds = gen.seconds - gen.prompt_tokens / prompt_tps
    return {
        "prompt_tokens": res.prompt_tokens,
        "prompt_seconds": round(res.seconds, 3),
        "prompt_tok_per_s": round(prompt_tps, 1),
        "gen_tokens": gen.completion_tokens,
        "gen_seconds": round(gen_seconds, 3),
        "gen_tok_per_s": round(gen.completion_tokens / gen_seconds, 1),
    }


async def _steps(mode: str, pattern: str, n: int, route_tokens: int, n_threads: int) -> dict:
    model = LlamaCppModel(prefix_cache=mode, n_threads=n_threads)
    model.load()
    params = SamplingParams(max_tokens=route_tokens)
    # Warm-up: the first call pays one-off costs (page faults, graph allocation).
    await model.chat(_answer_messages("warm up"), SamplingParams(max_tokens=1))
    latencies, prompt_tokens, completion_tokens = [], [], []
    for q in QUESTIONS[:n]:
        res = await model.chat(_route_messages(q), params)
        latencies.append(res.seconds)
        prompt_tokens.append(res.prompt_tokens)
        completion_tokens.append(res.completion_tokens)
        if pattern == "alternating":
            await model.chat(_answer_messages(q), SamplingParams(max_tokens=route_tokens))
    await model.aclose()
    # The first route call of every mode has nothing to reuse yet: report steady state too.
    steady = latencies[1:] or latencies
    return {
        "mode": mode,
        "pattern": pattern,
        "route_calls": len(latencies),
        "first_s": round(latencies[0], 3),
        "steady_mean_s": round(statistics.mean(steady), 3),
        "steady_median_s": round(statistics.median(steady), 3),
        "prompt_tokens_mean": round(statistics.mean(prompt_tokens), 1),
        "completion_tokens_mean": round(statistics.mean(completion_tokens), 1),
    }


def _rewrite_markdown(out: Path) -> None:
    """Regenerate llm.md from an existing llm.json (no measurement)."""
    (out / "llm.md").write_text(_markdown(json.loads((out / "llm.json").read_text())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=4, help="route calls per configuration")
    parser.add_argument("--route-tokens", type=int, default=48, help="max tokens per route reply")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown-only", action="store_true", help="rewrite llm.md from json")
    args = parser.parse_args()
    if args.markdown_only:
        _rewrite_markdown(args.out)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("bench_llm")

    load_before = _load()
    t0 = time.time()
    base = LlamaCppModel(prefix_cache="off", n_threads=args.threads)
    base.load()
    throughput = asyncio.run(_throughput(base))
    asyncio.run(base.aclose())
    log.info("throughput: %s", throughput)
    steps = []
    for pattern in ("route-only", "alternating"):
        for mode in ("off", "consecutive", "ram"):
            row = asyncio.run(
                _steps(mode, pattern, args.questions, args.route_tokens, args.threads)
            )
            log.info("%s", row)
            steps.append(row)

    import llama_cpp

    result = {
        "model": base.model_path.name,
        "llama_cpp_python": llama_cpp.__version__,
        "n_threads": args.threads,
        "n_ctx": base.config.n_ctx,
        "cpu": platform.processor() or platform.machine(),
        "load_avg_before": load_before,
        "load_avg_after": _load(),
        "wall_seconds": round(time.time() - t0, 1),
        "route_max_tokens": args.route_tokens,
        "throughput": throughput,
        "router_steps": steps,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llm.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "llm.md").write_text(_markdown(result))
    log.info("wrote %s", args.out / "llm.md")


def _markdown(r: dict) -> str:
    t = r["throughput"]
    lines = [
        "# Embedded LLM speed (llama.cpp)",
        "",
        f"Model `{r['model']}`, llama-cpp-python {r['llama_cpp_python']}, "
        f"{r['n_threads']} threads, n_ctx {r['n_ctx']}. Load average before/after: "
        f"{r['load_avg_before']} / {r['load_avg_after']} (shared CPU: figures are noisy).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| prompt processing | {t['prompt_tok_per_s']} tok/s ({t['prompt_tokens']} tokens) |",
        f"| generation | {t['gen_tok_per_s']} tok/s ({t['gen_tokens']} tokens) |",
        "",
        f"Router step (~{int(r['router_steps'][0]['prompt_tokens_mean'])}-token prompt, "
        f"up to {r['route_max_tokens']} output tokens, greedy), seconds per route call:",
        "",
        "| pattern | prefix reuse | first call | steady mean | steady median | completion tokens |",
        "|---|---|---|---|---|---|",
    ]
    for s in r["router_steps"]:
        lines.append(
            f"| {s['pattern']} | {s['mode']} | {s['first_s']} | {s['steady_mean_s']} | "
            f"{s['steady_median_s']} | {s['completion_tokens_mean']} |"
        )
    lines += [
        "",
        "`off`: full prompt evaluated every call. `consecutive`: llama.cpp reuses the KV cache "
        "of the previous call up to the longest common prefix (lost as soon as another prompt "
        "family, e.g. a sub-answer call, comes in between). `ram`: at each switch of prompt "
        "family the KV state is saved to a small in-memory LRU and the saved state sharing the "
        "longest prefix is restored, so the router prompt stays warm in the real alternating "
        "loop. The first call of every configuration has nothing to reuse.",
        "",
        "Threads: llama.cpp threads spin at per-layer barriers, so on a CPU shared with other "
        "busy processes 2 threads were ~6x slower than 1 for generation (24 tokens: 143-225 s "
        "vs 24-34 s at load ~15); this run used the thread count above.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
