"""The `engram` command: one entry point for the pipeline's verbs.

Each area registers its commands from its own module (``register(app)``), so this file only
assembles them. Every command that touches a store takes ``--store URI`` (a local path or
``s3://bucket/prefix``); machine-readable output is behind ``--json``.
"""

from __future__ import annotations

import logging
import os

import typer

app = typer.Typer(
    name="engram",
    help="Compile users' facts into Engram row deltas and publish them as versioned bundles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details to stderr.")) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _register_all() -> None:
    from jobs import model_cli, nightly_cli

    for module in (model_cli, nightly_cli):
        module.register(app)
    for optional in ("serve_cli", "ops_cli", "schedule_cli"):
        try:
            module = __import__(f"jobs.{optional}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"jobs.{optional}":
                raise
            continue
        module.register(app)


_register_all()

if __name__ == "__main__":
    app()
