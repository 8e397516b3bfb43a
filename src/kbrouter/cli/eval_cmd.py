"""``kbrouter eval`` (run a method on a dataset) and ``kbrouter report`` (tables and plots)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from kbrouter.cli.common import (
    DEMO_CONFIG,
    cli_errors,
    console,
    err_console,
    parse_options,
    parse_purpose_models,
)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def eval_command(
    dataset: str = typer.Option(
        ...,
        "--dataset",
        "-d",
        help="mkqa-mini, 2wiki, infoseek, dynvqa, webqa, openwikitable, tabfact or jsonl:<path>.",
    ),
    method: str = typer.Option(
        ...,
        "--method",
        "-m",
        help="direct, cot, single-kb:<kb>, all-kbs, iterretgen, ircot, r1-router, "
        "learned-router / hybrid (--option router=DIR), random-kb, oracle-kb (upper bound) "
        "or oracle-evidence (reading ceiling).",
    ),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="Evaluate N questions."),
    model: str = typer.Option("llama-cpp", "--model", help="Model spec (e.g. openai:<m>@<url>)."),
    model_for: list[str] = typer.Option(
        [],
        "--model-for",
        help="PURPOSE=SPEC (repeatable): another model for one call purpose (route, "
        "sub_answer, final, generate, read), e.g. read=llama-cpp:qwen2.5-coder-1.5b writes the "
        "SQL table reader's queries with the 1.5B preset.",
    ),
    kbs: Path | None = typer.Option(
        None, "--kbs", help="kbs.toml of the knowledge bases (default: the demo KBs)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Results directory (default runs/eval/<dataset>/<method>)."
    ),
    seed: int = typer.Option(0, "--seed", help="Sampling and selection seed."),
    stratify: bool = typer.Option(
        False, "--stratify", help="With --limit: a seeded sample stratified by source."
    ),
    source: list[str] = typer.Option(
        [], "--source", help="Only questions of this source (repeatable), e.g. wtq."
    ),
    paper_compat: bool = typer.Option(
        False, "--paper-compat", help="Golds and metric exactly as the released R1-Router code."
    ),
    image_dir: Path | None = typer.Option(
        None, "--image-dir", help="Folder holding the question images (InfoSeek/Dyn-VQA/WebQA)."
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Shared data folder (default ../shared/data or env)."
    ),
    max_steps: int = typer.Option(3, "--max-steps", min=0, help="Retrieval-step budget."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Evidence items per KB shown."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Questions in flight."),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Replay cache for model calls and retrievals."
    ),
    option: list[str] = typer.Option(
        [], "--option", help="Method setting key=value (repeatable), e.g. iterations=3."
    ),
    no_messages: bool = typer.Option(
        False, "--no-messages", help="Do not store prompt messages in results.jsonl."
    ),
) -> None:
    """Evaluate a method on a dataset; results are written incrementally and resumable."""
    from kbrouter.engine.engine import EngineConfig
    from kbrouter.eval.harness import run_eval

    with cli_errors():
        kbs_path = kbs
        if kbs_path is None:
            kbs_path = DEMO_CONFIG
            err_console.print(f"[yellow]note:[/] no --kbs given; using the demo KBs {kbs_path}")
        out_dir = out or Path("runs") / "eval" / _slug(dataset) / _slug(method)
        engine = EngineConfig(
            max_steps=max_steps, top_k=top_k, concurrency=concurrency, cache_dir=cache_dir
        )
        try:
            summary = run_eval(
                dataset,
                method,
                engine,
                model,
                out_dir,
                limit,
                seed,
                stratify,
                kbs=kbs_path,
                paper_compat=paper_compat,
                image_dir=image_dir,
                data_dir=data_dir,
                sources=source or None,
                method_options=parse_options(option),
                keep_messages=not no_messages,
                purpose_models=parse_purpose_models(model_for),
            )
        except KeyboardInterrupt:
            err_console.print(
                f"[yellow]interrupted.[/] Finished questions are saved in {out_dir}; run the same "
                "command again to resume."
            )
            raise typer.Exit(130) from None
    routing = summary.get("routing", {})
    console.print(
        f"[bold]{method}[/] on [bold]{summary.get('dataset')}[/]: "
        f"F1-Recall {summary.get('f1_recall') or 0:.2f} over {summary['questions']} questions; "
        f"{routing.get('retrieval_calls_per_question') or 0:.2f} retrievals/question; "
        f"results in {out_dir}"
    )


def report_command(
    dirs: list[Path] = typer.Argument(..., help="Results directories (or folders holding them)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder (default: <first dir>/report)."
    ),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the PNG plots."),
) -> None:
    """Tables (markdown + JSON, paper Table 1 layout) and plots from results directories."""
    from kbrouter.eval.report import render_markdown, write_report

    with cli_errors():
        out_dir = out or (dirs[0] if len(dirs) == 1 else dirs[0].parent) / "report"
        rep = write_report(dirs, out_dir, plots=not no_plots)
    console.print(render_markdown(rep).split("\n## ")[0], markup=False, highlight=False)
    console.print(f"wrote {', '.join(str(p) for p in rep.files)}")


def register(app: typer.Typer) -> None:
    """Add ``eval`` and ``report`` to the main app."""
    app.command("eval")(eval_command)
    app.command("report")(report_command)
