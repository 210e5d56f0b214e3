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
    if verbose:  # also where logging was configured before (basicConfig then changes nothing)
        logging.getLogger().setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()


HARMLESS_LIBRARY_WARNINGS = (
    # peft reads transformers' deprecated alias while loading an adapter (transformers 5.x)
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)
"""(category, message regex) of library warnings that say nothing to an operator; the CLI hides
exactly these (warnings.filterwarnings), every other warning still shows."""


def quiet_libraries() -> None:
    """No library progress bars on the CLI's stderr (transformers' "Loading weights" and "Writing
    model shards", Hugging Face Hub's) and none of :data:`HARMLESS_LIBRARY_WARNINGS`. The night's
    own progress bar (rich, jobs.nightly), errors and every other warning are untouched. An
    operator's HF_HUB_DISABLE_PROGRESS_BARS wins; set it to 0 to see the bars again."""
    import sys
    import warnings

    # read when transformers and huggingface_hub are imported (later: the CLI imports neither to start)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] not in ("0", "false", "False") and "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging  # imported already (a test, an embedding program)

        hf_logging.disable_progress_bar()
    for category, message in HARMLESS_LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


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


def _verbose_after_the_command(ctx, param, value: bool) -> None:
    """``-v`` given after the subcommand (``engram model init DIR --tiny -v``): as before it."""
    if value:
        logging.getLogger().setLevel(logging.INFO)


def cli_command():
    """The click command of :data:`app` with ``-v/--verbose`` accepted after any subcommand too
    (the app's callback takes it only before one: ``engram -v CMD``)."""
    import copy

    root = typer.main.get_command(app)
    verbose = next(p for p in root.params if p.name == "verbose")

    def add(command) -> None:
        for sub in getattr(command, "commands", {}).values():
            if not {opt for p in sub.params for opt in getattr(p, "opts", ())} & {"-v", "--verbose"}:
                option = copy.copy(verbose)  # typer's own option class (it vendors its own click)
                option.callback, option.expose_value, option.is_eager = _verbose_after_the_command, False, True
                sub.params.append(option)
            add(sub)

    add(root)
    return root


def run() -> None:
    """The ``engram`` console script: the app, with a store or input that turns out damaged or
    unreadable reported as one line (exit 1; 2 for a bad argument such as a store URI that names no
    store, :func:`jobs.nightly_cli.exit_code`) instead of a traceback; ``-v`` shows the traceback.
    With ``--json``, stdout also gets the command's failure object (``{key: false, "error": ...,
    "exit_code": N}``, key from :data:`jobs.nightly_cli.JSON_FAILURE_KEYS`). Errors outside these
    kinds (bugs) keep their traceback. Once the command has ended, a first SIGTERM or Ctrl-C is
    ignored and a second exits at once with the command's code (:func:`_finished`)."""
    import sys

    from jobs.nightly_cli import JSON_FAILURE_KEYS

    args = sys.argv[1:]
    command = next((a for a in args if not a.startswith("-")), "")
    _terminate_as_interrupt()
    code = 1  # (an error that is not SystemExit: a bug's traceback)
    try:
        _run(args, command, JSON_FAILURE_KEYS.get(command, "ok"))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        raise
    finally:
        _finished(code)


