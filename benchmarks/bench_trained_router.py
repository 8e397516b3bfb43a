"""A trained LLM router through the embedded engine: gold-path SFT of the default 0.5B, exported
to GGUF, measured end to end against the prompted 0.5B on the same questions.

Stages (each resumable; re-run the same command to continue):

1. ``steps``: gold-path step samples (kbrouter.train.gold_paths) for the mkqa-mini dev questions
   OUTSIDE the validation subset; the validation subset is the routing benchmark's e2e subset
   (``--limit`` questions, seed 0, source-stratified), so the prompted rows measured there apply.
   wtq is capped at ``--wtq-cap`` training questions (seeded) so one source does not dominate.
2. ``sft``: LoRA SFT of Qwen2.5-Coder-0.5B-Instruct, loaded from its packaged GGUF, on the
   router and sub-answer steps with the compact router prompt, or ``--router-prompt terse``
   (the shorter reply; checkpoints every ``--save-steps`` updates; an interrupted run resumes
   from the newest). ``--base`` may be an earlier LoRA run folder (merged first).
3. ``export``: ``kbrouter.train.export.export_gguf`` (merge LoRA, llama.cpp's converter,
   ``--quant``), recording the prompt variant in the GGUF.
4. ``grpo`` / ``export-grpo``: teacher-forced Step-GRPO from the SFT run on the router steps
   of the same data (bounded by ``--grpo-seconds``), and its export.
5. ``grpo-onpolicy`` / ``export-grpo-onpolicy``: on-policy Step-GRPO from the SFT run:
   ``--onpolicy-rounds`` rounds, each rolling the current checkpoint (exported to GGUF) out
   through the engine on ``--onpolicy-questions`` training questions, labelling the states it
   reached from the gold paths, and training ``--onpolicy-updates`` updates; and its export.
6. ``eval``: the R1-Router loop (min_retrieval_steps=1, grammar, top-2, budget 3: the routing
   benchmark's settings) with each ``--models`` entry through llama.cpp; routing-only figures
   come from the same trajectories (hop-1 KB against the gold first KB, the share of questions
   whose router never retrieved).
7. ``latency``: one first-step route call per question, alone (the few-shot and compact prompts
   of the prompted model, each exported model with the prompt it was trained on).
8. ``routing``: merges teacher-forced routing-only reports (``--routing-only``) into the rows.

Writes ``summary.json`` and ``summary.md`` under ``--out``; runs go under ``--runs``.

    .venv/bin/python benchmarks/bench_trained_router.py --stages steps,sft,export,eval \\
        --reference prompted=benchmarks/results/routing/e2e.json#r1-router@min_retrieval_steps=1
    .venv/bin/python benchmarks/bench_trained_router.py --stages latency   # alone, quiet machine

The terse router (sft-v3 continued for 60 updates on the same gold paths in the terse reply):

    B=".venv/bin/python benchmarks/bench_trained_router.py --runs runs/trained-router-terse"
    $B --stages steps --wtq-cap 1000 --first-hops-of-dropped --router-prompt terse
    $B --stages sft,export --base runs/trained-router-v3/sft/final --lr 2e-4 --max-updates 60
    $B --stages latency --models sft-v3-terse=gguf:sft --latency-questions 10
"""

from __future__ import annotations

import argparse
import collections
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


TRAINED = ("compact", "terse")
"""Router prompt variants a trained router is run with (the one its GGUF records)."""


