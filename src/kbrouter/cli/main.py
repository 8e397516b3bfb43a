"""The ``kbrouter`` command line. Each command group lives in its own module and registers here."""

from __future__ import annotations

import logging
import os

import typer

from kbrouter.cli import ask_cmd, eval_cmd, kb_cmd, route_cmd, serve_cmd, train_cmd

app = typer.Typer(
    name="kbrouter",
    help="Step-wise retrieval-augmented reasoning across text, image and table knowledge bases.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    # No HF_HUB_OFFLINE here: the packaged defaults load from local files, and a user with network
    # may name a hub model. The demo and the tests set it (Makefile, tests/conftest.py).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own rich bars only
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # OpenMP spin-waiting is pathological on shared CPUs; set before torch/faiss load.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


for _module in (kb_cmd, ask_cmd, eval_cmd, train_cmd, serve_cmd):
    _module.register(app)
route_cmd.register(app, train_cmd.train_app)

if __name__ == "__main__":  # pragma: no cover
    app()
