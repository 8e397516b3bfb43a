"""Step-GRPO peak memory on SmolLM2-135M -> benchmarks/results/grpo_memory.json + .md.

The training benchmark (``bench_train.py``) measured a 23.5 GB peak RSS for Step-GRPO on a 135M
model at prompts up to 1150 tokens. This measures where it comes from: the same Step-GRPO
configuration (paper preset, G=4, 2 prompts per update, completions up to 64 tokens) on the same
router steps (released validation steps, prompts <= ``--max-prompt-tokens``), with and without
gradient checkpointing, each variant in a fresh process so one does not inflate the other's RSS.

    .venv/bin/python benchmarks/bench_grpo_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (  # noqa: E402
    RESULTS,
    STEPS_FILE,
    PeakRSS,
    paper_rewarder,
    prompt_tokens,
    uptime,
)


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from kbrouter.train.config import StepGRPOConfig
    from kbrouter.train.modeling import load_causal_lm, load_tokenizer
    from kbrouter.train.records import select_kinds
    from kbrouter.train.step_grpo import train_step_grpo
    from kbrouter.train.steps import read_steps

    tok = load_tokenizer("smollm2-135m")
    steps = [(prompt_tokens(tok, s), s) for s in select_kinds(read_steps(STEPS_FILE), ["ret"])]
    # the longest prompts that fit: the case that set the peak in bench_train
    steps = sorted((x for x in steps if x[0] <= args.max_prompt_tokens), key=lambda x: -x[0])
    chosen = steps[: args.prompts * args.steps]
    train = [s for _, s in chosen]
    rewarder = paper_rewarder()
    model = load_causal_lm("smollm2-135m")
    cfg = StepGRPOConfig.paper_preset(
        "smollm2-135m",
        Path(tempfile.mkdtemp(prefix="bench-grpo-mem-")),
        num_generations=args.generations,
        per_device_train_batch_size=args.generations * args.prompts,
        max_steps=args.steps,
        max_completion_length=args.max_new_tokens,
        learning_rate=1e-5,
        logging_steps=1,
        step_kinds=["ret"],
        gradient_checkpointing=args.gradient_checkpointing,
        seed=0,
    )
    with PeakRSS() as mem:
        res = train_step_grpo(train, cfg, rewarder=rewarder, model=model, tokenizer=tok)
    return {
        "gradient_checkpointing": args.gradient_checkpointing,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "updates": res.steps,
        "prompt_tokens": [n for n, _ in chosen],
        "seconds_per_update": round(res.seconds / max(res.steps, 1), 1),
        "peak_rss_mb": mem.peak_mb,
        "uptime": uptime(),
    }


def render(r: dict[str, Any]) -> str:
    lines = [
        "# Step-GRPO peak memory (SmolLM2-135M, float32, CPU)",
        "",
        f"From `benchmarks/bench_grpo_memory.py`. {r['updates']} updates of {r['prompts']} "
        f"prompts x G={r['generations']} on the longest released router steps with prompts <= "
        f"{r['max_prompt_tokens']} tokens, completions <= {r['max_new_tokens']} tokens; each "
        "variant in a fresh process. Peak RSS is sampled every 0.2 s during training.",
        "",
        "| gradient checkpointing | attention | s / update | peak RSS (MB) |",
        "|---|---|---|---|",
    ]
    for v in r["variants"]:
        lines.append(
            f"| {v['gradient_checkpointing']} | {v['attn_implementation']} | "
            f"{v['seconds_per_update']} | {v['peak_rss_mb']} |"
        )
    lines += ["", f"Load at start: `{r['uptime_start']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="GRPO updates per variant")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per update")
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-prompt-tokens", type=int, default=1150)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument(
        "--gradient-checkpointing",
        type=int,
        choices=[0, 1],
        default=None,
        help="run one variant in this process and print its JSON (used internally)",
    )
    args = ap.parse_args()
    if args.gradient_checkpointing is not None:
        args.gradient_checkpointing = bool(args.gradient_checkpointing)
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    results: dict[str, Any] = {
        "model": "smollm2-135m (Q4_1 GGUF de-quantised to float32)",
        "steps_file": STEPS_FILE.name,
        "updates": args.steps,
        "prompts": args.prompts,
        "generations": args.generations,
        "max_prompt_tokens": args.max_prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "uptime_start": uptime(),
        "variants": [],
    }
    for gc in (0, 1):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--gradient-checkpointing", str(gc)]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        line = next(x for x in out.splitlines() if x.startswith("RESULT "))
        variant = json.loads(line[len("RESULT ") :])
        variant["wall_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(variant), flush=True)
        results["variants"].append(variant)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grpo_memory.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "grpo_memory.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
