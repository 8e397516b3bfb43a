"""``kbrouter train router``, ``kbrouter route`` and ``kbrouter eval-routing``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from kbrouter.cli.common import DEMO_CONFIG, cli_errors, console


def _infos(kbs: Path) -> list[Any]:
    from kbrouter.kb.registry import KBRegistry

    return KBRegistry.from_config(kbs).infos


def _router_config(
    base: dict[str, Any], **flags: Any
) -> Any:  # flags given on the command line win over a saved config
    from pydantic import ValidationError

    from kbrouter.errors import ConfigError
    from kbrouter.routing.router import RouterConfig

    merged = {**base, **{k: v for k, v in flags.items() if v is not None}}
    try:
        return RouterConfig.model_validate(merged)
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(
            f"invalid router setting {'.'.join(map(str, first['loc']))}: {first['msg']}"
        ) from None


def train_router_command(
    data: list[Path] = typer.Option(
        [], "--data", help="Step samples (paper or kbrouter format; repeatable)."
    ),
    dataset: list[str] = typer.Option(
        [], "--dataset", "-d", help="Dataset with gold KBs in hop order (mkqa-mini, jsonl:<path>)."
    ),
    kbs: Path = typer.Option(DEMO_CONFIG, "--kbs", "-c", help="kbs.toml: the labels are its KBs."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder of the saved router."),
    classifier: str | None = typer.Option(None, "--classifier", help="logreg (default) or mlp."),
    encoder: str | None = typer.Option(None, "--encoder", help="Text encoder (default minilm)."),
    cv: int | None = typer.Option(
        None, "--cv", min=0, help="K-fold cross-validation for thresholds/metrics (0: a split)."
    ),
    val_fraction: float | None = typer.Option(None, "--val-fraction", help="Held-out share."),
    seed: int | None = typer.Option(None, "--seed", help="Split / model seed."),
    exclude_ids: Path | None = typer.Option(
        None, "--exclude-ids", help="File of question ids (one per line) kept out of training."
    ),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Shared data folder."),
) -> None:
    """Train the learned router (no LLM) and save it with its manifest."""
    from kbrouter.train.router import train_router

    with cli_errors():
        cfg = _router_config(
            {},
            classifier=classifier,
            encoder=encoder,
            cv_folds=cv,
            val_fraction=val_fraction,
            seed=seed,
        )
        excluded = None
        if exclude_ids is not None:
            excluded = {ln.strip() for ln in exclude_ids.read_text().splitlines() if ln.strip()}
        with console.status("embedding states and fitting the router..."):
            router = train_router(
                _infos(kbs),
                out,
                step_files=data,
                datasets=dataset,
                config=cfg,
                data_dir=data_dir,
                exclude_ids=excluded,
            )
    m = router.manifest
    met = m["metrics"]

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    console.print(
        f"router saved to [bold]{out}[/]: {m['data']['samples']} samples "
        f"({m['data']['groups']} questions/trajectories), labels {m['labels']}\n"
        f"held-out ({m['heldout']}): accuracy {f(met['accuracy'])}, hop-1 "
        f"{f(met['hop1_accuracy'])}, abstain recall {f(met['abstain_recall'])}, ECE "
        f"{f(met['ece'])} (n={met['n']}); thresholds none >= {m['thresholds']['none']:.3f}, "
        f"confident >= {m['thresholds']['confidence']:.3f}"
    )


def route_command(
    question: str = typer.Argument(..., help="The question."),
    router: Path = typer.Option(..., "--router", "-r", help="Folder of a saved router."),
    image: Path | None = typer.Option(None, "--image", help="The question has this image."),
    step: int = typer.Option(0, "--step", min=0, help="Step index (0: nothing retrieved yet)."),
    prev: str = typer.Option("", "--prev", help="KBs already used, comma-separated."),
    sub_question: str | None = typer.Option(None, "--sub-question", help="An LLM's sub-question."),
    as_json: bool = typer.Option(False, "--json", help="Print the distribution as JSON."),
) -> None:
    """Print the learned router's distribution over the KBs and none for one state."""
    from kbrouter.routing.router import LearnedRouter
    from kbrouter.types import RouteState

    with cli_errors():
        if image is not None and not image.is_file():
            from kbrouter.errors import ImageError

            raise ImageError(f"image not found: {image}")
        r = LearnedRouter.load(router)
        state = RouteState(
            question=question,
            has_image=image is not None,
            step=step,
            prev_kbs=[k.strip() for k in prev.split(",") if k.strip()],
            sub_question=sub_question,
        )
        dist = r.route(state)
    if as_json:
        console.print_json(dist.model_dump_json())
        return
    table = Table(title=f"route: {dist.label} (confidence {dist.confidence:.3f})")
    table.add_column("label")
    table.add_column("probability", justify="right")
    for label, p in sorted(dist.probs.items(), key=lambda kv: -kv[1]):
        table.add_row(label, f"{p:.3f}")
    console.print(table)
    sure = "confident" if r.is_confident(dist) else "not confident"
    console.print(
        f"{sure} (threshold {r.confidence_threshold:.3f}); none threshold {r.none_threshold:.3f}"
    )


