"""``kbrouter serve``: the HTTP API (see :mod:`kbrouter.serve.app`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from kbrouter.cli.common import DEMO_CONFIG, cli_errors, err_console, parse_purpose_models


def serve_command(
    kbs: Path = typer.Option(DEMO_CONFIG, "--kbs", "-c", help="kbs.toml of the KBs to serve."),
    model: str = typer.Option("llama-cpp", "--model", "-m", help="Chat backend spec."),
    model_for: list[str] = typer.Option(
        [],
        "--model-for",
        help="PURPOSE=SPEC (repeatable): another model for one call purpose (route, "
        "sub_answer, final, generate, read), as in `kbrouter ask`.",
    ),
    router: Path | None = typer.Option(
        None, "--router", help="Saved learned router (adds learned-router and hybrid)."
    ),
    method: str = typer.Option("r1-router", "--method", help="Default method."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8000, "--port", help="Port."),
    api_key_env: str | None = typer.Option(
        None, "--api-key-env", help="Environment variable holding the API key clients must send."
    ),
    max_concurrent: int = typer.Option(8, "--max-concurrent", min=1, help="Questions at once."),
    results: list[Path] = typer.Option(
        [],
        "--results",
        help="An evaluation results directory the trace viewer may browse (repeatable).",
    ),
    otlp_endpoint: str | None = typer.Option(
        None,
        "--otlp-endpoint",
        help="OTLP/HTTP collector for OpenInference spans, e.g. http://127.0.0.1:4318 "
        "(default: no tracing).",
    ),
) -> None:
    """Serve kbrouter over HTTP: /v1/answer (with streamed steps), an OpenAI-compatible
    /v1/chat/completions, /v1/search, /v1/kbs; OpenAPI at /openapi.json."""
    from kbrouter.cli.ask_cmd import _load_model, _open_registry
    from kbrouter.serve.app import create_app

    with cli_errors():
        key = _api_key(api_key_env)
        config = _config(method, router, max_concurrent, api_key=key, otlp_endpoint=otlp_endpoint)
        for_purpose = parse_purpose_models(model_for)  # a bad one fails before any loading
        registry = _open_registry(kbs, quiet=False)
        chat_model = _load_model(model, quiet=False)
        extra = {p: _load_model(spec, quiet=False) for p, spec in for_purpose.items()}
        app = create_app(chat_model, registry, config, purpose_models=extra)
    import uvicorn

    err_console.print(
        f"serving on http://{host}:{port} (trace viewer at /, OpenAPI at /openapi.json)"
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _api_key(env: str | None) -> str | None:
    """The API key held by the environment variable ``env`` (None: no auth)."""
    from kbrouter.errors import ConfigError

    if not env:
        return None
    key = os.environ.get(env)
    if not key:
        raise ConfigError(f"--api-key-env {env}: that variable is not set")
    return key


def _config(method: str, router: Path | None, max_concurrent: int, **extra: Any) -> Any:
    from kbrouter.serve.app import ServeConfig

    methods = ["r1-router", "all-kbs", "iterretgen", "direct"]
    if router is not None:
        methods += ["learned-router", "hybrid"]
    if method not in methods:
        methods.insert(0, method)
    return ServeConfig(
        default_method=method,
        methods=methods,
        router=str(router) if router else None,
        max_concurrent=max_concurrent,
        **extra,
    )


def mcp_command(
    kbs: Path = typer.Option(DEMO_CONFIG, "--kbs", "-c", help="kbs.toml of the KBs to serve."),
    model: str = typer.Option("llama-cpp", "--model", "-m", help="Chat backend spec."),
    model_for: list[str] = typer.Option(
        [],
        "--model-for",
        help="PURPOSE=SPEC (repeatable): another model for one call purpose (route, "
        "sub_answer, final, generate, read), as in `kbrouter ask`.",
    ),
    router: Path | None = typer.Option(
        None, "--router", help="Saved learned router (adds learned-router and hybrid)."
    ),
    method: str = typer.Option("r1-router", "--method", help="Default method of `ask`."),
    transport: str = typer.Option(
        "stdio", "--transport", help="stdio (spawned by an agent) or http (streamable HTTP)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface (http transport)."),
    port: int = typer.Option(8001, "--port", help="Port (http transport)."),
    max_concurrent: int = typer.Option(4, "--max-concurrent", min=1, help="Questions at once."),
    api_key_env: str | None = typer.Option(
        None,
        "--api-key-env",
        help="Environment variable holding the API key HTTP clients must send (http transport).",
    ),
) -> None:
    """Serve kbrouter as an MCP server: tools list_kbs, search(kb, query, k) and ask(question)."""
    from kbrouter.cli.ask_cmd import _load_model, _open_registry
    from kbrouter.errors import ConfigError
    from kbrouter.serve.mcp import create_mcp_server

    with cli_errors():
        if transport not in ("stdio", "http"):
            raise ConfigError(f"--transport must be stdio or http, not {transport!r}")
        key = _api_key(api_key_env)
        if key and transport != "http":
            raise ConfigError("--api-key-env applies to --transport http (stdio has no clients)")
        config = _config(method, router, max_concurrent)
        for_purpose = parse_purpose_models(model_for)
        # stdout is the stdio transport's channel: progress and notes go to stderr only
        registry = _open_registry(kbs, quiet=True)
        chat_model = _load_model(model, quiet=True)
        extra = {p: _load_model(spec, quiet=True) for p, spec in for_purpose.items()}
        server = create_mcp_server(chat_model, registry, config, purpose_models=extra)
    if transport == "stdio":
        server.run("stdio")
    else:
        import uvicorn

        from kbrouter.serve.mcp import mcp_http_app

        err_console.print(f"MCP over streamable HTTP on http://{host}:{port}/mcp")
        uvicorn.run(mcp_http_app(server, key, host), host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
    app.command("mcp")(mcp_command)
