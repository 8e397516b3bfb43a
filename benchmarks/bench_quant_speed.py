"""How fast llama.cpp runs the embedded 0.5B at the quantisations `kbrouter train export` can
write: prompt evaluation and greedy generation, tokens per second, on this machine's CPU.

The packaged model is Q4_K_M; the other types are requantised from it with llama.cpp's own
quantiser (``allow_requantize``). A requantised file has the speed of its type but not the
quality of an export from full-precision weights, so this benchmark measures speed only: which
``--quant`` makes route calls cheaper. Run it alone (no other model job on the cores).

    .venv/bin/python benchmarks/bench_quant_speed.py            # q4_k_m vs q4_0
    .venv/bin/python benchmarks/bench_quant_speed.py --types q4_k_m,q4_0,q8_0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FTYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def _requantise(src: Path, dst: Path, quant: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[quant])
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc}) for {quant}")


def _measure(path: Path, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=2048, n_threads=threads, verbose=False, seed=0)
    text = "Route each question to the knowledge base that answers it. " * 64
    tokens = llm.tokenize(text.encode())[:prompt_tokens]
    prompt_s, gen_s = [], []
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(tokens)
        prompt_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(gen_tokens):  # greedy, one token at a time as in a route call
            llm.eval([llm.sample(temp=0.0)])
        gen_s.append(time.perf_counter() - t)
    p, g = statistics.median(prompt_s), statistics.median(gen_s)
    return {
        "file_bytes": path.stat().st_size,
        "prompt_tokens": len(tokens),
        "prompt_seconds": round(p, 4),
        "prompt_tokens_per_second": round(len(tokens) / p, 1),
        "generated_tokens": gen_tokens,
        "generation_seconds": round(g, 4),
        "generation_tokens_per_second": round(gen_tokens / g, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--types", default="q4_k_m,q4_0", help="q4_k_m (packaged), q4_0, q8_0")
    ap.add_argument("--prompt-tokens", type=int, default=220, help="the compact route prompt")
    ap.add_argument("--gen-tokens", type=int, default=40, help="a trained router's reply")
    ap.add_argument("--repeats", type=int, default=3, help="median of this many")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "quant_speed")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import llama_cpp

    from kbrouter.files import atomic_write_text
    from kbrouter.models.gguf import resolve_gguf

    packaged = resolve_gguf(None)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in [t.strip() for t in args.types.split(",") if t.strip()]:
            if quant == "q4_k_m":
                path = packaged
            elif quant in FTYPES:
                path = Path(tmp) / f"requantised-{quant}.gguf"
                _requantise(packaged, path, quant)
            else:
                raise SystemExit(f"unknown type {quant!r}: q4_k_m, {', '.join(FTYPES)}")
            results[quant] = _measure(
                path, args.prompt_tokens, args.gen_tokens, args.repeats, args.threads
            )
            print(quant, results[quant], flush=True)
    base = results.get("q4_k_m")
    if base:
        for r in results.values():
            r["prompt_speedup_vs_q4_k_m"] = round(
                r["prompt_tokens_per_second"] / base["prompt_tokens_per_second"], 2
            )
            r["generation_speedup_vs_q4_k_m"] = round(
                r["generation_tokens_per_second"] / base["generation_tokens_per_second"], 2
            )
    record = {
        "model": packaged.name,
        "llama_cpp_python": llama_cpp.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_average_after": os.getloadavg(),
        "types": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "quant_speed.json", json.dumps(record, indent=2) + "\n")
    lines = [
        "# Embedded 0.5B by quantisation (llama.cpp, speed only)",
        "",
        f"`{packaged.name}` (packaged, Q4_K_M) and types requantised from it; llama-cpp-python "
        f"{llama_cpp.__version__}, {args.threads} threads, median of {args.repeats}. "
        "Requantised files have their type's speed, not an export's quality.",
        "",
        "| type | MB | prompt tok/s | generation tok/s | prompt × | generation × |",
        "|---|---|---|---|---|---|",
    ]
    for quant, r in results.items():
        lines.append(
            f"| {quant} | {r['file_bytes'] / 2**20:.0f} | {r['prompt_tokens_per_second']} "
            f"| {r['generation_tokens_per_second']} | {r.get('prompt_speedup_vs_q4_k_m', '–')} "
            f"| {r.get('generation_speedup_vs_q4_k_m', '–')} |"
        )
    atomic_write_text(args.out / "quant_speed.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
