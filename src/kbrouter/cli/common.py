"""Shared CLI helpers: error presentation and the default (demo) config location."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

from kbrouter.config import DEMO_CONFIG
from kbrouter.errors import KBRouterError

__all__ = ["DEMO_CONFIG", "cli_errors", "console", "err_console"]

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn kbrouter errors into a one-paragraph message and exit code 2 (no traceback)."""
    try:
        yield
    except KBRouterError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from None
