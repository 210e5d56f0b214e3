"""The S3 test server's start-up: ports it cannot lose to an outgoing connection, and a retry when one is taken.

CI once failed 67 tests because the kernel gave the S3 port to one of weed's own start-up
connections (the port came from the ephemeral range) and weed exited with "address already in use".
"""

from __future__ import annotations

import json
import socket

import pytest

import tests.conftest as conftest
from tests.conftest import GRPC_OFFSET, WEED_SPAN, PortTaken, S3Server, _ephemeral_range, _stop, start_weed


def test_test_server_ports_lie_outside_the_ephemeral_range_and_rays_worker_ports():
    low, high = _ephemeral_range()
    for _ in range(50):
        base = conftest._free_base_port()
        ports = [p + twin for p in range(base, base + WEED_SPAN) for twin in (0, GRPC_OFFSET)]
        assert all(not low <= p <= high for p in ports), (base, low, high)
        assert all(p >= 20000 for p in ports)  # Ray's workers bind 10002-19999


def _config(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "s3.json").write_text(json.dumps({"identities": [{
        "name": "t", "credentials": [{"accessKey": "k", "secretKey": "secret-k"}], "actions": ["Admin"]}]}))


def _server_at(base: int) -> S3Server:
    return S3Server(f"http://127.0.0.1:{base + 3}", "k", "secret-k")


def _hold(port: int) -> socket.socket:
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("127.0.0.1", port))  # bound, not listening: weed's bind fails, a connection is refused
    return held


def test_a_taken_s3_port_is_reported_as_taken_and_a_fresh_range_is_tried(tmp_path, monkeypatch):
    conftest._weed_binary()
    taken_base = conftest._free_base_port()
    held = _hold(taken_base + 3)  # the S3 port, the last weed binds, as in the CI failure
    try:
        _config(tmp_path / "once")
        with pytest.raises(PortTaken, match="address already in use"):
            start_weed(tmp_path / "once", _server_at, 10, base=taken_base, attempts=1)

        picks = iter([taken_base])
        real_pick = conftest._free_base_port
        monkeypatch.setattr(conftest, "_free_base_port", lambda: next(picks, None) or real_pick())
        _config(tmp_path / "retry")
        process, base = start_weed(tmp_path / "retry", _server_at, 10)
        try:
            assert base != taken_base
            client = _server_at(base).client()
            client.create_bucket(Bucket="after-retry")
            client.put_object(Bucket="after-retry", Key="k", Body=b"v")
            assert client.get_object(Bucket="after-retry", Key="k")["Body"].read() == b"v"
        finally:
            _stop(process)
    finally:
        held.close()
