"""`engram model ...`: make and inspect checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from engram_core.config import FAMILIES
from jobs.nightly_cli import _fail, checkpoint_problem, directory_problem, fail_json

model_app = typer.Typer(help="Make and inspect model checkpoints (base + Engram + shared adapter).", no_args_is_help=True)


@model_app.command("init")
def init(
    directory: Path = typer.Argument(..., help="New checkpoint directory."),
    tiny: bool = typer.Option(False, "--tiny", help="Build a small seeded model and tokenizer locally."),
    family: str = typer.Option("llama", help=f"Model family for --tiny: {', '.join(FAMILIES)}."),
    adapter: bool = typer.Option(True, help="Include a shared LoRA adapter."),
    seed: int = typer.Option(0, help="Seed for weights and hashing."),
    hidden: int = typer.Option(96, "--hidden", min=16,
                               help="Hidden size of the --tiny model (a multiple of 8). 96 (the default) recalls "
                                    "dozens of facts of one template per user (contacts' phone numbers); 64 does "
                                    "not, 128 a little more, at ~2x the compile time (bench/RESULTS.md)."),
    layers: int = typer.Option(4, "--layers", min=2, help="Decoder layers of the --tiny model (Engram at 1 and the last)."),
) -> None:
    """Write a checkpoint. Example: engram model init ./tiny --tiny [--hidden 128]"""
    from engram_core.tiny import init_tiny

    if not tiny:
        raise typer.BadParameter("only --tiny is supported: bring your own checkpoint in the layout of "
                                 "engram_core/checkpoint.py (base/, tokenizer/, engram/, adapter/)")
    if family not in FAMILIES:
        _fail(f"--family {family}: unknown model family; choose one of {', '.join(FAMILIES)}", code=2)
    if hidden % 8:
        _fail(f"--hidden {hidden}: must be a multiple of 8 (4 attention heads of an even width); e.g. 64 or 128", code=2)
    problem = directory_problem(directory, "model directory")
    if problem:
        _fail(problem, code=2)
    try:
        fp = init_tiny(directory, family=family, adapter=adapter, seed=seed, hidden=hidden, layers=layers)
    except FileExistsError as err:  # a directory that is not empty: a bad argument
        _fail(str(err), code=2)
    typer.echo(f"wrote {directory} (fingerprint {fp[:16]})")


@model_app.command("info")
def info(directory: Path = typer.Argument(..., help="Checkpoint directory."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Show a checkpoint's Engram config and fingerprint. Example: engram model info ./tiny"""
    from engram_core.checkpoint import CheckpointError, adapter_base_mismatch, fingerprint
    from engram_core.config import ConfigError, EngramConfig

    problem = _checkpoint_problem(directory)
    if problem:
        fail_json(as_json, problem, 2, "inspected")
    try:
        config = EngramConfig.load(directory / "engram" / "config.json")
        has_adapter = (directory / "adapter").is_dir()
        out = {"path": str(directory), "fingerprint": fingerprint(directory), "engram": config.to_dict(),
               "adapter": has_adapter,
               "adapter_base_mismatch": adapter_base_mismatch(directory) if has_adapter else None}
    except (ConfigError, CheckpointError, OSError) as err:
        fail_json(as_json, str(err), 1, "inspected")
    typer.echo(json.dumps(out, indent=None if as_json else 2))


@model_app.command("accept-adapter")
def accept_adapter(directory: Path = typer.Argument(..., help="Checkpoint directory.")) -> None:
    """Accept adapter/ for this base/ although it records another base (the fingerprint changes).
    An adapter that already fits this base/ is left as it is (same fingerprint: no recompile).
    Example: engram model accept-adapter ./my-model"""
    from engram_core.checkpoint import (
        ADAPTER_BASE_FILE,
        CheckpointError,
        adapter_base_mismatch,
        fingerprint,
        write_base_record,
    )

    problem = _checkpoint_problem(directory)
    if problem:
        _fail(problem, code=2)
    try:
        problem = adapter_base_mismatch(directory)
        if problem is None and (directory / "adapter").is_dir():
            # Nothing to accept: rewriting the record (its "how" says who accepted it) would change the
            # fingerprint, and with it force every user's recompile on the next night.
            why = (f"adapter/{ADAPTER_BASE_FILE} already records this base/"
                   if (directory / "adapter" / ADAPTER_BASE_FILE).is_file()
                   else "nothing in adapter/ names another base")
            typer.echo(f"adapter/ already fits this base/ ({why}); nothing changed: fingerprint "
                       f"{fingerprint(directory)[:16]} as before, no recompile needed")
            return
        write_base_record(directory, how="accepted by an operator (engram model accept-adapter)")
    except CheckpointError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if problem:
        typer.echo(f"accepted despite: {problem}")
    typer.echo(f"adapter/ now belongs to this base/; fingerprint {fingerprint(directory)[:16]} "
               "(the next night on it needs recompile_all: true in the job spec, --recompile-all on the command line)")


def _checkpoint_problem(directory: Path) -> str | None:
    """None for a directory holding a checkpoint's folders; else one line naming the path and what
    to give instead (not there, a file, a folder of something else: a bad argument)."""
    return checkpoint_problem(directory, f"checkpoint {directory}", missing="no such directory")


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
