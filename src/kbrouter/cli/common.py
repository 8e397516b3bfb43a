"""Shared CLI helpers: error presentation and the default (demo) config location."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import typer
from rich.console import Console

from kbrouter.config import DEMO_CONFIG
from kbrouter.errors import KBRouterError

__all__ = ["DEMO_CONFIG", "cli_errors", "console", "err_console", "parse_options"]

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


def parse_purpose_models(items: list[str]) -> dict[str, str]:
    """``--model-for PURPOSE=SPEC`` pairs (a purpose once), checked against the call
    purposes."""
    from kbrouter.engine.engine import check_purposes
    from kbrouter.errors import ConfigError

    out: dict[str, str] = {}
    for item in items:
        purpose, sep, spec = (x.strip() for x in item.partition("="))
        if not sep or not purpose or not spec:
            raise ConfigError(f"--model-for expects PURPOSE=SPEC, got {item!r}")
        if purpose in out:
            raise ConfigError(f"--model-for names the purpose {purpose!r} twice")
        out[purpose] = spec
    check_purposes(out)
    return out


def parse_options(items: list[str]) -> dict[str, object]:
    """``key=value`` pairs; values parsed as JSON when possible (``3``, ``true``), else text."""
    from kbrouter.errors import ConfigError

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out
