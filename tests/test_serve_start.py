"""A serving node started before its store has anything for it waits, not ready, and starts serving
when there is; a node started while its store hangs answers /healthz at once.

Before 2026-12-02 `engram serve` started before the first night had published exited 1 ("nothing
published yet"), or 2 for a local store whose directory the night had not created yet: on Kubernetes
a crash loop with back-off while the first night ran. A node started while its store accepted
connections and never answered answered nothing for over 5 minutes (botocore's read timeout times
its attempts, for the read of CURRENT and again for the first poll) before serving its last-good.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from serving.http import ReferenceServer
from serving.pull import PullClient
from tests.conftest import free_port
from tests.test_pull import FACTS, cli_app, compiled, publish, v1, v2  # noqa: F401
from tests.test_serve_outage import _health, _node_env, _request, _wait_for, flaky  # noqa: F401
from versions.models import publish_model
from versions.store import open_store

REPO = Path(__file__).resolve().parent.parent


def _serve(store: str, cache, port: int, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--store", store, "--cache-dir", str(cache),
                             "--port", str(port), "--interval", "0.3", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop(node: subprocess.Popen) -> str:
    node.terminate()
    return node.communicate(timeout=60)[1]


def test_engram_serve_started_before_the_first_night_waits_not_ready_and_serves_the_first_version(
        tiny, tiny_dir, compiled, tmp_path):
    """The store's directory not created yet, then created empty, then a first version: the node
    answers /healthz 503 no_version naming the store throughout, refuses users' requests, and serves
    the first version once it is published, with the model that version names."""
    root = tmp_path / "store"  # a first night creates it
    trigger, answer = FACTS["alice"][0]
    ask = {"model": "engram", "prompt": trigger, "user": "alice", "max_tokens": len(tiny.encode_answer(answer))}
    port = free_port()
    node = _serve(str(root), tmp_path / "cache", port, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        health = _wait_for(lambda: (h := _health(port))["status"] != "starting" and h, node)  # (the port answers
        assert health["status"] == "no_version" and health["version"] is None  # "starting" before the first poll)
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # as a load balancer's health check
        kept.request("GET", "/healthz")
        first = kept.getresponse()
        first.read()
        assert first.status == 503
        assert f"store {root}: no such directory" in health["reason"] and "waiting for a night to create it" \
               in health["reason"]
        status, said = _request(port, "POST", "/v1/completions", ask)
        assert status == 503 and said["error"]["code"] == "no_version"

        root.mkdir()
        health = _wait_for(lambda: "nothing published yet" in (h := _health(port))["reason"] and h, node)
        assert health["status"] == "no_version" and f"{root.as_uri()}: nothing published yet (no CURRENT)" \
               in health["reason"]
        status, said = _request(port, "GET", "/healthz")
        assert status == 503

        store = open_store(str(root))
        publish_model(store, tiny_dir)  # as a night does: the model, then the version that names it
        publish(store, tiny, v1(compiled))
        health = _wait_for(lambda: (h := _health(port))["version"] == 1 and h, node, timeout=180)
        assert health["status"] == "ok" and health["model"] == f"engram-{tiny.fingerprint[:12]}"
        kept.request("GET", "/healthz")  # the starting node ended that connection: a new one, served
        again = kept.getresponse()
        assert again.status == 200 and json.loads(again.read())["status"] == "ok"
        kept.close()
        status, said = _request(port, "POST", "/v1/completions", ask)
        assert status == 200 and said["choices"][0]["text"] == answer
    finally:
        stderr = _stop(node)
    assert "warning: not serving yet" in stderr and "serving v1 (2 users)" in stderr


def test_a_node_stopped_while_it_waits_for_a_first_version_exits_0_as_a_serving_one(tmp_path):
    """SIGTERM (a pod stopped before the first night) while the node waits, not ready: exit 0 and
    one line saying so, as for a node stopped while serving (it exited 143 with an error)."""
    root = tmp_path / "store"
    root.mkdir()
    port = free_port()
    node = _serve(str(root), tmp_path / "cache", port, env={**os.environ, "PYTHONPATH": str(REPO)})
    health = _wait_for(lambda: (h := _health(port))["status"] != "starting" and h, node)  # (the first poll ended)
    assert health["status"] == "no_version"
    stderr = _stop(node)
    assert node.returncode == 0, stderr
    assert "engram serve: stopped before serving a version" in stderr and "error" not in stderr


def test_a_node_with_no_version_refuses_users_and_serves_the_base_model_without_one(local_store, tiny, compiled):
    """`engram serve --model DIR` before the first night: the model is known, the users' memories
    are not. A request naming a user gets 503 no_version (it got the base model, as if the user had
    no memory); one with no user gets the base model, as past --max-stale."""
    client = PullClient(local_store, tiny)
    assert "nothing published yet" in client.poll().error and client.index is None
    trigger, answer = FACTS["alice"][0]
    ask = {"model": "engram", "prompt": trigger, "user": "alice", "max_tokens": len(tiny.encode_answer(answer))}
    with ReferenceServer(tiny, client, port=0, poll=False) as server:
        status, health = _request(server.port, "GET", "/healthz")
        assert status == 503 and health["status"] == "no_version" and health["version"] is None
        assert health["reason"].startswith(f"no version of {local_store.uri} is loaded yet: ") and \
               "nothing published yet" in health["reason"]
        status, said = _request(server.port, "POST", "/v1/completions", ask)
        assert status == 503 and said["error"]["code"] == "no_version" and said["error"]["param"] == "user"
        anonymous = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/completions", json.dumps(
            {k: v for k, v in ask.items() if k != "user"}).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(anonymous, timeout=60) as response:
            said = json.loads(response.read())
            assert response.headers["X-Engram-Memory"] == "base" and "X-Engram-Version" not in response.headers
        assert said["engram"]["memory"] == "base" and said["engram"]["version"] is None  # (it said version "None")

        publish(local_store, tiny, v1(compiled))
        assert client.poll().error is None
        status, health = _request(server.port, "GET", "/healthz")
        assert status == 200 and health["status"] == "ok" and health["reason"] is None
        status, said = _request(server.port, "POST", "/v1/completions", ask)
        assert status == 200 and said["choices"][0]["text"] == answer


def test_what_the_store_refuses_still_fails_a_starting_node_at_once(local_store, s3_server, flaky, tiny, tiny_dir,
                                                                    compiled, tmp_path, monkeypatch):
    """Waiting is for a store with nothing yet. A CURRENT deleted from a store with published
    versions (never a new store: it names the rollback), a 403, a bucket that does not exist, a
    local path whose parent is missing too (a typo) still exit at once; `pull` (one-shot) and `ask`
    on a store with nothing published exit 1; `pull --watch` keeps polling like a node."""
    from typer.testing import CliRunner

    def serve(*args: str):
        return CliRunner().invoke(cli_app(), ["serve", "--port", "0", "--cache-dir", str(tmp_path / "cache"), *args])

    empty = tmp_path / "empty"
    empty.mkdir()
    for command in (["pull"], ["ask", "--user", "alice", "hi"]):
        out = CliRunner().invoke(cli_app(), [*command, "--store", str(empty), "--cache-dir", str(tmp_path / "cache")])
        assert out.exit_code == 1 and "nothing published yet (no CURRENT)" in out.stderr, (command, out.output)
    watched = CliRunner().invoke(cli_app(), ["pull", "--watch", "--polls", "2", "--interval", "0", "--json", "--store",
                                             str(empty), "--cache-dir", str(tmp_path / "cache")])
    reports = [json.loads(line) for line in watched.stdout.splitlines()]
    assert watched.exit_code == 1 and len(reports) == 2 and not any(r["pulled"] for r in reports)
    assert "nothing published yet" in reports[0]["error"] and reports[-1]["exit_code"] == 1

    monkeypatch.setenv("ENGRAM_HUNG_POLL_S", "soon")
    out = serve("--store", str(empty))
    assert out.exit_code == 2 and out.stderr == "error: ENGRAM_HUNG_POLL_S='soon': give seconds above 0 (default 60), " \
                                                 "or unset it\n"
    monkeypatch.delenv("ENGRAM_HUNG_POLL_S")
    monkeypatch.setenv("ENGRAM_WEDGED_BATCH_S", "-5")
    out = serve("--store", str(empty))
    assert out.exit_code == 2 and out.stderr == "error: ENGRAM_WEDGED_BATCH_S='-5': give seconds above 0 (default " \
                                                 "300), or unset it\n"
    monkeypatch.delenv("ENGRAM_WEDGED_BATCH_S")

    publish_model(local_store, tiny_dir)
    publish(local_store, tiny, v1(compiled))
    (local_store.root / "CURRENT").unlink()
    started = time.monotonic()
    out = serve("--store", str(local_store.root))
    assert out.exit_code == 1 and "is missing, but the store holds published versions" in out.stderr
    assert f"engram rollback --store {local_store.uri} --to 1" in out.stderr

    out = serve("--store", str(tmp_path / "no-such-parent" / "store"))
    assert out.exit_code == 2 and "no such directory" in out.stderr
    out = serve("--store", "s3://a/../b")
    assert out.exit_code == 2 and "s3://a/../b" in out.stderr and out.stderr.count("\n") == 1, out.output

    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.endpoint_url)
    out = serve("--store", f"s3://{flaky.bucket}-none/engram")
    assert out.exit_code == 2 and "does not exist" in out.stderr, out.output
    flaky.up(refuse_reads={"/CURRENT": 403})
    out = serve("--store", flaky.uri)
    assert out.exit_code == 1 and "no permission to read CURRENT" in out.stderr, out.output
    assert time.monotonic() - started < 60  # none of them waited


def test_a_node_started_while_its_store_hangs_answers_healthz_at_once_and_serves_its_last_good(
        s3_store, flaky, tiny, tiny_dir, compiled, tmp_path, monkeypatch):
    """A store that accepts connections and never answers (a frozen server, a load balancer with no
    live backend). Before, `engram serve` answered nothing for over 5 minutes and `ask` took as
    long; now the port answers /healthz (503 starting) at once, and once the store has not
    answered the read of CURRENT for ENGRAM_HUNG_POLL_S (60 s by default) the node serves its
    last-good, stale; `ask` with no last-good fails in one line naming the store, without minutes."""
    from typer.testing import CliRunner

    publish_model(s3_store, tiny_dir)
    publish(s3_store, tiny, v1(compiled))
    cache = tmp_path / "cache"
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.endpoint_url)
    assert CliRunner().invoke(cli_app(), ["pull", "--store", flaky.uri, "--cache-dir", str(cache)]).exit_code == 0
    flaky.down()
    frozen = socket.socket()
    frozen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    frozen.bind(("127.0.0.1", flaky.port))
    frozen.listen(64)  # connections complete in the backlog; nothing ever reads or answers them
    trigger, answer = FACTS["alice"][0]
    port = free_port()
    node = _serve(flaky.uri, cache, port, env={**_node_env(flaky, cache), "ENGRAM_HUNG_POLL_S": "3"})
    try:
        first = _wait_for(lambda: _health(port), node)
        assert first["status"] in ("starting", "stale")  # (a loaded machine may take the 3 s to answer at all)
        health = _wait_for(lambda: (h := _health(port))["status"] == "stale" and h, node, timeout=60)
        assert health["version"] == 1 and health["stale"]["loaded_from"] == "last-good cache"
        assert "read CURRENT failed: no answer for 3s" in health["stale"]["error"]
        status, said = _request(port, "POST", "/v1/completions", {"model": "engram", "prompt": trigger, "user": "alice",
                                                                  "max_tokens": len(tiny.encode_answer(answer))})
        assert status == 200 and said["choices"][0]["text"] == answer

        monkeypatch.setenv("ENGRAM_HUNG_POLL_S", "1")
        started = time.monotonic()
        out = CliRunner().invoke(cli_app(), ["ask", "--user", "alice", trigger, "--store", flaky.uri, "--cache-dir",
                                             str(tmp_path / "cold")])
        assert out.exit_code == 1 and time.monotonic() - started < 30, out.output
        assert f"store {flaky.uri} (endpoint {flaky.endpoint_url}): read CURRENT failed: no answer for 1s" in out.stderr
        assert "holds no last-good version of this store" in out.stderr and out.stderr.count("\n") == 1

        stopping = time.monotonic()  # SIGTERM while a poll hangs: it waited 30 s for it (Kubernetes' whole grace)
        _stop(node)
        assert node.returncode == 0 and time.monotonic() - stopping < 15
    finally:
        if node.poll() is None:
            _stop(node)
        frozen.close()


def _live(port: int) -> tuple[int, dict]:
    return _request(port, "GET", "/livez")


def test_a_cold_node_whose_store_hangs_during_the_first_pull_waits_not_ready_and_serves_once_it_answers(
        s3_store, flaky, tiny, tiny_dir, compiled, tmp_path, monkeypatch):
    """The store answers the read of CURRENT (and the model), then never answers the version's
    objects. Before, `engram serve` said 503 ``starting`` for botocore's timeouts and retries (381 s
    measured), then exited 1, a crash loop; now, once the pull has had no answer for
    ENGRAM_HUNG_POLL_S, it waits as a node whose store hangs at the first read: 503 ``no_version``
    naming the wait, /livez 200, polling; SIGTERM meanwhile exits 0; and it serves the version
    once the store answers (in-process here: one node process is enough to show the exit)."""
    from jobs.serve_cli import _start
    from serving.http import StartingNode

    publish_model(s3_store, tiny_dir)
    publish(s3_store, tiny, v1(compiled))
    flaky.up(hang_gets=("/objects/",))  # the version's bundles: no answer, the connection held open
    port = free_port()
    env = {**_node_env(flaky, tmp_path / "cold"), "ENGRAM_HUNG_POLL_S": "1"}
    node = _serve(flaky.uri, tmp_path / "cold", port, env=env)
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.endpoint_url)
    monkeypatch.setenv("ENGRAM_HUNG_POLL_S", "1")
    listener = StartingNode(port=0).start()
    server, client = _start(listener, flaky.uri, None, 0.2, 32, 5.0, None, False, tmp_path / "cold-in-process", None,
                            None)
    try:
        assert client.index is None and server.health()["status"] == "no_version"
        server.start()
        for at in (port, server.port):
            health = _wait_for(lambda: (h := _health(at))["status"] == "no_version" and h, node, timeout=90)
            assert health["version"] is None and flaky.uri in health["reason"], health
            assert "the poll in progress has had no answer for" in health["reason"], health
            status, live = _request(at, "GET", "/livez")
            assert status == 200 and live["status"] == "alive" and live["ready"] is False, live
            assert _request(at, "GET", "/readyz")[0] == 503
        stopping = time.monotonic()
        stderr = _stop(node)
        assert node.returncode == 0 and time.monotonic() - stopping < 10, stderr
        assert "Traceback" not in stderr and "serving no version yet" in stderr

        flaky.up()  # the store answers again (the hung requests are dropped: botocore retries them)
        deadline = time.monotonic() + 60
        while client.index is None and time.monotonic() < deadline:
            time.sleep(0.1)
        status, health = _request(server.port, "GET", "/healthz")
        assert status == 200 and health["version"] == 1, health
        assert _request(server.port, "GET", "/livez") == (200, {"status": "alive", "ready": True, "phase": "ok"})
        trigger, answer = FACTS["alice"][0]
        status, said = _request(server.port, "POST", "/v1/completions", {
            "model": "engram", "prompt": trigger, "user": "alice", "max_tokens": len(tiny.encode_answer(answer))})
        assert status == 200 and said["choices"][0]["text"] == answer
    finally:
        server.shutdown()
        if node.poll() is None:
            _stop(node)


def test_a_warm_node_whose_first_pull_hangs_serves_its_last_good_within_the_hung_poll_bound(
        s3_store, flaky, tiny, tiny_dir, compiled, tmp_path, monkeypatch):
    """A node with a last-good in its cache restarts; the store answers the read of CURRENT (a new
    version, v2), then never answers v2's objects. Before, the first pull held the node for
    botocore's timeouts and retries (about 6 minutes) before it fell back: `engram serve` said 503
    ``no_version`` meanwhile, `engram ask` and `engram pull` waited as long. Now each serves the
    last-good (v1, stale) once the pull has had no answer for ENGRAM_HUNG_POLL_S, and the node
    moves to v2 once the store answers."""
    from typer.testing import CliRunner

    from jobs.serve_cli import _start
    from serving.http import StartingNode

    publish_model(s3_store, tiny_dir)
    publish(s3_store, tiny, v1(compiled))
    cache = tmp_path / "cache"
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.endpoint_url)
    args = ["--store", flaky.uri, "--cache-dir", str(cache), "--json"]
    assert CliRunner().invoke(cli_app(), ["pull", *args]).exit_code == 0  # the last-good: v1, its model cached
    publish(s3_store, tiny, v2(compiled))
    flaky.up(hang_gets=("/objects/",))  # v2's objects: no answer, the connection held open
    monkeypatch.setenv("ENGRAM_HUNG_POLL_S", "1")
    trigger, answer = FACTS["alice"][0]  # v1's answer (v2 changed alice's facts)

    started = time.monotonic()
    asked = CliRunner().invoke(cli_app(), ["ask", "--user", "alice", "--max-new-tokens",
                                           str(len(tiny.encode_answer(answer))), trigger, *args])
    assert asked.exit_code == 0 and time.monotonic() - started < 20, asked.output
    said = json.loads(asked.stdout.strip().splitlines()[-1])
    assert said["text"] == answer and said["version"] == 1 and said["stale"]["loaded_from"] == "last-good cache"
    assert "the poll in progress has had no answer for" in said["stale"]["error"], said
    started = time.monotonic()
    pulled = CliRunner().invoke(cli_app(), ["pull", *args])
    assert pulled.exit_code == 1 and time.monotonic() - started < 20, pulled.output  # nothing pulled: as in an outage
    report = json.loads(pulled.stdout.strip().splitlines()[-1])
    assert report["version"] == 1 and report["stale"]["loaded_from"] == "last-good cache", report

    listener = StartingNode(port=0).start()
    started = time.monotonic()
    server, client = _start(listener, flaky.uri, None, 0.2, 32, 5.0, None, False, cache, None, None)
    try:
        assert time.monotonic() - started < 20 and client.index is not None and client.index.version == 1
        server.start()
        status, health = _request(server.port, "GET", "/healthz")
        assert status == 200 and health["status"] == "stale" and health["version"] == 1, health
        assert health["stale"]["loaded_from"] == "last-good cache"
        assert "the poll in progress has had no answer for" in health["stale"]["error"], health
        status, said = _request(server.port, "POST", "/v1/completions", {
            "model": "engram", "prompt": trigger, "user": "alice", "max_tokens": len(tiny.encode_answer(answer))})
        assert status == 200 and said["choices"][0]["text"] == answer
        flaky.up()  # the store answers again (the hung requests are dropped: botocore retries them)
        deadline = time.monotonic() + 60
        while (client.index.version != 2 or client.stale() is not None) and time.monotonic() < deadline:
            time.sleep(0.1)
        status, health = _request(server.port, "GET", "/healthz")
        assert status == 200 and health["status"] == "ok" and health["version"] == 2, health
    finally:
        server.shutdown()


def test_a_cold_node_whose_store_hangs_while_it_downloads_the_model_says_which_object_and_waits(
        s3_store, flaky, tiny, tiny_dir, compiled, tmp_path, monkeypatch):
    """The store answers the read of CURRENT and the model's file list, then never answers the
    model's weights. Before, `engram serve` said 503 ``starting`` (reason: "reading ... and loading its
    model") for botocore's timeouts and retries, about 6 minutes, with nothing naming the wait, and
    `engram ask` waited as long. Now /healthz names the object the download waits for and since
    when; once it has sent nothing for ENGRAM_HUNG_POLL_S the store does not answer: the node
    waits, 503 ``no_version`` naming it, polling (ask exits 1 naming it), and serves once the store
    answers (the download under way goes on)."""
    from typer.testing import CliRunner

    publish_model(s3_store, tiny_dir)
    publish(s3_store, tiny, v1(compiled))
    flaky.up(hang_gets=(".safetensors",))  # the model's weights: no answer, the connection held open
    port = free_port()
    node = _serve(flaky.uri, tmp_path / "cold", port, env={**_node_env(flaky, tmp_path / "cold"),
                                                           "ENGRAM_HUNG_POLL_S": "2"})
    try:
        fetching = _wait_for(lambda: "fetching model" in (h := _health(port))["reason"] and h, node, timeout=60)
        assert fetching["status"] == "starting" and ".safetensors (file " in fetching["reason"], fetching
        assert "last answer" in fetching["reason"] and flaky.uri in fetching["reason"]
        started = time.monotonic()
        waiting = _wait_for(lambda: (h := _health(port))["status"] == "no_version" and h, node, timeout=30)
        assert time.monotonic() - started < 20
        assert "fetch of model" in waiting["reason"] and ".safetensors has had no answer for" in waiting["reason"]
        assert "the store does not answer" in waiting["reason"], waiting
        assert _live(port)[0] == 200

        monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.endpoint_url)
        monkeypatch.setenv("ENGRAM_HUNG_POLL_S", "1")
        started = time.monotonic()
        asked = CliRunner().invoke(cli_app(), ["ask", "--user", "alice", "hi", "--store", flaky.uri, "--cache-dir",
                                               str(tmp_path / "cold-ask")])
        assert asked.exit_code == 1 and time.monotonic() - started < 20, asked.output
        assert ".safetensors has had no answer for" in asked.stderr and asked.stderr.count("\n") == 1, asked.stderr

        flaky.up()  # the store answers again
        health = _wait_for(lambda: (h := _health(port))["status"] == "ok" and h, node, timeout=90)
        assert health["version"] == 1
    finally:
        stderr = _stop(node)
    assert node.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