def split_questions(examples: list, limit: int, seed: int, wtq_cap: int) -> tuple[list, list]:
    """(validation, training) mkqa-mini questions: ``limit`` seeded, source-stratified
    validation questions, and the rest with wtq capped at ``wtq_cap`` (seeded)."""
    from kbrouter.eval.datasets import select_examples

    val = select_examples(examples, limit, seed=seed, stratify=True)
    val_ids = {e.id for e in val}
    train = [e for e in examples if e.id not in val_ids]
    wtq = [e for e in train if e.source == "wtq"]
    random.Random(seed).shuffle(wtq)
    keep_wtq = {e.id for e in wtq[:wtq_cap]}
    return val, [e for e in train if e.source != "wtq" or e.id in keep_wtq]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--stages", default="steps,sft,export,eval")
    ap.add_argument("--limit", type=int, default=60, help="validation questions (e2e subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wtq-cap", type=int, default=50)
    ap.add_argument(
        "--first-hops-of-dropped",
        action="store_true",
        help="steps: also the first router step of questions dropped for a retrieval miss",
    )
    ap.add_argument(
        "--router-prompt",
        default="compact",
        help="steps: router prompt variant of the samples (compact or terse: the shorter reply)",
    )
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
    ap.add_argument("--grpo-updates", type=int, default=64, help="Step-GRPO optimizer updates")
    ap.add_argument(
        "--grpo-seconds",
        type=float,
        default=1500,
        help="Step-GRPO time budget (a bounded run: as many updates as fit, then saved)",
    )
    ap.add_argument("--grpo-lr", type=float, default=2e-5)
    ap.add_argument("--grpo-generations", type=int, default=4, help="group size G")
    ap.add_argument("--grpo-prompts", type=int, default=2, help="step prompts per update")
    ap.add_argument("--grpo-max-completion", type=int, default=96)
    ap.add_argument("--onpolicy-rounds", type=int, default=2, help="on-policy rounds")
    ap.add_argument(
        "--onpolicy-questions", type=int, default=24, help="training questions per round"
    )
    ap.add_argument(
        "--onpolicy-updates", type=int, default=8, help="Step-GRPO updates per on-policy round"
    )
    ap.add_argument(
        "--sft-data",
        type=Path,
        default=None,
        help="sft: train on these step samples (e.g. a `kbrouter synth` teacher run on the "
        "same training questions) instead of the gold paths of the steps stage",
    )
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

    from kbrouter.eval.datasets import load_dataset
    from kbrouter.kb.registry import KBRegistry

    registry = KBRegistry.from_config(args.kbs)
    registry.build(progress=False)
    ds = load_dataset("mkqa-mini")
    val, train = split_questions(ds.examples, args.limit, args.seed, args.wtq_cap)
    val_ids = {e.id for e in val}

    steps_path = args.runs / "gold_steps.jsonl"
    steps_info = args.runs / "gold_steps.json"
    if "steps" in stages and not steps_path.is_file():
        from kbrouter.train.gold_paths import GoldPathBuilder
        from kbrouter.train.steps import write_steps

        t0 = time.perf_counter()
        report = GoldPathBuilder(
            registry,
            top_k=2,
            router_prompt=args.router_prompt,
            first_hops_of_dropped=args.first_hops_of_dropped,
        ).build(train)
        write_steps(report.samples, steps_path)
        steps_info.write_text(
            json.dumps(
                {
                    "train_questions": len(train),
                    "kept": report.kept,
                    "dropped": dict(report.dropped),
                    "first_hops_of_dropped": report.first_hops,
                    "router_prompt": args.router_prompt,
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
        from kbrouter.policies.prompts import detect_router_prompt
        from kbrouter.train.config import SFTConfig
        from kbrouter.train.sft import train_sft
        from kbrouter.train.steps import read_steps

        samples = read_steps(args.sft_data or steps_path)
        if args.sft_data is not None:
            leaked = {s.trajectory_id for s in samples} & val_ids
            if leaked:
                raise SystemExit(f"{args.sft_data}: validation questions in training: {leaked}")
            counts = dict(collections.Counter(s.kind for s in samples))
            (args.runs / "sft_data.json").write_text(
                json.dumps(
                    {
                        "sft_data": str(args.sft_data),
                        "questions": len({s.trajectory_id for s in samples}),
                        "samples": counts,
                        "router_prompt": sorted(
                            {
                                str(detect_router_prompt(s.messages))
                                for s in samples
                                if s.kind == "ret"
                            }
                        ),
                    },
                    indent=2,
                )
            )
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
            lora=_lora(args),
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

    grpo_dir = args.runs / "grpo"
    if "grpo" in stages and not (grpo_dir / "final" / "kbrouter_train.json").is_file():
        _step_grpo(args, registry, steps_path, sft_dir / "final", grpo_dir)
    grpo_gguf = args.runs / "router-grpo.gguf"
    if "export-grpo" in stages and not grpo_gguf.is_file():
        from kbrouter.train.export import export_gguf

        t0 = time.perf_counter()
        export_gguf(grpo_dir / "final", grpo_gguf, quant=args.quant)
        print(f"export: {grpo_gguf} in {time.perf_counter() - t0:.0f} s")

    onpolicy_dir = args.runs / "grpo-onpolicy"
    if "grpo-onpolicy" in stages and not (onpolicy_dir / "final" / "kbrouter_train.json").is_file():
        _step_grpo_on_policy(args, registry, steps_path, train, sft_dir / "final", onpolicy_dir)
    onpolicy_gguf = args.runs / "router-grpo-onpolicy.gguf"
    if "export-grpo-onpolicy" in stages and not onpolicy_gguf.is_file():
        from kbrouter.train.export import export_gguf

        t0 = time.perf_counter()
        export_gguf(onpolicy_dir / "final", onpolicy_gguf, quant=args.quant)
        print(f"export: {onpolicy_gguf} in {time.perf_counter() - t0:.0f} s")

    if "eval" in stages:
        _evaluate(args, registry, ds, val)
    if "latency" in stages:
        _latency(args, registry, val)
    if "routing" in stages:
        _merge_routing_only(args)


def _lora(args):  # noqa: ANN001, ANN202
    """The LoRA both training stages use: r=--lora-r on q/k/v/o, alpha 2r, adapter kept apart."""
    from kbrouter.train.config import LoRAConfig

    return LoRAConfig(
        enabled=True,
        r=args.lora_r,
        alpha=2 * args.lora_r,
        dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        merge_on_save=False,
    )


def _grpo_config(args, sft_final: Path, out: Path, **extra):  # noqa: ANN001, ANN202
    """Both Step-GRPO stages' settings: its own LoRA on the merged SFT model, G completions at
    T=1.0 for ``--grpo-prompts`` prompts per update, DAPO loss, group-scaled advantages, no KL,
    the paper's reward (0.5 routing + 0.5 sub-question similarity, format-gated), router steps
    only, checkpoints every 4 updates."""
    from kbrouter.train.config import StepGRPOConfig
    from kbrouter.train.rewards import RewardConfig

    g = args.grpo_generations
    return StepGRPOConfig(
        model=str(sft_final),
        output_dir=out,
        learning_rate=args.grpo_lr,
        lr_scheduler_type="constant",
        num_generations=g,
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        per_device_train_batch_size=g,
        gradient_accumulation_steps=args.grpo_prompts,
        max_completion_length=args.grpo_max_completion,
        step_kinds=["ret"],
        rewards=RewardConfig.paper(),
        save_steps=4,
        logging_steps=1,
        seed=args.seed,
        use_cpu=True,
        lora=_lora(args),
        trl_overrides={"save_total_limit": 2},
        **extra,
    )


def _step_grpo(args, registry, steps_path: Path, sft_final: Path, out: Path) -> None:  # noqa: ANN001
    """Step-GRPO (teacher-forced, the paper's regime) from the SFT run on the router steps of
    the same gold-path data: its own LoRA on the merged SFT model, the paper's reward (0.5
    routing + 0.5 sub-question similarity, format-gated), ``--grpo-updates`` updates of
    ``--grpo-prompts`` prompts x G completions, or fewer when ``--grpo-seconds`` runs out (a
    bounded run); checkpoints every 4 updates (resumable)."""
    from kbrouter.train.rewards import KBNames
    from kbrouter.train.step_grpo import train_step_grpo
    from kbrouter.train.steps import read_steps

    config = _grpo_config(
        args, sft_final, out, max_steps=args.grpo_updates, max_train_seconds=args.grpo_seconds
    )
    samples = read_steps(steps_path)
    result = train_step_grpo(samples, config, kb_names=KBNames(registry.infos), progress=True)
    print(f"Step-GRPO: {result.steps} updates in {result.seconds:.0f} s")


def _step_grpo_on_policy(
    args, registry, steps_path: Path, train, sft_final: Path, out: Path
) -> None:  # noqa: ANN001, E501
    """On-policy Step-GRPO from the SFT run: each round exports the current checkpoint to a
    GGUF, rolls it out through the engine (the evaluation's settings: r1-router,
    ``min_retrieval_steps=1``, top-k 2, 3 steps; T=1.0) on the next ``--onpolicy-questions``
    training questions that have gold router steps (seeded order), labels the router steps the
    policy reached with :class:`GoldRouteLabeler` (the first gold hop not searched yet, then a
    stop) and trains ``--onpolicy-updates`` GRPO updates on them (the teacher-forced run's
    settings). Finished rounds are kept when the stage is rerun."""
    import asyncio

    from kbrouter.policies.r1router import R1RouterPolicy
    from kbrouter.train.config import OnPolicyConfig
    from kbrouter.train.gold_paths import GoldRouteLabeler
    from kbrouter.train.onpolicy import engine_rollout, gguf_rollout_model
    from kbrouter.train.rewards import KBNames, StepRewarder
    from kbrouter.train.step_grpo import train_step_grpo_on_policy
    from kbrouter.train.steps import read_steps

    labeler = GoldRouteLabeler.from_samples(read_steps(steps_path))
    questions = [e for e in train if e.id in labeler.gold]
    random.Random(args.seed).shuffle(questions)
    config = _grpo_config(
        args,
        sft_final,
        out,
        on_policy=OnPolicyConfig(
            enabled=True,
            rounds=args.onpolicy_rounds,
            questions_per_round=args.onpolicy_questions,
            steps_per_round=args.onpolicy_updates,
            rollout_temperature=1.0,
            max_retrieval_steps=3,
            top_k=2,
        ),
    )
    rollout = engine_rollout(
        registry,
        config,
        policy_factory=lambda: R1RouterPolicy(min_retrieval_steps=1),
        model_factory=gguf_rollout_model(out / "rollout-gguf", quant=args.quant),
        concurrency=2,
    )
    rewarder = StepRewarder(config.rewards, kb_names=KBNames(registry.infos))
    result = asyncio.run(
        train_step_grpo_on_policy(
            questions, config, rollout, labeler=labeler, rewarder=rewarder, progress=True
        )
    )
    print(
        f"on-policy Step-GRPO: {result.steps} updates on {result.samples} step samples in "
        f"{result.seconds:.0f} s; labels {dict(labeler.counts)}"
    )


def _training_info(run_final: Path) -> dict | None:
    """What a training run was (settings, updates, samples, seconds, reward/loss history)."""
    path = run_final / "kbrouter_train.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    cfg = info.get("config", {})
    keys = (
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
        "num_generations",
        "temperature",
        "max_completion_length",
        "loss_type",
        "rewards",
    )
    model = cfg.get("model")
    if isinstance(model, str) and model.startswith(str(REPO)):
        cfg["model"] = str(Path(model).relative_to(REPO))
    return {
        "trainer": info.get("trainer"),
        "kinds": info.get("kinds"),
        "router_prompt": info.get("router_prompt"),
        "result": info.get("result"),
        "rounds": info.get("rounds"),
        "settings": {k: cfg[k] for k in keys if k in cfg},
    }


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
    for row in summary["models"].values():  # the quantisation each exported router ran at
        spec = str(row.get("model") or "")
        path = REPO / spec.split(":", 1)[1] if spec.startswith("llama-cpp:") else None
        if path is not None and path.is_file() and "gguf_file_type" not in row:
            row["gguf_file_type"] = _gguf_file_type(path)
    # route_seconds: one route call alone (the latency stage); the e2e mean ran two questions
    # at a time and is kept as route_seconds_e2e
    lat = summary.get("route_latency") or {}
    for name, row in summary["models"].items():
        cases = ["prompted-few-shot"] if name == "prompted" else [f"{name}-{v}" for v in TRAINED]
        case = next((c for c in cases if isinstance(lat.get(c), dict)), None)
        if case is not None:
            if row.get("route_seconds") is not None and "route_seconds_e2e" not in row:
                row["route_seconds_e2e"] = row["route_seconds"]
            row["route_seconds"] = lat[case]["mean_seconds_after_first"]
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    if "benchmark" in summary:
        _write_md(args.out / "summary.md", summary)


def _gguf_file_type(path: Path) -> str | None:
    """The GGUF's ``general.file_type`` by name (e.g. MOSTLY_Q4_0), read from its header."""
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return None
    value = int(field.parts[field.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name
    except ValueError:
        return str(value)


def _latency(args, registry, val) -> None:  # noqa: ANN001
    """Seconds of one first-step route call (the engine's grammar, greedy, prefix cache on as
    in the engine) for: the prompted model with the few-shot prompt and with the compact
    prompt, and each exported model of ``--models`` with the prompt variant recorded in its
    GGUF (compact or terse, what it was trained on);
    run alone. Cases measured by earlier runs are kept."""
    import asyncio

    from kbrouter.models.llama_cpp import LlamaCppModel
    from kbrouter.policies.prompts import PromptBuilder
    from kbrouter.types import SamplingParams

    questions = [e.question for e in val][: args.latency_questions]
    # (name, GGUF, router prompt, lazy grammar); "-full-mask": llama-cpp-python's own grammar
    # sampler, which masks the whole vocabulary at every generated token
    cases = [
        ("prompted-few-shot", None, "full", True),
        ("prompted-few-shot-full-mask", None, "full", False),
        ("prompted-compact", None, "compact", True),
    ]
    for pair in [p.strip() for p in args.models.split(",") if p.strip()]:
        name, _, spec = pair.partition("=")
        if spec.startswith("gguf:"):
            path = args.runs / f"router-{spec.split(':', 1)[1]}.gguf"
            variant = LlamaCppModel(path).prompt_variant or "compact"
            cases.append((f"{name}-{variant}", path, variant, True))
            cases.append((f"{name}-{variant}-full-mask", path, variant, False))
    out: dict[str, dict] = {}
    for name, path, variant, lazy in cases:
        model = LlamaCppModel(path, lazy_grammar=lazy)
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
            "lazy_grammar": lazy,
            "grammar_full_mask_share": (
                model.grammar_stats["full_masks"] / model.grammar_stats["steps"]
                if model.grammar_stats["steps"]
                else None
            ),
        }
        print(name, out[name], flush=True)
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"models": {}}
    # cases measured in earlier runs are kept; every case carries the commit it ran at
    kept = {k: v for k, v in (summary.get("route_latency") or {}).items() if isinstance(v, dict)}
    for v in kept.values():
        v.setdefault("commit", (summary.get("route_latency") or {}).get("commit"))
    summary["route_latency"] = {
        "what": "one first-step route call per question (route grammar without the stop "
        "branch, greedy, llama.cpp prefix cache on as in the engine; the backend's lazy grammar "
        "check unless the case ends in -full-mask), questions run one after another on a quiet "
        "machine",
        "questions": len(questions),
        **kept,
        **{k: {**v, "commit": _commit()} for k, v in out.items()},
    }
    atomic_write_text(summary_path, json.dumps(summary, indent=2))
    if "benchmark" in summary:
        _write_md(args.out / "summary.md", summary)


def _evaluate(args, registry, ds, val) -> None:  # noqa: ANN001
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
    data_info = None
    for info in ("sft_data.json", "gold_steps.json"):  # the data the SFT run trained on
        if (args.runs / info).is_file():
            data_info = json.loads((args.runs / info).read_text())
            break
    if data_info is not None:
        data_info.pop("validation_ids", None)
        data_info["runs"] = str(args.runs.resolve().relative_to(REPO))
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
        training = None
        if spec.startswith("gguf:"):  # a model exported by this script: gguf:sft, gguf:grpo
            run = spec.split(":", 1)[1]
            training = {"data": data_info}
            for stage in ("sft", run) if run.startswith("grpo") else (run,):
                training[stage] = _training_info(args.runs / stage / "final")
            spec = f"llama-cpp:{args.runs / f'router-{run}.gguf'}"
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
            "training": training,
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
    trained = {n: m["training"] for n, m in summary["models"].items() if m.get("training")}
    if trained:
        lines += ["", "Training (step samples; updates, samples, seconds):", ""]
        for name, t in trained.items():
            data = t.get("data") or {}
            parts = []
            if data.get("sft_data"):  # other step samples (--sft-data), e.g. a teacher run
                parts.append(
                    f"data {data.get('runs', '')}: {data['sft_data']}, {data['questions']} "
                    f"questions, samples {data['samples']}"
                )
            elif data:
                parts.append(
                    f"data {data.get('runs', '')}: {data['kept']} of {data['train_questions']} "
                    f"training questions kept ({data['dropped']}), samples {data['samples']}"
                    + (
                        f" (incl. the first router step of {data['first_hops_of_dropped']} "
                        "dropped questions)"
                        if data.get("first_hops_of_dropped")
                        else ""
                    )
                )
            for stage in ("sft", "grpo", "grpo-onpolicy"):
                info = t.get(stage)
                if info and info.get("result"):
                    r = info["result"]
                    rounds = info.get("rounds") or []
                    on_policy = (
                        f"; {len(rounds)} rounds of "
                        + " + ".join(str(x["questions"]) for x in rounds)
                        + " rolled-out questions, rollouts "
                        + " + ".join(f"{x['rollout_seconds']:.0f}" for x in rounds)
                        + " s"
                        if rounds
                        else ""
                    )
                    parts.append(
                        f"{stage}: {r['steps']} updates on {r['samples']} samples in "
                        f"{r['seconds']:.0f} s (lr {info['settings'].get('learning_rate')}"
                        f"{on_policy})"
                    )
            gguf_type = summary["models"][name].get("gguf_file_type")
            if gguf_type:
                parts.append(f"run as GGUF {gguf_type}")
            lines.append(f"- {name}: " + "; ".join(parts))
    lat = summary.get("route_latency")
    if lat:
        lines += ["", f"Route-call latency ({lat['what']}; {lat['questions']} questions):", ""]
        lines += [
            "| case | mean s | prompt tokens | completion tokens | measured at |",
            "|---|---|---|---|---|",
        ]
        for k, v in lat.items():
            if isinstance(v, dict):
                lines.append(
                    f"| {k} | {v['mean_seconds_after_first']:.2f} | "
                    f"{v['mean_prompt_tokens']:.0f} | {v['mean_completion_tokens']:.0f} | "
                    f"{str(v.get('commit') or '–')[:7]} |"
                )
        lines += ["", "Compare cases measured at the same commit (one run, same machine state)."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
