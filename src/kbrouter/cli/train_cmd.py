"""``kbrouter synth`` (teacher trajectories -> step samples), ``kbrouter train sft|step-grpo``,
``kbrouter train gold-paths`` (step samples from gold annotations) and ``kbrouter train export``
(a checkpoint as a llama.cpp GGUF)."""

from __future__ import annotations

import asyncio
import json
import os
import tomllib
from pathlib import Path
from typing import Any

import typer

from kbrouter.cli.common import DEMO_CONFIG, cli_errors, console, err_console

train_app = typer.Typer(
    help="Train the router: SFT and Step-GRPO on step samples.", no_args_is_help=True
)


def _load_config_file(path: Path | None) -> dict[str, Any]:
    """Fields from a JSON or TOML config file (``{}`` without a file)."""
    from kbrouter.errors import ConfigError

    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(path.read_text())
        return json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot parse config file {path}: {e}") from None


def _build(cls: Any, base: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """Validate ``cls`` from config-file fields plus the CLI flags that were given."""
    from pydantic import ValidationError

    from kbrouter.errors import ConfigError

    merged = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict):
            merged[key] = {
                **merged.get(key, {}),
                **{k: v for k, v in value.items() if v is not None},
            }
        else:
            merged[key] = value
    try:
        return cls.model_validate(merged)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"invalid training config: {loc}: {first['msg']}") from None


def _kinds(value: str | None) -> list[str] | None:
    return [k.strip() for k in value.split(",") if k.strip()] if value else None


def _load_split(data: Path, val_fraction: float, seed: int) -> tuple[list, list]:
    from kbrouter.train.steps import read_steps, split_steps

    samples = read_steps(data)
    if val_fraction <= 0:
        return samples, []
    return split_steps(samples, val_fraction=val_fraction, seed=seed)


def _kb_names(kbs: Path | None) -> Any:
    from kbrouter.train.rewards import KBNames

    if kbs is None:
        return KBNames()  # the paper's three KB names
    from kbrouter.kb.registry import KBRegistry

    return KBNames(KBRegistry.from_config(kbs).infos)


@train_app.command("sft")
def sft_command(
    data: Path = typer.Option(..., "--data", help="Step samples (kbrouter or paper JSONL)."),
    model: str | None = typer.Option(
        None, "--model", help="HF id/folder, .gguf file or packaged preset (smollm2-135m)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run folder (default runs/sft)."),
    config: Path | None = typer.Option(None, "--config", help="SFTConfig fields (JSON/TOML)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate."),
    epochs: float | None = typer.Option(None, "--epochs", help="Epochs."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Optimizer updates (-1: epochs)."
    ),
    max_seconds: float | None = typer.Option(
        None, "--max-seconds", help="Time budget: stop after the update that crosses it, save."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Per-device batch size."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Gradient accumulation."),
    kinds: str | None = typer.Option(None, "--kinds", help="Step kinds: ret,sub_answer,final."),
    lora: bool | None = typer.Option(None, "--lora/--no-lora", help="Train LoRA adapters."),
    lora_r: int | None = typer.Option(None, "--lora-r", help="LoRA rank."),
    max_length: int | None = typer.Option(None, "--max-length", help="Token truncation length."),
    val_fraction: float = typer.Option(
        0.0, "--val-fraction", help="Hold out this fraction of trajectories (not trained on)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed."),
    resume: bool = typer.Option(
        True,
        "--resume/--no-resume",
        help="Continue an interrupted run of the same training from its newest checkpoint "
        "(--no-resume starts over in the folder).",
    ),
) -> None:
    """Supervised fine-tuning on step targets (TRL SFTTrainer)."""
    from kbrouter.train.config import SFTConfig
    from kbrouter.train.sft import train_sft

    with cli_errors():
        cfg = _build(
            SFTConfig,
            _load_config_file(config),
            {
                "model": model,
                "output_dir": out or (None if config else Path("runs/sft")),
                "learning_rate": lr,
                "num_train_epochs": epochs,
                "max_steps": max_steps,
                "max_train_seconds": max_seconds,
                "per_device_train_batch_size": batch_size,
                "gradient_accumulation_steps": grad_accum,
                "step_kinds": _kinds(kinds),
                "lora": {"enabled": lora, "r": lora_r},
                "max_length": max_length,
                "seed": seed,
            },
        )
        train, _ = _load_split(data, val_fraction, cfg.seed)
        result = train_sft(train, cfg, progress=True, resume=resume)
    console.print(
        f"SFT: {result.steps} updates on {result.samples} step samples in {result.seconds:.0f}s; "
        f"checkpoint {result.checkpoint} (use --model transformers:{result.checkpoint})"
    )