def _run(args: list[str], command: str, key: str) -> None:
    """:func:`run`'s body: the command, and its errors as one line."""
    import json
    import sys

    import pyarrow as pa

    from jobs.nightly_cli import exit_code, one_line
    from versions.errors import PublishError
    from versions.store import StoreError

    try:
        if "--json" in args:
            _stdout_for_json_only()
            _run_for_json(key, command)
        else:
            try:
                cli_command().main(prog_name="engram")
            except (SystemExit, KeyboardInterrupt) as exc:
                # (a command that stops cleanly on Ctrl-C, as `engram serve`, exits 0 and stays so)
                if _SIGNALLED and not (isinstance(exc, SystemExit) and exc.code in (0, None)):
                    _interrupted(key, command, False)
                raise
    except (PublishError, StoreError, ValueError, OSError, pa.ArrowException) as exc:
        if "-v" in args or "--verbose" in args:
            raise
        message, code = one_line(f"{type(exc).__name__}: {exc}"), exit_code(exc)  # 2: a bad argument (a store URI, ...)
        if "--json" in args:
            print(json.dumps({key: False, "error": message, "exit_code": code}), flush=True)
        print(f"error: {message} (run with -v for the traceback)", file=sys.stderr)
        sys.exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so a command unwinds
    (a night closes its compile pool) and ``--json`` still prints its failure object (exit 143)."""


_SIGNALLED: list[str] = []  # the signal that interrupted this command ("SIGINT", "SIGTERM")


def _on_signal(signum, frame) -> None:
    import signal

    name = signal.Signals(signum).name
    if not _SIGNALLED:
        _SIGNALLED.append(name)
    raise Terminated() if name == "SIGTERM" else KeyboardInterrupt()


def _terminate_as_interrupt() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt (:class:`Terminated`) in this process and are
    remembered, so the command can say it was interrupted (typer turns any KeyboardInterrupt into
    exit 130 silently); pipeline.runner.start_ray keeps the SIGTERM handler over the one ray.init
    sets, which exits with no word of why."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _after_end):  # (_after_end: an earlier run())
            signal.signal(signal.SIGINT, _on_signal)
    _ENDED.clear()


class _MainThreadStdout:
    """``sys.stdout`` under ``--json``: the command's own output (written by the main thread) goes to
    the original stdout, whatever another thread writes goes to stderr. Ray's driver forwards its
    workers' and raylet's log lines from a thread of its own to ``sys.stdout`` (``(raylet) Task
    CompileWorker.compile failed ... will be retried`` after a Ctrl-C), which put them on stdout
    after the failure object."""

    def __init__(self, stdout, stderr) -> None:
        self._stdout, self._stderr = stdout, stderr

    def _stream(self):
        import threading

        return self._stdout if threading.current_thread() is threading.main_thread() else self._stderr

    def write(self, text: str) -> int:
        return self._stream().write(text)

    def writelines(self, lines) -> None:
        self._stream().writelines(lines)

    def flush(self) -> None:
        self._stream().flush()

    def __getattr__(self, name: str):  # fileno, isatty, encoding, buffer, ...: the original stdout's
        return getattr(self._stdout, name)


def _stdout_for_json_only() -> None:
    """With ``--json`` stdout holds the command's one JSON object and nothing else: file descriptor 1
    goes to stderr for the rest of the process (and the processes it starts: Ray's raylet and
    workers, whose log lines used to land on stdout), and ``sys.stdout`` writes the main thread's
    output to the original stdout, other threads' to stderr (:class:`_MainThreadStdout`)."""
    import os
    import sys

    try:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no such descriptors (an embedding host): leave stdout as it is
        return
    # Ray's log deduplication holds repeated lines back and prints their summary ("[repeated 3x
    # across cluster]") from the main thread as Ray shuts down, after the command's JSON; without
    # it every forwarded line comes from Ray's log thread, so to stderr. A setting of the user's wins.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.stdout = _MainThreadStdout(os.fdopen(saved, "w", buffering=1, encoding="utf-8", errors="replace"), sys.stderr)


_ENDED: list[int] = []  # the exit code a command ended with, then each signal that came after


def _finished(code: int) -> None:
    """The command has ended and said how (its output, its exit ``code``): a SIGTERM or Ctrl-C from
    now on cannot contradict them. One that came while Ray and torch shut down (a scheduler's stop
    just after a night published) raised in their exit hooks: a traceback under a night whose
    ``--json`` said ``published: true``. The first such signal is ignored; a second ends the process
    at once with ``code`` (an exit that hangs, on a thread or Ray's shutdown, can still be stopped)."""
    import signal
    import threading

    _ENDED[:] = [code]
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, _after_end)


def _after_end(signum, frame) -> None:
    import os

    _ENDED.append(signum)
    if len(_ENDED) > 2:  # [code, first signal, second signal]
        os._exit(_ENDED[0])


def _interrupted(key: str, command: str, as_json: bool) -> None:
    """Ctrl-C (SIGINT) or SIGTERM: one ``error:`` line (with ``--json`` the failure object too), and
    exit 130 / 143 (128 + the signal)."""
    import json
    import sys

    name = _SIGNALLED[0]
    code = 143 if name == "SIGTERM" else 130
    message = f"interrupted ({name})"
    if command in ("run", "demo"):
        message += ("; nothing was published unless CURRENT already moved (engram versions says); run the night "
                    "again: it resumes from the chunks it had compiled (kept under partial/ in the store)")
    if as_json:
        print(json.dumps({key: False, "error": message, "exit_code": code}), flush=True)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _run_for_json(key: str, command: str = "") -> None:
    """The app for a command line holding ``--json``: a command line that cannot be parsed (an
    unknown option, a missing required one, a value of the wrong type) also prints the failure
    object, ``{key: false, "error": "usage: ...", "exit_code": 2}``, before click's usage message
    on stderr, so a script reading stdout gets one JSON object whatever went wrong."""
    import json
    import sys

    try:
        code = cli_command().main(prog_name="engram", standalone_mode=False)
    except typer.TyperException as exc:  # click's UsageError, BadParameter, NoSuchOption, MissingParameter, ...
        exit_code = getattr(exc, "exit_code", 1)
        print(json.dumps({key: False, "error": f"usage: {exc.format_message()}", "exit_code": exit_code}), flush=True)
        exc.show()
        sys.exit(exit_code)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C at a prompt: as click's own main
        if _SIGNALLED:
            _interrupted(key, command, True)
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    if _SIGNALLED and code == 130:  # typer returns 130 for any KeyboardInterrupt
        _interrupted(key, command, True)
    if isinstance(code, int) and not isinstance(code, bool):  # typer.Exit(code) returns it outside standalone mode
        sys.exit(code)


if __name__ == "__main__":
    run()
