"""Errors the serving node answers requests with, and its settings read from the environment."""

from __future__ import annotations

import os


def seconds_from_env(name: str, default: float) -> float:
    """``$name`` as seconds above 0 where set, else ``default``; ValueError naming the variable,
    its value and the default for any other value (the node refuses to start: exit 2)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{name}={text!r}: give seconds above 0 (default {default:g}), or unset it")
    return seconds


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
