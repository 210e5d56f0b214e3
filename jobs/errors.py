"""How a failed command exits: 2 for a bad argument or request, 1 for a run that failed.

One table (:data:`BAD_REQUEST_ERRORS`) decides, for every command and for the job entrypoint of a
submitted night (jobs.schedule.main); nothing here imports the modules it names.
"""

from __future__ import annotations

import sys


BAD_REQUEST_ERRORS = (
    ("versions.store", "StoreNotFound"),  # a local store directory or an S3 bucket that is not there
    ("versions.store", "BadStoreURI"),  # a store URI that names no store (s4://, s3:// without a bucket)
    ("pipeline.ingest", "FactLogNotFound"),  # a fact_log path or URI that names nothing to read
    ("jobs.spec", "SpecError"),  # a job spec (or the flags that make one) that is invalid
    ("pipeline.stats", "StatsQueryError"),  # an SQL error in a stats query
    ("pipeline.runner", "RayUnreachable"),  # a ray_address that takes no connection
    ("versions.errors", "UnknownVersion"),  # a version that does not exist or was collected (rollback --to)
    ("pipeline.plan", "FingerprintMismatch"),  # a night's model is not the store's (and no recompile_all)
    ("serving.pull", "FingerprintMismatch"),  # a --model that is not the one the store's version was compiled for
    ("serving.chat", "ChatTemplateError"),  # a --chat-template that is not UTF-8 Jinja
)
"""(module, class) of the errors that mean the command asked for something wrong: exit 2, wherever
they are raised (a command, the console script's last resort); every other error is a run or a store
that failed (or a damaged input), exit 1. The one table that decides 2 against 1 (:func:`exit_code`).
By name, so that classifying an error imports nothing (an error of a module not imported is none)."""


def exit_code(exc: BaseException) -> int:
    """2 for a bad argument or request (:data:`BAD_REQUEST_ERRORS`), 1 for anything else."""
    kinds = tuple(getattr(sys.modules[module], name) for module, name in BAD_REQUEST_ERRORS if module in sys.modules)
    return 2 if isinstance(exc, kinds) else 1


def one_line(message: str) -> str:
    """``message`` as one line: a library's multi-line text (DuckDB's caret under the query, a YAML
    parser's context) joined with spaces, lines of only ``^`` markers dropped."""
    lines = [line.strip() for line in str(message).splitlines()]
    return " ".join(line for line in lines if line and set(line) != {"^"})
