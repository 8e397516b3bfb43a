"""Training benchmark -> benchmarks/results/train.json + train.md.

SmolLM2-135M-Instruct (the packaged Q4_1 GGUF, de-quantised to float32 by transformers) trained
on router (``ret``) step samples from two sources, each split by trajectory (seeded, stratified
by source, 80/20):

- **mkqa-synth**: steps synthesised from mkqa-mini dev questions by the engine with the
  strongest local model as teacher (``kbrouter synth``; its output file is ``--synth``);
- **released**: the R1-Router validation steps (``grpo_dataset_valid_new.jsonl``).

Phases (each checked on the same held-out router steps of both sources, greedy decoding,
scored with the paper's step reward):

1. **prompt-only**: the untrained model;
2. **SFT** on the training steps (samples/s, peak RSS);
3. **Step-GRPO** from the SFT checkpoint (completions/s, peak RSS).

Prompts longer than ``--max-prompt-tokens`` are left out (a 135M model on 2 CPU cores), as
stated in the results. ``uptime`` load is recorded: the CPU may be shared.

    .venv/bin/kbrouter synth -d mkqa-mini --teacher llama-cpp:qwen2.5-coder-1.5b \
        --kbs benchmarks/mkqa_kbs.toml --out runs/synth/mkqa-dev-1.5b.jsonl --limit 20 --seed 1
    .venv/bin/python benchmarks/bench_train.py --synth runs/synth/mkqa-dev-1.5b.jsonl
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


def prompt_tokens(tok: Any, sample: Any) -> int:
    """Length of the sample's chat prompt (with the generation prompt) in tokens."""
    from kbrouter.train.records import prompt_messages

    ids = tok.apply_chat_template(prompt_messages(sample), add_generation_prompt=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def paper_rewarder() -> Any:
    """The paper's step reward over the KB names of both sources (ours: text/table/image, with
    the paper's names as aliases); MiniLM is loaded here, outside the timed sections."""
    from kbrouter.train.rewards import KBNames, RewardConfig, StepRewarder

    kb_names = KBNames(
        {
            "text": ["Text Retriever"],
            "table": ["Table Retriever"],
            "image": ["Text Image Retriever"],
        }
    )
    rewarder = StepRewarder(RewardConfig.paper(), kb_names=kb_names)
    _ = rewarder.encoder
    return rewarder


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


def load_synth_stats(path: Path) -> dict[str, Any]:
    """What the synthesis run did, from its resumable progress file."""
    progress = Path(str(path) + ".progress.jsonl")
    if not progress.is_file():
        return {}
    rows = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    return {"questions": len(rows), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--synth", type=Path, default=REPO / "runs" / "synth" / "mkqa-dev-1.5b.jsonl")
    ap.add_argument("--teacher", default="llama-cpp:qwen2.5-coder-1.5b", help="recorded only")
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--sft-batch", type=int, default=2)
    ap.add_argument("--sft-lr", type=float, default=5e-5)
    ap.add_argument("--grpo-steps", type=int, default=8)
    ap.add_argument("--grpo-generations", type=int, default=4)
    ap.add_argument("--grpo-prompts", type=int, default=2, help="prompts per GRPO update")
    ap.add_argument("--grpo-lr", type=float, default=1e-5)
    ap.add_argument("--heldout-released", type=int, default=24, help="released held-out steps")
    ap.add_argument("--max-prompt-tokens", type=int, default=1150)
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
    from kbrouter.train.sft import train_sft
    from kbrouter.train.step_grpo import train_step_grpo
    from kbrouter.train.steps import read_steps, split_steps

    tok = load_tokenizer("smollm2-135m")

    def fits(sample: Any) -> bool:
        return prompt_tokens(tok, sample) <= args.max_prompt_tokens

    groups: dict[str, tuple[list, list]] = {}
    for name, path in (("mkqa-synth", args.synth), ("released", STEPS_FILE)):
        if not path.is_file():
            print(f"skipping {name}: {path} not found", flush=True)
            continue
        tr, va = split_steps(read_steps(path), val_fraction=0.2, seed=args.seed)
        groups[name] = (
            [s for s in select_kinds(tr, ["ret"]) if fits(s)],
            [s for s in select_kinds(va, ["ret"]) if fits(s)],
        )
    if "released" in groups:
        tr, va = groups["released"]
        groups["released"] = (tr, va[: args.heldout_released])
    train = [s for tr, _ in groups.values() for s in tr]
    heldout = {name: va for name, (_, va) in groups.items()}
    rewarder = paper_rewarder()
    synth_stats = load_synth_stats(args.synth)
    kept = {r.get("id") for r in synth_stats.get("rows", []) if r.get("kept")}
    results: dict[str, Any] = {
        "model": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF, de-quantised to float32)",
        "teacher": args.teacher,
        "synth_questions": synth_stats.get("questions"),
        "synth_kept": len(kept) if synth_stats else None,
        "data": {name: {"train": len(tr), "heldout": len(va)} for name, (tr, va) in groups.items()},
        "max_prompt_tokens": args.max_prompt_tokens,
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "uptime_start": uptime(),
        "phases": {},
    }
    print(json.dumps(results["data"]), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    t0 = time.perf_counter()
    base = load_causal_lm("smollm2-135m")
    results["load_gguf_seconds"] = round(time.perf_counter() - t0, 1)

    def checks(model: Any) -> dict[str, Any]:
        return {
            name: check(model, tok, va, rewarder, args.max_new_tokens)
            for name, va in heldout.items()
            if va
        }

    def save() -> None:
        """Results so far (rewritten after every phase, so a stopped run keeps its figures)."""
        results["uptime_end"] = uptime()
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "train.json").write_text(json.dumps(results, indent=2))
        (RESULTS / "train.md").write_text(render(results))

    print("prompt-only check ...", flush=True)
    results["phases"]["prompt_only"] = {"check": checks(base)}
    print(json.dumps(results["phases"]["prompt_only"]), flush=True)
    save()

    print("SFT ...", flush=True)
    sft_cfg = SFTConfig(
        model="smollm2-135m",
        output_dir=work / "sft",
        learning_rate=args.sft_lr,
        max_steps=args.sft_steps,
        per_device_train_batch_size=args.sft_batch,
        logging_steps=5,
        max_length=args.max_prompt_tokens + 128,
        step_kinds=["ret"],
        seed=args.seed,
    )
    with PeakRSS() as mem:
        sft = train_sft(train, sft_cfg, model=base, tokenizer=tok)
    sft_samples = sft.steps * sft_cfg.per_device_train_batch_size
    sft_model = AutoModelForCausalLM.from_pretrained(sft.checkpoint)
    losses = sft.metric_series("loss")
    results["phases"]["sft"] = {
        "steps": sft.steps,
        "batch_size": sft_cfg.per_device_train_batch_size,
        "learning_rate": sft_cfg.learning_rate,
        "epochs": round(sft_samples / len(train), 2),
        "train_seconds": round(sft.seconds, 1),
        "samples_per_second": round(sft_samples / sft.seconds, 3),
        "peak_rss_mb": mem.peak_mb,
        "loss_first_last": [round(x, 4) for x in losses[:1] + losses[-1:]],
        "uptime": uptime(),
        "check": checks(sft_model),
    }
    print(json.dumps(results["phases"]["sft"]["check"]), flush=True)
    save()
    del base

    print("Step-GRPO ...", flush=True)
    g = args.grpo_generations
    grpo_cfg = StepGRPOConfig.paper_preset(
        str(sft.checkpoint),
        work / "grpo",
        num_generations=g,
        per_device_train_batch_size=g * args.grpo_prompts,
        max_steps=args.grpo_steps,
        max_completion_length=args.max_new_tokens,
        learning_rate=args.grpo_lr,
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
        "group_size": g,
        "completions_per_step": grpo_cfg.per_device_train_batch_size,
        "learning_rate": grpo_cfg.learning_rate,
        "train_seconds": round(grpo.seconds, 1),
        "samples_per_second": round(completions / grpo.seconds, 3),
        "prompts_per_second": round(completions / g / grpo.seconds, 3),
        "peak_rss_mb": mem.peak_mb,
        "train_reward_per_step": [round(r, 4) for r in rewards],
        "uptime": uptime(),
        "check": checks(grpo_model),
    }
    save()
    print(render(results))


def render(r: dict[str, Any]) -> str:
    p = r["phases"]
    data = ", ".join(
        f"{name}: {d['train']} train / {d['heldout']} held-out" for name, d in r["data"].items()
    )
    lines = [
        "# Training benchmark (SmolLM2-135M on CPU)",
        "",
        f"Model: {r['model']}. Router (`ret`) steps only, prompts <= {r['max_prompt_tokens']} "
        f"tokens, trajectory split 0.8/0.2 (seed {r['seed']}): {data}. "
        f"mkqa-synth = steps synthesised by `{r['teacher']}` through the engine on "
        f"{r['synth_questions']} mkqa-mini dev questions ({r['synth_kept']} trajectories kept at "
        f"F1-Recall 1); released = grpo_dataset_valid_new.jsonl. torch threads: "
        f"{r['torch_threads']}. GGUF load + de-quantisation: {r['load_gguf_seconds']} s.",
        f"Load at start: `{r['uptime_start']}`; at end: `{r['uptime_end']}`.",
        "",
        "## Throughput and memory",
        "",
        "| phase | updates | lr | samples/s | peak RSS (MB) | wall s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    if "sft" in p:
        s = p["sft"]
        lines.append(
            f"| SFT (batch {s['batch_size']}, {s['epochs']} epochs) | {s['steps']} | "
            f"{s['learning_rate']} | {s['samples_per_second']} | {s['peak_rss_mb']} | "
            f"{s['train_seconds']} |"
        )
    if "step_grpo" in p:
        g = p["step_grpo"]
        lines.append(
            f"| Step-GRPO (G={g['group_size']}, {g['completions_per_step']} completions/update) | "
            f"{g['steps']} | {g['learning_rate']} | {g['samples_per_second']} completions/s "
            f"({g['prompts_per_second']} prompts/s) | {g['peak_rss_mb']} | {g['train_seconds']} |"
        )
    lines += [
        "",
        "## Held-out router steps (greedy)",
        "",
        "| model | held-out set | routing accuracy | mean step reward | format rate |",
        "|---|---|---:|---:|---:|",
    ]
    for name, key in (("prompt-only", "prompt_only"), ("SFT", "sft"), ("Step-GRPO", "step_grpo")):
        for group, c in p.get(key, {}).get("check", {}).items():
            lines.append(
                f"| {name} | {group} | {c['routing_accuracy']} | {c['mean_reward']} | "
                f"{c['format_rate']} |"
            )
    if "step_grpo" in p:
        lines += [
            "",
            "Step-GRPO mean training reward per update: "
            + ", ".join(str(x) for x in p["step_grpo"]["train_reward_per_step"]),
        ]
    lines += [
        "",
        "Step reward = paper preset: 0.5 x MiniLM cosine(sub-question, teacher's) + 0.5 x "
        "[exactly the teacher's KB], 0 if the tags do not parse. Routing accuracy counts a "
        "router step right when it names exactly the target KB (or stops when the target stops).",
        "",
        "What a 135M model trained for a few dozen updates on 2 CPU cores can and cannot show: "
        "docs/training.md, section 5.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
