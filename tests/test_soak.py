"""Soak: a serving node's pull client through many publish / rollback cycles.

What must hold however long a node runs: memory stays flat (old versions are released, not
accumulated), and after every poll the node serves exactly the version CURRENT names, with the
deltas that version published (every swap lands on a complete, verified version).
"""

from __future__ import annotations

import gc
import pathlib
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from serving.pull import PullClient
from tests.harness import publish_deltas, random_delta
from versions.catalog import list_versions, read_current
from versions.layout import shard_of
from versions.rollback import rollback

CYCLES = 200
WARM_UP = 20
NUM_SHARDS = 2
USERS = [f"user-{i}" for i in range(6)]
PYTHON_GROWTH_LIMIT = 192 * 1024  # bytes of Python objects retained after warm-up (about 45 KiB measured)
ARROW_GROWTH_LIMIT = 64 * 1024  # Arrow pool bytes (decoded bundles) beyond the warm-up level (~0 measured)


def python_and_arrow_bytes() -> tuple[int, int]:
    """Live Python allocations (traced) and Arrow pool bytes, after a full collection.

    Allocations made inside pathlib are left out: pathlib interns path parts, and the
    interpreter's intern table resizes in one multi-MB block now and then, whoever triggers it.
    """
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, pathlib.__file__)])
    return sum(stat.size for stat in snapshot.statistics("filename")), pa.total_allocated_bytes()


@pytest.mark.slow
def test_a_pull_client_through_200_publish_and_rollback_cycles_stays_flat_and_always_serves_current(
        local_store, tiny, tmp_path):
    rng = np.random.default_rng(0)
    published: dict[int, dict] = {}  # version -> {user: delta} as published (what the node must serve)
    client = PullClient(local_store, tiny, shards=None, cache_dir=tmp_path / "cache")

    def check_poll() -> None:
        result = client.poll()
        current, _ = read_current(local_store)
        assert result.error is None and result.version == current.version == client.index.version
        for user in USERS:
            want = published[current.version].get(user)
            got = client.deltas_for(user)
            assert (got[0].equals(want) if want is not None else got == ()), (current.version, user)

    tracemalloc.start()
    try:
        for cycle in range(CYCLES):
            if cycle == WARM_UP:
                start_python, start_arrow = python_and_arrow_bytes()
            user = USERS[cycle % len(USERS)]
            changed = {user: random_delta(tiny, rng, rows=2)}
            shard = shard_of(user, NUM_SHARDS)
            current = read_current(local_store)
            base = dict(published[current[0].version]) if current else {}
            mine = {u: d for u, d in base.items() if shard_of(u, NUM_SHARDS) == shard} | changed
            manifest = publish_deltas(local_store, tiny, base | changed if current is None else mine,
                                      num_shards=NUM_SHARDS, shards=None if current is None else [shard])
            published[manifest.version] = base | changed
            for old in [v for v in published if v < manifest.version - 12]:  # older ones are never targets
                del published[old]
            check_poll()

            if cycle % 2 == 1:  # every other cycle, roll back to some earlier published version
                choices = [v.version for v in list_versions(local_store) if v.version != manifest.version]
                rollback(local_store, int(rng.choice(choices[-10:])), reason="soak", actor="test")
                check_poll()
        end_python, end_arrow = python_and_arrow_bytes()
    finally:
        tracemalloc.stop()

    assert manifest.version == CYCLES
    assert end_python - start_python < PYTHON_GROWTH_LIMIT, (start_python, end_python)
    assert end_arrow - start_arrow < ARROW_GROWTH_LIMIT, (start_arrow, end_arrow)
