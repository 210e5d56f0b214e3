"""Test harness for the fault, security and soak tests.

Two pieces: synthetic versions (random but valid deltas published through the real
``publish_version``, so store and pull tests need no compile), and a private S3 server.

A private S3 server is for tests that stop it, restart it, or need least-privilege identities.

The session-wide ``s3_server`` fixture (conftest) has one all-powerful user. Tests of faults and
of security need more: a server they can kill and bring back on the same data and port, and
identities that hold only what each role needs (docs/security.md):

- ``admin``        creates the bucket (Admin), as an operator would once;
- ``compile-job``  the nightly job: read, write and list the one bucket (no Admin, no Tagging);
- ``serving-node`` a serving node: read the one bucket, nothing else (no list, no write).

SeaweedFS reads identities from ``-s3.config`` (``actions`` of ``Read``/``Write``/``List``/
``Tagging``/``Admin``, each optionally scoped as ``Action:bucket``); that file is the test's
stand-in for the IAM policies of docs/security.md.
"""

from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from engram_core.delta import Delta
from jobs.synthetic import publish_synthetic_night as publish_night  # noqa: F401 - the tests' name for it
from schemas.bundle import bundle_table, encode_bundle
from schemas.facts import empty_fact_state, encode_fact_state
from tests.conftest import S3Server, _stop, start_weed
from versions.catalog import read_current
from versions.layout import shard_of
from versions.publish import ShardPayload, publish_version

BUCKET = "engram-private"


# ---------------------------------------------------------------- synthetic versions


def random_delta(em, rng: np.random.Generator, rows: int = 4) -> Delta:
    """A valid delta for ``em``: ``rows`` distinct rows per Engram layer, small random values."""
    layers, row_ids = [], []
    for layer in em.config.layers:
        picked = rng.choice(em.memory.num_rows(layer), size=rows, replace=False)
        layers += [layer] * rows
        row_ids += picked.tolist()
    values = rng.normal(0, 0.5, size=(len(row_ids), em.config.row_width)).astype(np.float16)
    return Delta.from_unsorted(np.array(layers), np.array(row_ids), values)


def publish_deltas(store, em, deltas: dict, *, num_shards: int = 2, job_id: str = "test", shards=None):
    """Publish ``{user: Delta}`` as the next version (``shards``: which shards to write; default all)."""
    current = read_current(store)
    previous = current[0] if current else None
    state = encode_fact_state(empty_fact_state())
    payloads = {}
    for shard in (range(num_shards) if shards is None else shards):
        mine = {u: (d, 1) for u, d in deltas.items() if shard_of(u, num_shards) == shard}
        payloads[shard] = ShardPayload(bundle=encode_bundle(bundle_table(mine)), state=state)
    version = previous.version + 1 if previous else 1
    return publish_version(store, shard_payloads=payloads, previous=previous, fingerprint=em.fingerprint,
                           num_shards=num_shards, job_id=job_id, watermark=f"w{version}-{job_id}")


# ---------------------------------------------------------------- a private S3 server


def identities(bucket: str = BUCKET) -> dict[str, tuple[str, str, list[str]]]:
    """role -> (access key, secret key, weed actions); secrets are test-only strings."""
    return {
        "admin": ("private-admin", "private-admin-secret-0001", ["Admin", "Read", "Write", "List", "Tagging"]),
        "compile-job": ("compile-job", "compile-job-secret-0002", [f"Read:{bucket}", f"Write:{bucket}", f"List:{bucket}"]),
        "serving-node": ("serving-node", "serving-node-secret-0003", [f"Read:{bucket}"]),
    }


def weed_s3_config(bucket: str = BUCKET) -> dict:
    return {"identities": [
        {"name": role, "credentials": [{"accessKey": access, "secretKey": secret}], "actions": actions}
        for role, (access, secret, actions) in identities(bucket).items()
    ]}


