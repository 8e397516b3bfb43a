"""Shared CLI helpers: error presentation and the default (demo) config location."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console

from kbrouter.errors import KBRouterError

console = Console()
err_console = Console(stderr=True)

DEMO_CONFIG = Path(__file__).resolve().parents[3] / "demo" / "kbs.toml"
"""The repo's demo KBs (used when no --kbs/--config is given in a source checkout)."""


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn kbrouter errors into a one-paragraph message and exit code 2 (no traceback)."""
    try:
        yield
    except KBRouterError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from None