@train_app.command("step-grpo")
def step_grpo_command(
    data: Path | None = typer.Option(
        None, "--data", help="Step samples (kbrouter or paper JSONL); not used with --on-policy."
    ),
    model: str | None = typer.Option(
        None, "--model", help="HF id/folder, .gguf file or packaged preset (smollm2-135m)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run folder (default runs/step-grpo)."
    ),
    config: Path | None = typer.Option(None, "--config", help="StepGRPOConfig fields (JSON/TOML)."),
    preset: str | None = typer.Option(
        "paper", "--preset", help="Start from a preset ('paper') or from defaults ('none')."
    ),
    num_generations: int | None = typer.Option(None, "--num-generations", "-G", help="Group size."),
    temperature: float | None = typer.Option(None, "--temperature", help="Sampling temperature."),
    beta: float | None = typer.Option(None, "--beta", help="KL weight (0 = no reference model)."),
    epsilon: float | None = typer.Option(None, "--epsilon", help="PPO clip range."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate."),
    epochs: float | None = typer.Option(None, "--epochs", help="Epochs."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Optimizer updates (-1: epochs)."
    ),
    max_seconds: float | None = typer.Option(
        None, "--max-seconds", help="Time budget: stop after the update that crosses it, save."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Completions per device/step."
    ),
    max_completion_length: int | None = typer.Option(
        None, "--max-completion-length", help="Max generated tokens."
    ),
    kinds: str | None = typer.Option(None, "--kinds", help="Step kinds: ret,sub_answer,final."),
    lora: bool | None = typer.Option(None, "--lora/--no-lora", help="Train LoRA adapters."),
    lora_r: int | None = typer.Option(None, "--lora-r", help="LoRA rank."),
    routing_weight: float | None = typer.Option(
        None, "--routing-weight", help="Routing reward weight."
    ),
    similarity_weight: float | None = typer.Option(
        None, "--similarity-weight", help="Sub-question similarity weight."
    ),
    format_weight: float | None = typer.Option(
        None, "--format-weight", help="Format bonus weight."
    ),
    retrieval_cost: float | None = typer.Option(
        None, "--retrieval-cost", help="Penalty per KB queried."
    ),
    encoder: str | None = typer.Option(
        None, "--encoder", help="Similarity encoder (default minilm)."
    ),
    kbs: Path | None = typer.Option(
        None,
        "--kbs",
        help="kbs.toml whose KB names/aliases the router may emit (default: the "
        "paper's three names); required with --on-policy.",
    ),
    val_fraction: float = typer.Option(
        0.0, "--val-fraction", help="Hold out this fraction of trajectories (not trained on)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed."),
    resume: bool = typer.Option(
        True,
        "--resume/--no-resume",
        help="Continue an interrupted run of the same training from its newest checkpoint "
        "(--no-resume starts over in the folder).",
    ),
    on_policy: bool = typer.Option(
        False, "--on-policy", help="Step prompts from live rollouts of the current policy."
    ),
    dataset: str | None = typer.Option(None, "--dataset", help="On-policy: training questions."),
    limit: int | None = typer.Option(None, "--limit", help="On-policy: use N questions."),
    teacher: str | None = typer.Option(
        None, "--teacher", help="On-policy: model spec that labels router/sub-answer steps."
    ),
    rounds: int | None = typer.Option(None, "--rounds", help="On-policy: rollout+train rounds."),
    gold_steps: Path | None = typer.Option(
        None,
        "--gold-steps",
        help="On-policy: label router steps from gold paths (`kbrouter train gold-paths` "
        "output) instead of a teacher: the first gold hop not searched yet, then a stop; "
        "only questions with gold steps are rolled out.",
    ),
    rollout_backend: str = typer.Option(
        "transformers",
        "--rollout-backend",
        help="On-policy: run rollouts with 'transformers' (the checkpoint folder) or 'gguf' "
        "(each round's checkpoint exported to GGUF and run by llama.cpp; faster on CPU).",
    ),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Shared data folder."),
) -> None:
    """Step-GRPO (TRL GRPOTrainer) on step prompts with step-type-specific rewards."""
    from kbrouter.errors import ConfigError
    from kbrouter.train.config import StepGRPOConfig
    from kbrouter.train.rewards import StepRewarder
    from kbrouter.train.step_grpo import train_step_grpo

    with cli_errors():
        base = _load_config_file(config)
        if preset and preset.lower() == "paper":
            base = {
                **StepGRPOConfig.paper_preset("x", "x").model_dump(exclude={"model", "output_dir"}),
                **base,
            }
        elif preset and preset.lower() != "none":
            raise ConfigError(f"unknown preset {preset!r}; expected 'paper' or 'none'")
        cfg = _build(
            StepGRPOConfig,
            base,
            {
                "model": model,
                "output_dir": out or (None if "output_dir" in base else Path("runs/step-grpo")),
                "num_generations": num_generations,
                "temperature": temperature,
                "beta": beta,
                "epsilon": epsilon,
                "learning_rate": lr,
                "num_train_epochs": epochs,
                "max_steps": max_steps,
                "max_train_seconds": max_seconds,
                "per_device_train_batch_size": batch_size,
                "max_completion_length": max_completion_length,
                "step_kinds": _kinds(kinds),
                "lora": {"enabled": lora, "r": lora_r},
                "rewards": {
                    "routing_weight": routing_weight,
                    "similarity_weight": similarity_weight,
                    "format_weight": format_weight,
                    "retrieval_cost": retrieval_cost,
                    "encoder": encoder,
                },
                "on_policy": {"enabled": True if on_policy else None, "rounds": rounds},
                "seed": seed,
            },
        )
        rewarder = StepRewarder(cfg.rewards, kb_names=_kb_names(kbs))
        if cfg.on_policy.enabled:
            result = _run_on_policy(
                cfg, rewarder, dataset, kbs, teacher, limit, data_dir, gold_steps, rollout_backend
            )
        else:
            if data is None:
                raise ConfigError("--data is required (or use --on-policy with --dataset)")
            train, _ = _load_split(data, val_fraction, cfg.seed)
            result = train_step_grpo(train, cfg, rewarder=rewarder, progress=True, resume=resume)
    rewards = result.metric_series("reward")
    shown = f"; reward {rewards[0]:.3f} -> {rewards[-1]:.3f}" if rewards else ""
    console.print(
        f"Step-GRPO: {result.steps} updates on {result.samples} step samples in "
        f"{result.seconds:.0f}s{shown}; checkpoint {result.checkpoint} "
        f"(use --model transformers:{result.checkpoint})"
    )


def _run_on_policy(
    cfg: Any,
    rewarder: Any,
    dataset: str | None,
    kbs: Path | None,
    teacher: str | None,
    limit: int | None,
    data_dir: Path | None,
    gold_steps: Path | None = None,
    rollout_backend: str = "transformers",
) -> Any:
    from kbrouter.errors import ConfigError
    from kbrouter.eval.datasets import load_dataset, select_examples
    from kbrouter.kb.registry import KBRegistry
    from kbrouter.models.registry import load_model
    from kbrouter.train.gold_paths import GoldRouteLabeler
    from kbrouter.train.onpolicy import engine_rollout, gguf_rollout_model
    from kbrouter.train.step_grpo import train_step_grpo_on_policy
    from kbrouter.train.steps import read_steps
    from kbrouter.train.synth import TeacherLabeler

    if dataset is None or kbs is None:
        raise ConfigError("--on-policy needs --dataset (training questions) and --kbs")
    if teacher is not None and gold_steps is not None:
        raise ConfigError("--teacher and --gold-steps both label router steps: pass one")
    if rollout_backend not in ("transformers", "gguf"):
        raise ConfigError(
            f"unknown --rollout-backend {rollout_backend!r}; expected 'transformers' or 'gguf'"
        )
    examples = load_dataset(dataset, data_dir=data_dir).examples
    labeler: Any = None
    if gold_steps is not None:
        labeler = GoldRouteLabeler.from_samples(read_steps(gold_steps))
        examples = [e for e in examples if e.id in labeler.gold]
        if not examples:
            raise ConfigError(f"no question of {dataset} has gold steps in {gold_steps}")
    elif teacher is not None:
        labeler = TeacherLabeler(load_model(teacher), rewarder.kb_names)
    else:
        err_console.print(
            "[yellow]note:[/] no --teacher or --gold-steps: only final-answer steps (gold "
            "targets) are trained"
        )
    examples = select_examples(examples, limit, seed=cfg.seed, stratify=True)
    registry = KBRegistry.from_config(kbs)
    factory = (
        gguf_rollout_model(Path(cfg.output_dir) / "rollout-gguf")
        if rollout_backend == "gguf"
        else None
    )
    rollout = engine_rollout(registry, cfg, model_factory=factory)
    return asyncio.run(
        train_step_grpo_on_policy(
            examples, cfg, rollout, labeler=labeler, rewarder=rewarder, progress=True
        )
    )


def synth_command(
    dataset: str = typer.Option(
        ..., "--dataset", "-d", help="Training questions: a dataset name or jsonl:<path>."
    ),
    teacher: str = typer.Option(..., "--teacher", help="Teacher model spec (see kbrouter ask)."),
    kbs: Path | None = typer.Option(None, "--kbs", help="kbs.toml (default: the demo KBs)."),
    out: Path = typer.Option(..., "--out", "-o", help="Step samples JSONL to write."),
    threshold: float = typer.Option(
        1.0, "--threshold", help="Keep trajectories whose final F1-Recall reaches this."
    ),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="Use N questions."),
    seed: int = typer.Option(0, "--seed", help="Selection and sampling seed."),
    temperature: float = typer.Option(0.0, "--temperature", help="Teacher sampling temperature."),
    attempts: int = typer.Option(
        1,
        "--attempts",
        min=1,
        help="Trajectories per question at most (rejection sampling): a dropped question is "
        "run again at --retry-temperature with the seed moved by the attempt, until one passes.",
    ),
    retry_temperature: float = typer.Option(
        0.7, "--retry-temperature", help="Teacher sampling temperature of attempts after the first."
    ),
    max_steps: int = typer.Option(3, "--max-steps", min=0, help="Retrieval-step budget."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Questions in flight."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Replay cache folder."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Shared data folder."),
    paper_format: bool = typer.Option(
        False, "--paper-format", help="Also write <out>.paper.jsonl in the released format."
    ),
    gold_kbs: bool = typer.Option(
        True,
        "--gold-kbs/--free-kbs",
        help="Hold the teacher to each question's gold KBs, hop by hop, where the dataset "
        "has them (the prompt is unchanged; the route grammar narrows the choice).",
    ),
    dedupe: bool = typer.Option(
        True,
        "--dedupe/--no-dedupe",
        help="Cut a kept trajectory at its first repeated step (same sub-question, same KB), "
        "which becomes a stop sample.",
    ),
    router_prompt: str = typer.Option(
        "full",
        "--router-prompt",
        help="Router prompt variant the teacher sees (and the samples carry): full|compact|terse.",
    ),
    exclude: Path | None = typer.Option(
        None,
        "--exclude",
        help="JSON file of question ids never to use (a list, or {'ids': [...]} such as "
        "gold-paths' <out>.holdout.json): keeps validation questions out of training data.",
    ),
) -> None:
    """Run a teacher through the engine and keep correct trajectories as step samples.

    Resumable: questions already recorded in ``<out>.progress.jsonl`` are skipped and their
    samples kept.
    """
    from kbrouter.engine.engine import Engine, EngineConfig
    from kbrouter.errors import ConfigError
    from kbrouter.eval.datasets import load_dataset, select_examples
    from kbrouter.kb.registry import KBRegistry
    from kbrouter.models.registry import load_model
    from kbrouter.policies.prompts import ROUTER_PROMPTS
    from kbrouter.policies.r1router import PAPER_READING, R1RouterPolicy
    from kbrouter.train.steps import read_steps, write_paper_steps
    from kbrouter.train.synth import GoldKBRouter, synthesize_async
    from kbrouter.types import SamplingParams

    with cli_errors():
        if router_prompt not in ROUTER_PROMPTS:
            raise ConfigError(f"--router-prompt must be one of {ROUTER_PROMPTS}")
        if attempts > 1 and retry_temperature <= 0.0:
            raise ConfigError(
                "--attempts > 1 needs --retry-temperature > 0 (a greedy re-run repeats the first)"
            )
        kbs_path = kbs or DEMO_CONFIG
        if kbs is None:
            err_console.print(f"[yellow]note:[/] no --kbs given; using the demo KBs {kbs_path}")
        registry = KBRegistry.from_config(kbs_path)
        ds = load_dataset(dataset, data_dir=data_dir).with_kb_names(registry.infos)
        pool = ds.examples
        if exclude is not None:
            held = _read_ids(exclude)
            pool = [ex for ex in pool if ex.id not in held]
        examples = select_examples(pool, limit, seed=seed, stratify=True)
        # the teacher decides, as in the paper, on the paper's reading path: every step
        # sample is the teacher's own output (no rewritten sub-questions or shortcuts)
        options: dict[str, Any] = {
            "min_retrieval_steps": 0,
            "router_prompt": router_prompt,
            **PAPER_READING,
        }
        known = {kb.name for kb in registry.infos}
        gold = {
            ex.id: ex.gold_kbs
            for ex in examples
            if ex.gold_kbs and set(ex.gold_kbs) <= known  # only gold KBs this config has
        }
        if gold_kbs and not gold:
            err_console.print("[yellow]note:[/] no gold KBs to hold the teacher to (free routing)")
        policy = GoldKBRouter(gold, **options) if gold_kbs else R1RouterPolicy(**options)
        progress_path = out.with_name(out.name + ".progress.jsonl")
        done = _synth_progress(progress_path, out)
        todo = [ex for ex in examples if ex.id not in done]
        if done:
            err_console.print(f"resuming: {len(done)} questions done, {len(todo)} to go")
        elif out.exists():
            out.unlink()
        out.parent.mkdir(parents=True, exist_ok=True)
        engine = Engine(
            load_model(teacher),
            registry,
            policy,
            EngineConfig(
                max_steps=max_steps,
                concurrency=concurrency,
                seed=seed,
                cache_dir=cache_dir,
                sampling=SamplingParams(temperature=temperature, seed=seed),
            ),
        )
        from rich.progress import Progress

        with (
            out.open("a", encoding="utf-8") as fh,
            progress_path.open("a", encoding="utf-8") as pfh,
            Progress(console=err_console) as bar,
        ):
            task = bar.add_task("synthesising", total=len(todo))

            def on_example(ex: Any, traj: Any, kept: list) -> None:
                for s in kept:
                    fh.write(s.model_dump_json() + "\n")
                fh.flush()
                # the attempt that ended the question (its sampling seed is seed + attempt)
                attempt = int(traj.config.get("engine", {}).get("seed", seed)) - seed
                record = {"id": ex.id, "kept": bool(kept), "answer": traj.answer}
                pfh.write(json.dumps({**record, "attempt": attempt}) + "\n")
                pfh.flush()
                bar.advance(task)

            try:
                report = asyncio.run(
                    synthesize_async(
                        todo,
                        engine,
                        threshold,
                        concurrency=concurrency,
                        on_example=on_example,
                        dedupe=dedupe,
                        attempts=attempts,
                        retry_temperature=retry_temperature,
                    )
                )
            finally:
                engine.close()
        samples = read_steps(out) if out.is_file() and out.stat().st_size else []
        if paper_format and samples:
            write_paper_steps(samples, out.with_name(out.stem + ".paper.jsonl"))
    console.print(
        f"kept {report.kept}/{report.total} trajectories this run "
        f"(dropped: {dict(report.dropped) or 'none'}; cut at a repeated step: "
        f"{report.deduplicated}; kept by attempt: {dict(sorted(report.kept_at_attempt.items()))}"
        f", {report.runs} trajectories run); {len(samples)} step samples in {out}"
    )


@train_app.command("gold-paths")
def gold_paths_command(
    dataset: str = typer.Option(
        ..., "--dataset", "-d", help="Questions with gold KBs (and evidence): mkqa-mini, jsonl:<p>."
    ),
    kbs: Path = typer.Option(..., "--kbs", help="kbs.toml whose KB names the gold KBs use."),
    out: Path = typer.Option(..., "--out", "-o", help="Step samples JSONL to write."),
    holdout: int = typer.Option(
        0,
        "--holdout",
        min=0,
        help="Leave out a seeded, source-stratified subset of N questions (for validation); "
        "their ids are written to <out>.holdout.json.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out subset."),
    top_k: int = typer.Option(2, "--top-k", min=1, help="Evidence shown per KB (engine top-k)."),
    router_prompt: str = typer.Option(
        "compact",
        "--router-prompt",
        help="Router prompt variant of the samples: compact|terse|full.",
    ),
    first_hops_of_dropped: bool = typer.Option(
        False,
        "--first-hops-of-dropped",
        help="Also emit the first router step of questions dropped for a retrieval miss "
        "(origin gold-path-first-hop): the first gold KB is the right route either way.",
    ),
    relevance_margin: str = typer.Option(
        "default",
        "--relevance-margin",
        help="Relevance margin of the evidence a sub-answer sample shows, as the engine's "
        "policy applies it: 'default' (R1-Router's default), 'none' (the top-k as retrieved) "
        "or a number in [0, 1]. Match the policy the trained model will run with.",
    ),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Shared data folder."),
) -> None:
    """Assemble router and sub-answer step samples along the gold KB path of each question,
    retrieving with the real KBs (see kbrouter.train.gold_paths)."""
    from kbrouter.errors import ConfigError
    from kbrouter.eval.datasets import load_dataset, select_examples
    from kbrouter.kb.registry import KBRegistry
    from kbrouter.policies.prompts import ROUTER_PROMPTS
    from kbrouter.train.gold_paths import GoldPathBuilder
    from kbrouter.train.steps import write_steps

    with cli_errors():
        if router_prompt not in ROUTER_PROMPTS:
            raise ConfigError(f"--router-prompt must be one of {ROUTER_PROMPTS}")
        margin = _margin_option(relevance_margin)
        examples = load_dataset(dataset, data_dir=data_dir).examples
        held: list[str] = []
        if holdout:
            held = [e.id for e in select_examples(examples, holdout, seed=seed, stratify=True)]
            examples = [e for e in examples if e.id not in set(held)]
        registry = KBRegistry.from_config(kbs)
        registry.build(progress=True)
        builder = GoldPathBuilder(
            registry,
            top_k=top_k,
            router_prompt=router_prompt,  # type: ignore[arg-type]
            first_hops_of_dropped=first_hops_of_dropped,
            **margin,
        )
        report = builder.build(examples)
        write_steps(report.samples, out)
        if held:
            from kbrouter.files import atomic_write_text

            atomic_write_text(
                out.with_name(out.name + ".holdout.json"),
                json.dumps({"seed": seed, "ids": sorted(held)}, indent=2),
            )
    console.print(
        f"gold paths: kept {report.kept}/{report.total} questions "
        f"(dropped: {dict(report.dropped) or 'none'}"
        + (f"; first hops of {report.first_hops} of them" if report.first_hops else "")
        + f"); {len(report.samples)} step samples "
        f"{report.counts()} in {out}"
    )


@train_app.command("export")
def export_command(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="A training run's final folder (LoRA adapter or full model)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="GGUF file to write."),
    quant: str = typer.Option("q4_k_m", "--quant", help="f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0."),
    router_prompt: str = typer.Option(
        "auto",
        "--router-prompt",
        help="Prompt variant the model was trained with: auto (the one its SFT run recorded), "
        "compact or full.",
    ),
    base_model: str | None = typer.Option(
        None, "--base-model", help="Base model of a LoRA run (default: from its run info)."
    ),
    llama_cpp_dir: Path | None = typer.Option(
        None,
        "--llama-cpp-dir",
        help="llama.cpp sources with convert_hf_to_gguf.py (default: $KBROUTER_LLAMA_CPP, else "
        "unpacked once from the installed llama-cpp-python's source archive).",
    ),
) -> None:
    """Merge LoRA, convert with llama.cpp's converter, quantise, and record the prompt variant:
    run it with --model llama-cpp:<out>."""
    from kbrouter.train.export import export_gguf

    with cli_errors():
        path = export_gguf(
            checkpoint,
            out,
            quant=quant,
            router_prompt=router_prompt,
            base_model=base_model,
            llama_cpp_dir=llama_cpp_dir,
        )
    size = path.stat().st_size / 2**20
    console.print(f"wrote {path} ({size:.0f} MiB, {quant}); run it with --model llama-cpp:{path}")


def register(app: typer.Typer) -> None:
    """Add ``synth`` and the ``train`` group to the main app."""
    app.command("synth")(synth_command)
    app.add_typer(train_app, name="train")


def _read_ids(path: Path) -> set[str]:
    """Question ids from a JSON list or an object with an ``ids`` list."""
    from kbrouter.errors import ConfigError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read question ids from {path}: {e}") from e
    ids = data.get("ids") if isinstance(data, dict) else data
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ConfigError(f"{path} must hold a list of question ids or {{'ids': [...]}}")
    return set(ids)


def _synth_progress(progress_path: Path, out: Path) -> set[str]:
    """Ids of the questions a resumed synthesis has finished. A corrupt or truncated progress
    line (an interrupted write) is skipped, with a warning naming its line, so that question is
    run again; samples in ``out`` of questions not recorded as done are dropped (atomically), so
    re-running them cannot duplicate samples."""
    from kbrouter.files import iter_jsonl

    if not (progress_path.is_file() and out.is_file()):
        return set()

    def bad(lineno: int, problem: str) -> None:
        err_console.print(
            f"[yellow]note:[/] {progress_path}:{lineno}: {problem}; that question is run again"
        )

    done: set[str] = set()
    for _, rec in iter_jsonl(progress_path, what="synthesis progress file", on_bad_line=bad):
        if isinstance(rec.get("id"), str):
            done.add(rec["id"])
    kept, dropped = [], 0
    for _, rec in iter_jsonl(out, what="synthesised steps", on_bad_line=lambda n, p: None):
        if rec.get("trajectory_id") in done:
            kept.append(json.dumps(rec, ensure_ascii=False))
        else:
            dropped += 1
    if dropped:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, out)
        err_console.print(f"[yellow]note:[/] dropped {dropped} samples of unfinished questions")
    return done


def _margin_option(value: str) -> dict[str, float | None]:
    """``--relevance-margin`` as GoldPathBuilder keyword arguments (empty: the default)."""
    from kbrouter.errors import ConfigError

    text = value.strip().lower()
    if text == "default":
        return {}
    if text == "none":
        return {"relevance_margin": None}
    try:
        margin = float(text)
    except ValueError:
        margin = -1.0
    if not 0.0 <= margin <= 1.0:
        raise ConfigError(
            f"--relevance-margin must be 'default', 'none' or a number in [0, 1], not {value!r}"
        )
    return {"relevance_margin": margin}