@dataclass
class PrivateS3:
    """One ``weed server -s3`` on its own ports and data folder; stop() and start() keep both."""

    workdir: Path
    bucket: str = BUCKET
    base_port: int | None = None
    process: subprocess.Popen | None = None

    def _server_at(self, base: int, role: str) -> S3Server:
        access, secret, _ = identities(self.bucket)[role]
        return S3Server(f"http://127.0.0.1:{base + 3}", access, secret)

    def server(self, role: str = "admin") -> S3Server:
        if self.base_port is None:
            raise RuntimeError("this PrivateS3 was never started")
        return self._server_at(self.base_port, role)

    def start(self) -> "PrivateS3":
        """Start (or restart) on this server's ports; the first start picks them."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "s3.json").write_text(json.dumps(weed_s3_config(self.bucket)))
        self.process, self.base_port = start_weed(
            self.workdir, lambda base: self._server_at(base, "admin"), 50, "-master.electionTimeout=1s",
            base=self.base_port)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            _stop(self.process)
        self.process = None

    def kill(self) -> None:
        """Die like a crashed server: SIGKILL, no grace."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def env(self, role: str) -> dict[str, str]:
        """The AWS environment a process of ``role`` would have."""
        server = self.server(role)
        return {
            "AWS_ENDPOINT_URL": server.endpoint_url,
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_DEFAULT_REGION": server.region,
            "AWS_CONFIG_FILE": "/nonexistent/engram-test-aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/engram-test-aws-credentials",
        }


def use_role(monkeypatch, s3: PrivateS3, role: str) -> None:
    """Point this process's AWS settings at ``s3`` as ``role`` (stores opened afterwards use it)."""
    for name, value in s3.env(role).items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)


@contextmanager
def private_s3(workdir: Path) -> Iterator[PrivateS3]:
    """A started private server with its bucket created (by the admin); stopped on exit."""
    s3 = PrivateS3(workdir).start()
    try:
        s3.server("admin").client().create_bucket(Bucket=s3.bucket)
        yield s3
    finally:
        s3.stop()


def rewrite_as_schema_1(store, manifest) -> None:
    """Overwrite a published manifest in place with what engram wrote before manifest schema 2:
    no tombstones objects, no stats parts (a test of reading and upgrading old stores)."""
    import json as _json

    legacy = manifest.to_dict()
    legacy.update(schema_version=1, stats={})
    for shard in legacy["shards"]:
        for name in ("tombstones_key", "tombstones_sha256", "tombstones_bytes", "stats"):
            shard.pop(name)
    store.put(manifest.key, _json.dumps(legacy).encode())


# ---------------------------------------------------------------- erasure scans


def value_rows(delta: Delta) -> list[bytes]:
    """The delta's rows as the float16 bytes a bundle or layer stores them in (one entry per row)."""
    values = np.asarray(delta.values, np.float16)
    return [values[i].tobytes() for i in range(values.shape[0])]


def holds_user(data: bytes, user_id: str, rows: list[bytes]) -> bool:
    """Whether an object (any file: Parquet read column by column, anything else as bytes) holds
    ``user_id`` (as a value of any string or string-list column, or in its bytes) or one of the
    user's delta rows (inside a ``values`` blob, or in its bytes)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if user_id.encode() in data or any(row in data for row in rows):
        return True
    if not data.startswith(b"PAR1"):
        return False
    table = pq.read_table(pa.BufferReader(data))
    for column in table.columns:
        if pa.types.is_list(column.type):
            column = pc.list_flatten(column)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            if pc.any(pc.equal(column, user_id)).as_py():
                return True
        if pa.types.is_binary(column.type) and any(row in blob for blob in column.to_pylist() if blob for row in rows):
            return True
    return False


def store_objects_holding(store, user_id: str, rows: list[bytes]) -> list[str]:
    return [key for key in store.list("") if holds_user(store.get(key), user_id, rows)]


def files_holding(root, user_id: str, rows: list[bytes]) -> list[str]:
    return [str(p) for p in sorted(Path(root).rglob("*")) if p.is_file() and holds_user(p.read_bytes(), user_id, rows)]