def eval_routing_command(
    dataset: list[str] = typer.Option(
        [], "--dataset", "-d", help="Dataset with gold KBs (mkqa-mini, jsonl:<path>)."
    ),
    data: list[Path] = typer.Option([], "--data", help="Step samples: their router steps."),
    router: Path | None = typer.Option(None, "--router", "-r", help="A saved learned router."),
    method: str = typer.Option(
        "learned", "--method", "-m", help="learned, r1-router (prompted LLM) or random."
    ),
    cv: int = typer.Option(
        0, "--cv", min=0, help="learned: cross-validate K fresh routers on this data instead."
    ),
    kbs: Path = typer.Option(DEMO_CONFIG, "--kbs", "-c", help="kbs.toml of the KBs."),
    model: str = typer.Option("llama-cpp", "--model", help="LLM spec for --method r1-router."),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="Questions (stratified)."),
    seed: int = typer.Option(0, "--seed", help="Selection / random seed."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Shared data folder."),
) -> None:
    """Routing-only evaluation (no retrieval, no answers): accuracy, abstain, calibration."""
    with cli_errors():
        summary = run_routing_eval(
            datasets=dataset,
            step_files=data,
            router=router,
            method=method,
            cv=cv,
            kbs=kbs,
            model=model,
            limit=limit,
            seed=seed,
            out=out,
            data_dir=data_dir,
        )

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    console.print(
        f"[bold]{summary['router']}[/]: hop-1 accuracy {f(summary['hop1_accuracy'])}, accuracy "
        f"{f(summary['accuracy'])}, abstain recall {f(summary['abstain_recall'])}, ECE "
        f"{f(summary['ece'])} over {summary['n']} states ({summary['questions']} questions); "
        f"report in {out}"
    )


def run_routing_eval(
    *,
    datasets: list[str],
    step_files: list[Path],
    router: Path | None,
    method: str,
    cv: int,
    kbs: Path,
    model: str,
    limit: int | None,
    seed: int,
    out: Path,
    data_dir: Path | None,
) -> dict[str, Any]:
    from kbrouter.errors import ConfigError
    from kbrouter.eval import routing_eval as rv
    from kbrouter.eval.datasets import load_dataset, mkqa_evidence_titles, select_examples
    from kbrouter.routing.data import LabelResolver
    from kbrouter.train.router import step_route_samples
    from kbrouter.train.steps import read_steps

    if not datasets and not step_files:
        raise ConfigError("nothing to evaluate: pass --dataset and/or --data")
    infos = _infos(kbs)
    samples = []
    for name in datasets:
        ds = load_dataset(name, data_dir=data_dir)
        ds.with_kb_names(infos)
        exs = select_examples(ds.examples, limit, seed=seed, stratify=True)
        titles = mkqa_evidence_titles(data_dir) if name == "mkqa-mini" else None
        samples.extend(rv.dataset_samples(exs, infos, titles))
    for f in step_files:
        samples.extend(
            s
            for s in step_route_samples(read_steps(f), LabelResolver(infos))
            if s.state.sub_question is None  # the decision before a sub-question is written
        )
    if not samples:
        raise ConfigError("no routing states: the data has no gold KBs / router steps")
    labels = [*(i.name for i in infos), "none"]
    key = method.strip().lower()
    extra: dict[str, Any] = {
        "datasets": datasets,
        "step_files": [str(p) for p in step_files],
        "limit": limit,
        "seed": seed,
    }
    if key == "learned":
        if cv >= 2:
            from kbrouter.routing.router import RouterConfig

            cfg = RouterConfig()
            if router is not None:
                from kbrouter.routing.router import read_manifest

                cfg = RouterConfig.model_validate(read_manifest(router)["config"])
            decisions, folds = rv.predict_cross_validated(samples, labels[:-1], cfg, folds=cv)
            name = f"learned ({cfg.classifier}, {cv}-fold CV)"
            extra["folds"] = folds
        elif router is not None:
            from kbrouter.routing.router import LearnedRouter

            r = LearnedRouter.load(router, kb_names=labels[:-1])
            decisions = rv.predict_learned(r, samples)
            name = f"learned ({router})"
            extra["note"] = "a saved router scored as-is: held out only if not trained on this data"
        else:
            raise ConfigError("--method learned needs --router DIR or --cv K")
    elif key == "random":
        decisions = rv.predict_random(samples, labels, seed)
        name = "random"
    elif key in ("r1-router", "llm"):
        from kbrouter.models.registry import load_model

        chat = load_model(model)
        with console.status(f"{len(samples)} teacher-forced route calls..."):
            decisions, secs = asyncio.run(rv.predict_llm_router(chat, infos, samples, seed=seed))
        name = f"r1-router ({model})"
        extra["route_seconds_mean"] = sum(secs) / len(secs) if secs else None
    else:
        raise ConfigError(f"unknown --method {method!r}: learned, r1-router or random")
    return rv.write_routing_report(out, samples, decisions, labels, router=name, extra=extra)


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    train_app.command("router")(train_router_command)
    app.command("route")(route_command)
    app.command("eval-routing")(eval_routing_command)


__all__ = ["register", "run_routing_eval"]
