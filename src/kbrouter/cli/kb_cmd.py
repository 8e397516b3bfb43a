"""``kbrouter index`` (build KB indexes) and ``kbrouter search`` (query one KB)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from kbrouter.cli.common import DEMO_CONFIG, cli_errors, console, err_console


def index(
    config: Path = typer.Option(DEMO_CONFIG, "--config", "-c", help="The kbs.toml registry file."),
    kb: list[str] = typer.Option(
        None, "--kb", help="Only this KB (name or alias); repeatable. Default: all."
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the index is up to date."),
) -> None:
    """Build (or refresh) the indexes of the configured knowledge bases."""
    from rich.table import Table

    from kbrouter.kb.registry import KBRegistry

    with cli_errors():
        reg = KBRegistry.from_config(config)
        names = [reg.resolve(n) for n in kb] if kb else None
        report = reg.build(names, force=force, progress=True, keep_going=True)
    table = Table(title=f"indexes in {reg.config.index_path}")
    for col in ("KB", "status", "items", "sources", "bad rows", "seconds", "why"):
        table.add_column(col, overflow="fold")
    for r in report.results:
        style = {"failed": "red", "up-to-date": "dim"}.get(r.status, "green")
        table.add_row(
            r.kb,
            f"[{style}]{r.status}[/]",
            str(r.n_items),
            str(r.n_source_items),
            str(len(r.bad_rows)),
            f"{r.seconds:.1f}",
            r.error or "; ".join(r.reasons),
        )
    console.print(table)
    for r in report.results:
        for bad in r.bad_rows[:10]:
            err_console.print(f"[yellow]skipped[/] {r.kb}: {bad}", highlight=False)
        if len(r.bad_rows) > 10:
            err_console.print(f"[yellow]... {len(r.bad_rows) - 10} more bad rows in {r.kb}[/]")
    if not report.ok:
        for r in report.failed:
            err_console.print(f"[bold red]error:[/] KB {r.kb!r}: {r.error}", highlight=False)
        raise typer.Exit(2)


def search(
    query: str = typer.Argument(..., help="The query text."),
    kb: str = typer.Option(..., "--kb", help="KB name or alias."),
    image: Path | None = typer.Option(None, "--image", help="A query image (image KBs)."),
    k: int = typer.Option(5, "-k", "--top-k", min=1, help="Results to return."),
    config: Path = typer.Option(DEMO_CONFIG, "--config", "-c", help="The kbs.toml registry file."),
    as_json: bool = typer.Option(False, "--json", help="Print the evidence as JSON lines."),
) -> None:
    """Search one knowledge base and print the top-k evidence."""
    from rich.markup import escape
    from rich.table import Table

    from kbrouter.errors import ImageError
    from kbrouter.kb.registry import KBRegistry
    from kbrouter.types import Query

    with cli_errors():
        if image is not None and not image.is_file():
            raise ImageError(f"query image not found: {image}")
        reg = KBRegistry.from_config(config)
        name = reg.resolve(kb)
        [hits] = reg.search(name, [Query(text=query, image=image)], k=k)
    if as_json:
        for ev in hits:
            data = ev.model_dump(mode="json", exclude_none=True)
            typer.echo(json.dumps(data, ensure_ascii=False))
        return
    table = Table(title=f"{name}: {query!r}" + (f" + {image}" if image else ""))
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("id", overflow="fold")
    table.add_column("title", overflow="fold")
    table.add_column("text", overflow="fold", ratio=3)
    for i, ev in enumerate(hits, start=1):
        text = escape(ev.text if len(ev.text) <= 300 else ev.text[:299] + "…")
        if ev.image_path is not None:
            text += f"\n[dim]{escape(str(ev.image_path))}[/]"
        table.add_row(str(i), f"{ev.score:.4f}", escape(ev.id), escape(ev.title or ""), text)
    console.print(table)
    if not hits:
        err_console.print("no results")


def register(app: typer.Typer) -> None:
    """Add ``index`` and ``search`` to the main app."""
    app.command("index")(index)
    app.command("search")(search)
