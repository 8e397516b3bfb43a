"""``kbrouter ask``: answer one question with R1-Router, showing the trace live."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from kbrouter.cli.common import (
    DEMO_CONFIG,
    cli_errors,
    console,
    err_console,
    parse_options,
    parse_purpose_models,
)


def ask(
    question: str = typer.Argument(..., help="The question."),
    image: Path | None = typer.Option(None, "--image", help="An image the question is about."),
    kbs: Path = typer.Option(DEMO_CONFIG, "--kbs", "-c", help="The kbs.toml registry file."),
    model: str = typer.Option(
        "llama-cpp",
        "--model",
        "-m",
        help="Chat backend spec: llama-cpp[:preset|path.gguf], openai:<model>@<url>, "
        "transformers:<path>; backend settings after ';', e.g. 'openai:m@url;vision=true'.",
    ),
    model_for: list[str] = typer.Option(
        [],
        "--model-for",
        help="PURPOSE=SPEC (repeatable): another model for one call purpose (route, "
        "sub_answer, final, generate, read), e.g. read=llama-cpp:qwen2.5-coder-1.5b.",
    ),
    max_steps: int = typer.Option(3, "--max-steps", min=0, help="Retrieval-step budget."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Evidence items per KB shown."),
    as_json: bool = typer.Option(False, "--json", help="Print only the trajectory JSON."),
    no_grammar: bool = typer.Option(
        False, "--no-grammar", help="Do not constrain router decoding with a grammar."
    ),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    min_steps: int | None = typer.Option(
        None,
        "--min-steps",
        min=0,
        help="Retrieval steps required before the router may stop (default: the method's own, "
        "as in `eval`: 1 for r1-router and random-kb, 0 for learned-router and hybrid; 0 is "
        "the paper's setting).",
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Replay cache folder (re-asking is then instant)."
    ),
    method: str = typer.Option(
        "r1-router", "--method", help="r1-router, learned-router, hybrid, random-kb, all-kbs, ..."
    ),
    router: Path | None = typer.Option(
        None, "--router", help="Saved learned router (learned-router, hybrid)."
    ),
    option: list[str] = typer.Option(
        [],
        "--option",
        help="Method setting key=value (repeatable), as in eval: e.g. table_reader=rows, "
        "continue_after_entity=false, min_retrieval_steps=0.",
    ),
) -> None:
    """Answer QUESTION step by step: route sub-questions to KBs, retrieve, answer."""
    from kbrouter.engine.engine import Engine, EngineConfig
    from kbrouter.types import Question

    with cli_errors():
        if not question.strip():
            raise typer.BadParameter("the question is empty", param_hint="QUESTION")
        if image is not None:
            from kbrouter.encoders.image import open_rgb

            open_rgb(image)  # ImageError names the file if it is missing or undecodable
            image = image.resolve()
        # a bad method or setting fails before any work
        policy = _policy(method, router, min_steps, parse_options(option))
        for_purpose = parse_purpose_models(model_for)
        registry = _open_registry(kbs, quiet=as_json)
        chat_model = _load_model(model, quiet=as_json)
        extra = {p: _load_model(spec, quiet=as_json) for p, spec in for_purpose.items()}
        trace = None if as_json else _LiveTrace()
        engine = Engine(
            chat_model,
            registry,
            policy,
            EngineConfig(
                max_steps=max_steps,
                top_k=top_k,
                seed=seed,
                use_grammar=not no_grammar,
                cache_dir=cache_dir,
            ),
            on_event=trace,
            purpose_models=extra,
        )
        try:
            traj = engine.answer_sync(Question(text=question.strip(), image=image))
        finally:
            engine.close()
            registry.close()
    if as_json:
        sys.stdout.write(traj.model_dump_json(indent=2) + "\n")
    else:
        assert trace is not None
        trace.summary(traj)
    if traj.error:
        err_console.print(f"[bold red]error:[/] {traj.error}", highlight=False)
        raise typer.Exit(1)


def _policy(
    method: str, router: Path | None, min_steps: int | None, extra: dict[str, Any] | None = None
) -> Any:
    from kbrouter.policies.baselines import make_policy

    key = method.strip().lower()
    options: dict[str, Any] = dict(extra or {})
    if min_steps is not None and key in (
        "r1-router",
        "r1router",
        "learned-router",
        "hybrid",
        "random-kb",
    ):
        options["min_retrieval_steps"] = min_steps
    if router is not None:
        options["router"] = str(router)
    return make_policy(method, **options)


def _open_registry(config: Path, *, quiet: bool) -> Any:
    """The KB registry, building any missing or out-of-date index with a progress bar."""
    from kbrouter.kb.registry import KBRegistry, RichBuildProgress

    registry = KBRegistry.from_config(config)
    todo = [n for n in registry.names if registry.status(n).state != "fresh"]
    if todo:
        err_console.print(
            f"[dim]building index for {', '.join(todo)} (first use; cached afterwards)[/]"
        )
        with RichBuildProgress(console=err_console) as bar:
            registry.build(todo, progress=bar)
    return registry


def _load_model(spec: str, *, quiet: bool) -> Any:
    from kbrouter.models.registry import load_model

    model = load_model(spec)
    load = getattr(model, "load", None)
    if callable(load):  # in-process backends: load now, under a spinner, not mid-trace
        with err_console.status(f"loading model {spec} …"):
            load()
    return model


class _LiveTrace:
    """Prints :class:`~kbrouter.engine.events.TraceEvent` s as they arrive."""

    def __call__(self, event: Any) -> None:
        from rich.markup import escape

        step = event.step
        if event.kind == "route" and step is not None and step.action is not None:
            console.rule(f"[bold]step {step.index + 1}", align="left")
            if step.action.think:
                console.print(f"[dim]think: {escape(step.action.think)}[/]")
            if step.action.is_stop:
                console.print("[green]router: enough information — answering[/]")
            else:
                console.print(f"[bold]sub-question:[/] {escape(step.action.sub_question or '')}")
                console.print(f"[bold]knowledge base:[/] [cyan]{', '.join(step.action.kbs)}[/]")
        elif event.kind == "retrieve" and step is not None:
            for r in step.retrievals:
                if r.error:
                    console.print(f"  [red]{r.kb}: search failed: {escape(r.error)}[/]")
                    continue
                if not r.evidence:
                    console.print(f"  [yellow]{r.kb}: no results[/]")
                for ev in r.evidence[:3]:
                    label = escape(ev.title or ev.text[:60])
                    console.print(f"  [cyan]{r.kb}[/] {ev.score:.3f} [dim]{ev.id}[/] {label}")
        elif event.kind == "sub_answer" and step is not None:
            console.print(f"[bold]sub-answer:[/] {escape(step.sub_answer or '')}")
        elif event.kind == "note":
            console.print(f"[yellow]note: {escape(event.message)}[/]")

    def summary(self, traj: Any) -> None:
        from rich.markup import escape
        from rich.panel import Panel

        n_ret = len(traj.retrievals())
        facts = (
            f"stop: {traj.stop_reason} · {len(traj.steps)} step(s) · {n_ret} retrieval(s) · "
            f"{traj.prompt_tokens}+{traj.completion_tokens} tokens · {traj.seconds:.1f}s"
        )
        # The facts go below the panel: as a subtitle they are cut to the answer's width.
        console.print(Panel(escape(traj.answer or "(no answer)"), title="answer", expand=False))
        console.print(f"[dim]{escape(facts)}[/]")


def register(app: typer.Typer) -> None:
    """Add ``ask`` to the main app."""
    app.command("ask")(ask)
