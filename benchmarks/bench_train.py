"""Training benchmark -> benchmarks/results/train.json + train.md.

SmolLM2-135M-Instruct (the packaged Q4_1 GGUF, de-quantised to float32 by transformers) on the
released R1-Router validation steps (``grpo_dataset_valid_new.jsonl``), router (``ret``) steps
only, split by trajectory (seeded, stratified by source):

1. **prompt-only**: held-out routing accuracy / mean step reward of the untrained model;
2. **SFT**: a short SFT run on the training split (samples/s, peak RSS), then the same check;
3. **Step-GRPO**: a short Step-GRPO run (paper rewards: 0.5 MiniLM cosine + 0.5 routing)
   starting from the SFT checkpoint (samples/s = completions/s, peak RSS), then the same check.

Held-out checks complete every held-out router prompt greedily and score it with the step
reward. The CPU is shared with other jobs; ``uptime`` load is recorded.

    .venv/bin/python benchmarks/bench_train.py [--sft-steps 30] [--grpo-steps 6] [--heldout 24]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = Path(os.environ.get("KBROUTER_SHARED_DATA", REPO.parent / "shared" / "data"))
STEPS_FILE = DATA / "r1router" / "grpo_dataset_valid_new.jsonl"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak_mb`` after the block."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def check(model: Any, tok: Any, samples: list, rewarder: Any, max_new_tokens: int) -> dict:
    from kbrouter.train.evaluate import evaluate_steps

    t0 = time.perf_counter()
    res = evaluate_steps(model, tok, samples, rewarder, max_new_tokens=max_new_tokens, batch_size=4)
    return {
        "routing_accuracy": round(res.routing_accuracy or 0.0, 4),
        "mean_reward": round(res.mean_reward, 4),
        "format_rate": round(res.format_rate, 4),
        "seconds": round(time.perf_counter() - t0, 1),
        "example": res.examples[0][:300] if res.examples else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft-steps", type=int, default=8)
    ap.add_argument("--grpo-steps", type=int, default=3)
    ap.add_argument("--heldout", type=int, default=12, help="Held-out router steps checked.")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from transformers import AutoModelForCausalLM

    from kbrouter.train.config import SFTConfig, StepGRPOConfig
    from kbrouter.train.modeling import load_causal_lm, load_tokenizer
    from kbrouter.train.records import select_kinds
    from kbrouter.train.rewards import RewardConfig, StepRewarder
    from kbrouter.train.sft import train_sft
    from kbrouter.train.step_grpo import train_step_grpo
    from kbrouter.train.steps import read_steps, split_steps

    samples = read_steps(STEPS_FILE)
    train_all, val_all = split_steps(samples, val_fraction=0.2, seed=args.seed)
    train = select_kinds(train_all, ["ret"])
    heldout = select_kinds(val_all, ["ret"])[: args.heldout]
    rewarder = StepRewarder(RewardConfig.paper())
    _ = rewarder.encoder  # load MiniLM outside the timed sections
    results: dict[str, Any] = {
        "model": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF, de-quantised to float32)",
        "data": f"{STEPS_FILE.name}: ret steps, {len(train)} train / {len(heldout)} held-out "
        f"(trajectory split 0.8/0.2, seed {args.seed})",
        "torch_threads": torch.get_num_threads(),
        "uptime_start": uptime(),
        "phases": {},
    }
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    tok = load_tokenizer("smollm2-135m")
    t0 = time.perf_counter()
    base = load_causal_lm("smollm2-135m")
    results["load_gguf_seconds"] = round(time.perf_counter() - t0, 1)

    print("prompt-only check ...", flush=True)
    results["phases"]["prompt_only"] = {
        "check": check(base, tok, heldout, rewarder, args.max_new_tokens)
    }

    print("SFT ...", flush=True)
    sft_cfg = SFTConfig(
        model="smollm2-135m",
        output_dir=work / "sft",
        learning_rate=5e-5,
        max_steps=args.sft_steps,
        per_device_train_batch_size=1,
        logging_steps=1,
        max_length=1024,
        step_kinds=["ret"],
        seed=args.seed,
    )
    with PeakRSS() as mem:
        sft = train_sft(train, sft_cfg, model=base, tokenizer=tok)
    sft_samples = sft.steps * sft_cfg.per_device_train_batch_size
    sft_model = AutoModelForCausalLM.from_pretrained(sft.checkpoint)
    results["phases"]["sft"] = {
        "steps": sft.steps,
        "batch_size": sft_cfg.per_device_train_batch_size,
        "train_seconds": round(sft.seconds, 1),
        "samples_per_second": round(sft_samples / sft.seconds, 3),
        "peak_rss_mb": mem.peak_mb,
        "loss_first_last": [
            round(x, 4) for x in sft.metric_series("loss")[:1] + sft.metric_series("loss")[-1:]
        ],
        "uptime": uptime(),
        "check": check(sft_model, tok, heldout, rewarder, args.max_new_tokens),
    }
    del base

    print("Step-GRPO ...", flush=True)
    grpo_cfg = StepGRPOConfig.paper_preset(
        str(sft.checkpoint),
        work / "grpo",
        num_generations=2,
        per_device_train_batch_size=2,
        max_steps=args.grpo_steps,
        max_completion_length=args.max_new_tokens,
        learning_rate=1e-5,
        logging_steps=1,
        step_kinds=["ret"],
        seed=args.seed,
    )
    with PeakRSS() as mem:
        grpo = train_step_grpo(train, grpo_cfg, rewarder=rewarder, model=sft_model, tokenizer=tok)
    completions = grpo.steps * grpo_cfg.per_device_train_batch_size
    grpo_model = AutoModelForCausalLM.from_pretrained(grpo.checkpoint)
    rewards = grpo.metric_series("reward")
    results["phases"]["step_grpo"] = {
        "steps": grpo.steps,
        "group_size": grpo_cfg.num_generations,
        "completions_per_step": grpo_cfg.per_device_train_batch_size,
        "train_seconds": round(grpo.seconds, 1),
        "samples_per_second": round(completions / grpo.seconds, 3),
        "prompts_per_second": round(completions / grpo_cfg.num_generations / grpo.seconds, 3),
        "peak_rss_mb": mem.peak_mb,
        "train_reward_per_step": [round(r, 4) for r in rewards],
        "uptime": uptime(),
        "check": check(grpo_model, tok, heldout, rewarder, args.max_new_tokens),
    }
    results["uptime_end"] = uptime()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "train.md").write_text(render(results))
    print(render(results))


def render(r: dict[str, Any]) -> str:
    p = r["phases"]
    lines = [
        "# Training benchmark (SmolLM2-135M on CPU)",
        "",
        f"Model: {r['model']}. Data: {r['data']}. torch threads: {r['torch_threads']}. "
        f"GGUF load + de-quantisation: {r['load_gguf_seconds']} s.",
        f"Load at start: `{r['uptime_start']}`; at end: `{r['uptime_end']}` (shared CPU).",
        "",
        "## Throughput and memory",
        "",
        "| phase | updates | samples/s | peak RSS (MB) | wall s |",
        "|---|---:|---:|---:|---:|",
    ]
    if "sft" in p:
        s = p["sft"]
        lines.append(
            f"| SFT (batch {s['batch_size']}) | {s['steps']} | {s['samples_per_second']} | "
            f"{s['peak_rss_mb']} | {s['train_seconds']} |"
        )
    if "step_grpo" in p:
        g = p["step_grpo"]
        lines.append(
            f"| Step-GRPO (G={g['group_size']}, {g['completions_per_step']} completions/update) | "
            f"{g['steps']} | {g['samples_per_second']} completions/s "
            f"({g['prompts_per_second']} prompts/s) | {g['peak_rss_mb']} | {g['train_seconds']} |"
        )
    lines += [
        "",
        "## Held-out router steps (greedy)",
        "",
        "| model | routing accuracy | mean step reward | format rate |",
        "|---|---:|---:|---:|",
    ]
    for name, key in (("prompt-only", "prompt_only"), ("SFT", "sft"), ("Step-GRPO", "step_grpo")):
        if key in p:
            c = p[key]["check"]
            lines.append(
                f"| {name} | {c['routing_accuracy']} | {c['mean_reward']} | {c['format_rate']} |"
            )
    lines += [
        "",
        "Step reward = paper preset: 0.5 x MiniLM cosine(sub-question, teacher's) + 0.5 x "
        "[exactly the teacher's KB], 0 if the tags do not parse.",
        "",
        "What this shows and does not: a 135M model trained for a few dozen updates on 2 shared "
        "CPU cores demonstrates that the pipeline runs end to end (GGUF -> transformers -> TRL "
        "SFT/GRPO -> checkpoint) and what it costs; the held-out numbers are a smoke signal on "
        "a couple dozen prompts, not evidence for or against the paper's accuracy gains.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
