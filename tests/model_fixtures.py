"""Shared model fixtures: tiny checkpoints built locally once per test session (no model hub)."""

from __future__ import annotations

import pytest

from engram_core.checkpoint import load_checkpoint
from engram_core.tiny import init_tiny


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> checkpoint directory, built on first use."""
    built = {}

    def get(family: str = "llama"):
        if family not in built:
            path = tmp_path_factory.mktemp(f"tiny-{family}") / "model"
            init_tiny(path, family=family)
            built[family] = path
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_dir(tiny_checkpoints):
    return tiny_checkpoints("llama")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """The default tiny Llama checkpoint, loaded (treat as read-only)."""
    return load_checkpoint(tiny_dir)
