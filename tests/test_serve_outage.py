"""A serving node that restarts while its store does not answer serves its last-good version.

Before 2026-12-01 a node restarted during an S3 outage (engram serve, pull, ask) exited 1 ("read
CURRENT failed: EndpointConnectionError"), although its cache held every verified object of the
version it served. The store here is the real S3 server behind a proxy that can be stopped
(connection refused) and started again at the same endpoint, or made to answer 403/404/503.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from serving.last_good import LAST_GOOD_DIR, load_last_good, record_path, store_identity
from serving.pull import BundleCache, PullClient
from tests.conftest import free_port
from tests.s3_proxy import ConditionProxy
from tests.test_pull import FACTS, NUM_SHARDS, answers, cli_app, compiled, expected, publish, v1, v2  # noqa: F401
from versions.catalog import read_manifest
from versions.layout import shard_of
from versions.models import publish_model
from versions.store import S3Store


class FlakyStore:
    """The test bucket as a node sees it: through a proxy on a fixed port that can go down and come back."""

    def __init__(self, s3_server, bucket: str, prefix: str = "engram"):
        self.server, self.bucket, self.prefix = s3_server, bucket, prefix
        self.port = free_port()
        self.proxy: ConditionProxy | None = None
        self.up()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def up(self, refuse_reads: dict[str, int] | None = None, hang_gets: tuple[str, ...] = ()) -> None:
        self.down()
        self.proxy = ConditionProxy(self.server.endpoint_url, "pass", access_key=self.server.access_key,
                                    secret_key=self.server.secret_key, port=self.port, refuse_reads=refuse_reads,
                                    hang_gets=hang_gets)
        self.proxy.__enter__()

    def down(self) -> None:
        if self.proxy is not None:
            self.proxy.__exit__()
            self.proxy = None

    def node_store(self) -> S3Store:
        """What a node opens (2 attempts, not 5: the outage is certain here)."""
        return S3Store(self.bucket, self.prefix, endpoint_url=self.endpoint_url, max_attempts=2)


@pytest.fixture
def flaky(s3_server, s3_store):
    store = FlakyStore(s3_server, s3_store.bucket, s3_store.prefix)
    yield store
    store.down()


def test_a_node_restarted_while_the_store_is_down_serves_its_last_good_until_the_store_is_back(
        s3_store, flaky, tiny, compiled, tmp_path):
    publish(s3_store, tiny, v1(compiled))
    cache = tmp_path / "cache"
    running = PullClient(flaky.node_store(), tiny, cache_dir=cache)
    assert running.poll().error is None and running.stale() is None
    confirmed = load_last_good(cache, store_identity(flaky.node_store()), tiny.fingerprint)
    assert confirmed.manifest.version == 1 and confirmed.confirmed_at == running.confirmed_at

    flaky.down()  # the store stops answering: the running node says so, and restarts
    assert "StoreUnreachable" in running.poll().error and running.stale()["loaded_from"] == "store"
    restarted = PullClient(flaky.node_store(), tiny, cache_dir=cache)
    result = restarted.poll()
    assert result.version == 1 and result.downloaded_objects == 0
    assert "StoreUnreachable" in result.error and "did not answer" in result.error
    assert answers(tiny, restarted, "alice", "alice") == expected("alice")
    stale = restarted.stale()
    assert stale["version"] == 1 and stale["loaded_from"] == "last-good cache" and stale["error"] == result.error
    assert stale["confirmed_at"] and stale["since"] and result.stale == stale

    publish(s3_store, tiny, v2(compiled))  # a night while the node could not see it
    assert restarted.poll().version == 1 and restarted.stale()["version"] == 1  # it keeps polling
    flaky.up()
    back = restarted.poll()
    assert back.error is None and back.version == 2 and restarted.stale() is None
    assert answers(tiny, restarted, "alice", "alice-v2") == expected("alice-v2")
    assert load_last_good(cache, store_identity(flaky.node_store()), tiny.fingerprint).manifest.version == 2


@pytest.mark.parametrize("status, falls_back, said", [
    (503, True, "answered 503"),  # an overloaded or failing server: no answer about the data
    (403, False, "no permission to inspect CURRENT"),  # a bucket policy or credentials change: acted on
    (404, False, "CURRENT is missing"),  # CURRENT deleted: names the rollback that restores it
])
def test_only_a_store_that_does_not_answer_is_served_from_the_last_good(s3_store, flaky, tiny, compiled, tmp_path,
                                                                         status, falls_back, said):
    publish(s3_store, tiny, v1(compiled))
    cache = tmp_path / "cache"
    assert PullClient(flaky.node_store(), tiny, cache_dir=cache).poll().error is None
    flaky.up(refuse_reads={"/CURRENT": status})
    restarted = PullClient(flaky.node_store(), tiny, cache_dir=cache)
    result = restarted.poll()
    assert said in result.error
    if falls_back:
        assert restarted.index.version == 1 and restarted.stale()["loaded_from"] == "last-good cache"
    else:
        assert restarted.index is None and result.stale is None and "last-good" not in result.error


def test_a_damaged_cache_object_of_the_last_good_is_never_served(s3_store, flaky, tiny, compiled, tmp_path):
    manifest = publish(s3_store, tiny, v1(compiled))
    cache = tmp_path / "cache"
    assert PullClient(flaky.node_store(), tiny, cache_dir=cache).poll().error is None
    entry = manifest.shard(shard_of("alice", NUM_SHARDS))
    cached = BundleCache(cache).path(entry.shard, entry.bundle_sha256)
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    cached.write_bytes(bytes(data))

    flaky.down()
    restarted = PullClient(flaky.node_store(), tiny, cache_dir=cache)
    result = restarted.poll()
    assert restarted.index is None and result.stale is None
    assert f"last-good v1 cannot be served: cache {cache}: holds no intact copy of {flaky.uri}/{entry.bundle_key}" \
           in result.error
    assert not cached.exists()  # deleted: downloaded again once the store answers
    flaky.up()
    assert restarted.poll().error is None and answers(tiny, restarted, "alice", "alice") == expected("alice")


def test_a_damaged_last_good_record_is_refused_naming_it(s3_store, flaky, tiny, compiled, tmp_path):
    publish(s3_store, tiny, v1(compiled))
    cache = tmp_path / "cache"
    assert PullClient(flaky.node_store(), tiny, cache_dir=cache).poll().error is None
    path = record_path(cache, store_identity(flaky.node_store()), tiny.fingerprint)
    record = json.loads(path.read_text())
    record["manifest"] = record["manifest"].replace('"version": 1', '"version": 9')  # another version, same sha256
    path.write_text(json.dumps(record))

    flaky.down()
    restarted = PullClient(flaky.node_store(), tiny, cache_dir=cache)
    result = restarted.poll()
    assert restarted.index is None
    assert f"last-good record {path}: damaged (its manifest does not match the sha256 recorded with it)" in result.error


def test_the_last_good_is_kept_per_store_and_model(s3_server, s3_store, flaky, tiny, compiled, tmp_path):
    """Two stores sharing a node's cache folder: each restart serves its own store's version."""
    other_bucket = f"{s3_store.bucket}-b"
    s3_server.client().create_bucket(Bucket=other_bucket)
    other_store = S3Store(other_bucket, "engram")
    publish(s3_store, tiny, {"alice": compiled["alice"]})
    publish(other_store, tiny, {"bob": compiled["bob"]})
    other = FlakyStore(s3_server, other_bucket)
    cache = tmp_path / "cache"
    try:
        for node_store in (flaky.node_store(), other.node_store()):
            assert PullClient(node_store, tiny, cache_dir=cache).poll().error is None
        assert len(list((cache / LAST_GOOD_DIR).iterdir())) == 2
        other.down()
        restarted = PullClient(other.node_store(), tiny, cache_dir=cache)
        assert restarted.poll().stale is not None
        assert restarted.deltas_for("bob") and restarted.deltas_for("alice") == ()
        assert load_last_good(cache, store_identity(other.node_store()), "0" * 64) is None  # another model: none
    finally:
        other.down()


def test_nodes_with_other_shards_sharing_a_cache_each_fall_back_to_their_own_last_good(s3_store, flaky, tiny, compiled,
                                                                                      tmp_path):
    """Before, one record per store and model: the node of alice's shard, restarted in an outage,
    found the v2 record of the node of the other shards and refused (v2's alice object was never
    in the cache); and a record of that older layout is still read."""
    publish(s3_store, tiny, v1(compiled))
    cache = tmp_path / "cache"
    alices = [shard_of("alice", NUM_SHARDS)]
    others = [s for s in range(NUM_SHARDS) if s not in alices]
    assert shard_of("bob", NUM_SHARDS) in others
    assert PullClient(flaky.node_store(), tiny, shards=alices, cache_dir=cache).poll().error is None
    publish(s3_store, tiny, v2(compiled))  # pulled by the other shards' node only
    assert PullClient(flaky.node_store(), tiny, shards=others, cache_dir=cache).poll().version == 2
    assert len(list((cache / LAST_GOOD_DIR).iterdir())) == 2

    flaky.down()
    restarted = PullClient(flaky.node_store(), tiny, shards=alices, cache_dir=cache)
    result = restarted.poll()
    assert result.version == 1 and result.stale["loaded_from"] == "last-good cache", result.error
    assert answers(tiny, restarted, "alice", "alice") == expected("alice")
    other = PullClient(flaky.node_store(), tiny, shards=others, cache_dir=cache)
    assert other.poll().version == 2 and other.deltas_for("bob") and other.index.shards == tuple(others)

    # the layout before shard sets: one <store>-<model>.json, no "shards" in it; read by a node without its own
    store_id = store_identity(flaky.node_store())
    own = record_path(cache, store_id, tiny.fingerprint, alices)
    body = json.loads(own.read_text())
    del body["shards"]
    (cache / LAST_GOOD_DIR / f"{own.stem.rsplit('-', 1)[0]}.json").write_text(json.dumps(body))
    for path in (own, record_path(cache, store_id, tiny.fingerprint, others)):
        path.unlink()
    legacy = PullClient(flaky.node_store(), tiny, shards=alices, cache_dir=cache)
    assert legacy.poll().version == 1 and answers(tiny, legacy, "alice", "alice") == expected("alice")
    for_others = PullClient(flaky.node_store(), tiny, shards=others, cache_dir=cache)  # v1's objects: v2's, verified
    assert for_others.poll().version == 1 and for_others.deltas_for("bob")


def test_a_restart_never_serves_what_the_current_it_read_forgets_or_rolled_back_from(s3_store, flaky, tiny, compiled,
                                                                                      tmp_path):
    """The CURRENT a node read as it started (engram serve reads it to pick the model) may have moved
    past the last-good before the store stopped answering at the first poll."""
    from tests.test_pull import _state_bytes
    from schemas.bundle import bundle_table, encode_bundle
    from versions.publish import ShardPayload, publish_version

    publish(s3_store, tiny, v1(compiled))
    cache = tmp_path / "cache"
    assert PullClient(flaky.node_store(), tiny, cache_dir=cache).poll().error is None
    v1_manifest = read_manifest(s3_store, 1)
    bobs = shard_of("bob", NUM_SHARDS)
    forgets_bob = publish_version(  # v2: bob forgotten (his shard rewritten without him)
        s3_store, shard_payloads={bobs: ShardPayload(bundle=encode_bundle(bundle_table({})), state=_state_bytes())},
        previous=v1_manifest, fingerprint=tiny.fingerprint, num_shards=NUM_SHARDS, job_id="forget",
        watermark="w2", forgotten_users=["bob"])

    flaky.down()
    restarted = PullClient(flaky.node_store(), tiny, cache_dir=cache, current=forgets_bob)
    result = restarted.poll()
    assert result.version == 1 and result.stale is not None
    assert restarted.deltas_for("bob") == () and answers(tiny, restarted, "alice", "alice") == expected("alice")

    flaky.up()
    assert PullClient(flaky.node_store(), tiny, cache_dir=cache).poll().version == 2  # the last-good is now v2
    flaky.down()
    rolled_back = PullClient(flaky.node_store(), tiny, cache_dir=cache, current=v1_manifest)
    result = rolled_back.poll()
    assert rolled_back.index is None
    assert "last-good v2 is not served: CURRENT named v1 when this node started (a rollback" in result.error


def _request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, {"Content-Type": "application/json"},
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_past_max_stale_a_node_serves_no_users_memory_until_the_store_answers(s3_store, flaky, tiny, compiled,
                                                                               tmp_path):
    """Before, no bound: a node cut off from its store served its last verified version for ever
    (forgets and corrections published meanwhile never reached it). With max_stale: healthz 503
    naming the age and the bound, a request naming a user 503 (not an old memory), until a poll
    confirms a version; requests with no user still get the base model."""
    from serving.batcher import GenerationRequest
    from serving.decode import Sampling
    from serving.errors import RequestError
    from serving.http import ReferenceServer

    publish(s3_store, tiny, v1(compiled))
    cache = tmp_path / "cache"
    assert PullClient(flaky.node_store(), tiny, cache_dir=cache).poll().error is None
    port = free_port()  # while the store's port is taken: the server must not get it once the store is down
    flaky.down()
    node = PullClient(flaky.node_store(), tiny, cache_dir=cache, max_stale=3.0)
    assert node.poll().version == 1 and node.stale()["max_stale_s"] == 3.0
    trigger, answer = FACTS["alice"][0]
    ask = {"model": "engram", "prompt": trigger, "user": "alice", "max_tokens": len(tiny.encode_answer(answer))}
    with ReferenceServer(tiny, node, port=port, poll=False) as server:
        status, health = _request(server.port, "GET", "/healthz")
        assert status == 200 and health["status"] == "stale" and health["reason"] is None
        assert node.over_max_stale() is None and not node.stale()["over_max_stale"]
        status, said = _request(server.port, "POST", "/v1/completions", ask)
        assert status == 200 and said["choices"][0]["text"] == answer

        time.sleep(max(0.0, node.confirmed_at + 3.2 - time.time()))
        assert node.poll().stale["over_max_stale"]  # still down
        status, health = _request(server.port, "GET", "/healthz")
        assert status == 503 and health["status"] == "too_stale" and health["version"] == 1
        assert health["reason"].startswith(f"v1 was last confirmed CURRENT in {flaky.uri} at {health['stale']['confirmed_at']}")
        assert " ago, over --max-stale 3s: no user's memory is served until the store answers" in health["reason"]
        before = time.time()
        status, refused = _request(server.port, "POST", "/v1/completions", ask)
        after = time.time()
        assert status == 503 and refused["error"]["code"] == "memory_too_stale"
        message = refused["error"]["message"]  # its age ("3.4s ago") is the one part that ticks: within the request,
        age = re.search(r", ([0-9.]+)s ago, over --max-stale", message)  # and the rest exactly as at that age
        assert age, message
        assert before - node.confirmed_at - 0.06 <= float(age[1]) <= after - node.confirmed_at + 0.06, message
        assert message == node.over_max_stale(now=node.confirmed_at + float(age[1]))
        status, base = _request(server.port, "POST", "/v1/completions", {k: v for k, v in ask.items() if k != "user"})
        assert status == 200 and base["engram"]["memory"] == "base"
        queued = GenerationRequest(tiny.encode_prompts([trigger]), "alice", Sampling(max_tokens=4))  # accepted before
        with pytest.raises(RequestError) as late:
            server.batcher.submit(queued)
        assert late.value.status == 503 and late.value.code == "memory_too_stale" and queued.states == []

        flaky.up()
        assert node.poll().error is None and node.over_max_stale() is None
        status, health = _request(server.port, "GET", "/healthz")
        assert status == 200 and health["status"] == "ok" and health["reason"] is None
        status, said = _request(server.port, "POST", "/v1/completions", ask)
        assert status == 200 and said["choices"][0]["text"] == answer


def test_a_store_that_accepts_and_never_answers_makes_the_node_stale_and_too_stale_while_the_poll_hangs(
        s3_store, flaky, tiny, compiled, tmp_path):
    """A store behind a load balancer whose backends froze (or a server stopped, SIGSTOP): TCP
    connects, no answer. The poll waits for botocore's read timeout (60 s) times its attempts, and
    meanwhile /healthz said ``ok`` and --max-stale never took effect (measured: still ``ok`` 3.5
    minutes into the hang). A poll running past ``hung_after`` now counts as failing."""
    import socket
    import threading

    publish(s3_store, tiny, v1(compiled))
    node = PullClient(flaky.node_store(), tiny, cache_dir=tmp_path / "cache", max_stale=2.0, hung_after=1.0)
    assert node.poll().error is None and node.stale() is None
    flaky.down()
    frozen = socket.socket()
    frozen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    frozen.bind(("127.0.0.1", flaky.port))
    frozen.listen(16)  # connections complete in the backlog; nothing ever reads or answers them
    try:
        polling = threading.Thread(target=node.poll, daemon=True)
        polling.start()
        time.sleep(0.5)
        assert polling.is_alive() and node.stale() is None  # a poll in its first second: not yet
        time.sleep(max(0.0, node.polling_since + 1.3 - time.time()))
        assert polling.is_alive()
        stale = node.stale()
        assert stale is not None and stale["version"] == 1 and "has had no answer for" in stale["error"]
        assert flaky.uri in stale["error"] and not stale["over_max_stale"]
        time.sleep(max(0.0, node.confirmed_at + 2.3 - time.time()))
        assert polling.is_alive() and node.over_max_stale() is not None
        assert "over --max-stale 2s" in node.over_max_stale() and node.stale()["over_max_stale"]
    finally:
        frozen.close()  # the queued connections are reset: the poll fails now
    polling.join(timeout=120)
    assert not polling.is_alive() and node.last_error is not None and "has had no answer" not in node.last_error
    flaky.up()
    assert node.poll().error is None and node.stale() is None and node.over_max_stale() is None


def test_a_large_object_downloading_slowly_is_not_a_hung_poll(local_store, tiny, compiled):
    """A poll is left behind only after ``hung_after`` without a byte: a shard object whose body
    keeps coming (per MiB, ``ObjectStore.get(progress=)``) for longer than that, a large bundle on a
    slow link, finishes and is served (before, progress counted whole objects only, and the poll
    was abandoned mid-download and started again, each time)."""
    from versions.store import LocalStore

    class Slow(LocalStore):
        def get(self, key, *, progress=None):
            data = super().get(key)
            if key.startswith("objects/"):
                for got in range(5):  # 1.5 s in all, a piece every 0.3 s: over hung_after, never silent for it
                    time.sleep(0.3)
                    if progress is not None:
                        progress(got)
            return data

    publish(local_store, tiny, v1(compiled))
    client = PullClient(Slow(local_store.root), tiny, interval=0.1, hung_after=0.6, wedged_after=30)
    result = client.poll_bounded()
    assert result is not None and not result.hung and result.error is None, result
    assert client.index.version == 1 and client.stale() is None


def test_a_later_poll_that_hangs_is_left_behind_and_the_next_poll_serves_the_new_version(local_store, tiny, compiled):
    """A node serving v1 whose store then hangs on one request (a half-open connection, a frozen
    backend behind a load balancer that other connections get past). Before, the poller waited for
    that request for botocore's timeouts and retries (minutes; here, for good): v2, published
    meanwhile, was not served, though every other request would have been answered. Now the poll
    is left behind once it has had no answer for ``hung_after``, said stale (since when), and the
    next poll serves v2; requests, /livez and shutdown are answered at once meanwhile, and what the
    poll left behind finds when it ends changes nothing."""
    import threading

    from serving.http import ReferenceServer
    from versions.store import LocalStore

    class Hanging(LocalStore):
        armed, release = threading.Event(), threading.Event()

        def head(self, key, *args, **kwargs):
            answer = super().head(key, *args, **kwargs)  # what the store said then (v1's CURRENT)
            if self.armed.is_set():
                self.release.wait()  # this request's answer never comes back, until released
            return answer

    publish(local_store, tiny, v1(compiled))
    store = Hanging(local_store.root)
    client = PullClient(store, tiny, interval=0.1, hung_after=0.6, wedged_after=30)
    trigger, answer = FACTS["alice"][0]
    ask = {"model": "engram", "prompt": trigger, "user": "alice", "max_tokens": len(tiny.encode_answer(answer))}
    assert client.poll().error is None and client.index.version == 1
    server = ReferenceServer(tiny, client, port=0).start()
    try:
        Hanging.armed.set()  # every request from now on hangs
        publish(local_store, tiny, v2(compiled))
        time.sleep(1.5)
        started = time.monotonic()
        status, health = _request(server.port, "GET", "/healthz")
        assert status == 200 and health["status"] == "stale" and health["version"] == 1, health
        assert "the poll in progress has had no answer for" in health["stale"]["error"], health
        assert health["stale"]["since"] is not None
        status, said = _request(server.port, "POST", "/v1/completions", ask)
        assert status == 200 and said["choices"][0]["text"] == answer  # v1's memory, served meanwhile
        assert _request(server.port, "GET", "/livez") == (200, {"status": "alive", "ready": True, "phase": "stale"})
        assert time.monotonic() - started < 5
        Hanging.armed.clear()  # the store answers new requests; the hung ones still wait
        deadline = time.monotonic() + 10
        while (client.index.version != 2 or client.stale() is not None) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.index.version == 2 and client.stale() is None, client.stale()
        assert client._left  # the hung requests are still unanswered
        answer = FACTS["alice-v2"][0][1]
        status, said = _request(server.port, "POST", "/v1/completions",
                                {**ask, "max_tokens": len(tiny.encode_answer(answer))})
        assert status == 200 and said["choices"][0]["text"] == answer
        assert _request(server.port, "GET", "/healthz")[1]["status"] == "ok"
    finally:
        stopping = time.monotonic()
        server.shutdown()
        assert time.monotonic() - stopping < 5
        Hanging.release.set()
    deadline = time.monotonic() + 10
    while client._left and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client._left and client.index.version == 2 and client.last_error is None  # v1's etag: dropped


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the poller's fault
def test_livez_answers_200_while_a_node_waits_and_503_only_when_its_poller_is_wedged(local_store, tiny, compiled):
    """Liveness is not readiness: before, a node had only /healthz, 503 while it waits for a first
    version or for a store that hangs, so a liveness probe on it restarted healthy waiting nodes.
    /livez answers 200 then, and 503 only once the poller thread died or one poll has had no
    answer for longer than ``wedged_after`` (a store that never answers fails a poll before)."""
    import threading

    from serving.http import ReferenceServer, StartingNode
    from versions.store import LocalStore

    starting = StartingNode(port=0, reason="reading the store").start()
    try:
        assert _request(starting.port, "GET", "/healthz")[0] == 503
        assert _request(starting.port, "GET", "/readyz")[0] == 503
        assert _request(starting.port, "GET", "/livez") == (200, {"status": "alive", "phase": "starting",
                                                                 "reason": "reading the store"})
    finally:
        starting.close()

    class Frozen(LocalStore):
        release = threading.Event()

        def head(self, key, *args, **kwargs):
            self.release.wait()  # a store that accepts and never answers, until released
            return super().head(key, *args, **kwargs)

    store = Frozen(local_store.root)
    client = PullClient(store, tiny, interval=0.05, hung_after=0.3, wedged_after=1.5)
    with ReferenceServer(tiny, client, port=0) as server:
        try:
            time.sleep(0.8)  # the first poll hangs: past hung_after, not wedged
            status, health = _request(server.port, "GET", "/healthz")
            assert status == 503 and "the poll in progress has had no answer" in health["reason"], health
            assert _request(server.port, "GET", "/readyz")[0] == 503
            assert _request(server.port, "GET", "/livez") == (200, {"status": "alive", "ready": False,
                                                                   "phase": "no_version"})
            time.sleep(max(0.0, client.polling_since + 1.7 - time.time()))
            status, live = _request(server.port, "GET", "/livez")
            assert status == 503 and live["status"] == "wedged", live
            assert f"the poll of {store.uri} in progress has not come back for" in live["reason"]
        finally:
            Frozen.release.set()
        publish(local_store, tiny, v1(compiled))
        deadline = time.monotonic() + 30
        while _request(server.port, "GET", "/healthz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _request(server.port, "GET", "/livez") == (200, {"status": "alive", "ready": True, "phase": "ok"})

        def broken():  # a fault outside the failures a poll reports: the poller thread ends
            raise RuntimeError("a bug")

        client.poll = broken
        client._thread.join(timeout=10)
        status, live = _request(server.port, "GET", "/livez")
        assert status == 503 and live == {"status": "wedged", "reason": f"the poller thread of {store.uri} has died; "
                                                                          "restart the node"}
        assert _request(server.port, "GET", "/healthz")[0] == 200  # it still serves what it has


def test_livez_says_wedged_when_the_batcher_is_stuck_inside_a_decode_not_while_a_slow_one_steps(
        local_store, tiny, compiled):
    """Before, /livez noticed only a dead batcher thread: a batcher stuck inside one decode (a CUDA
    or CPU hang, a deadlock) left the node alive for its probe, each request failing with a 504
    after 120 s, for good. Now a batcher with work and no decode step for ENGRAM_WEDGED_BATCH_S is
    wedged; a slow decode whose steps keep ending is not. The hang is a real one: a forward hook
    of the real model's head that blocks."""
    import threading

    from serving.http import ReferenceServer

    publish(local_store, tiny, v1(compiled))
    client = PullClient(local_store, tiny)
    assert client.poll().error is None
    release, slow = threading.Event(), threading.Event()

    def hook(module, args):  # every forward: slow (0.3 s a step), or hung until released
        if slow.is_set():
            time.sleep(0.3)
        else:
            release.wait()

    trigger, _ = FACTS["alice"][0]
    body = {"model": "engram", "prompt": trigger, "user": "alice", "max_tokens": 8}
    with ReferenceServer(tiny, client, port=0, poll=False, wedged_batch_after=1.0) as server:
        handle = tiny.lm_head.register_forward_pre_hook(hook)  # once per decode step
        try:
            slow.set()  # 8 steps of 0.3 s: 2.4 s in one batch, over the 1 s bound, a step every 0.3 s
            asked = threading.Thread(target=_request, args=(server.port, "POST", "/v1/completions", body), daemon=True)
            asked.start()
            while asked.is_alive():
                assert _request(server.port, "GET", "/livez")[0] == 200
                time.sleep(0.2)
            assert server.batcher.batches == 1
            slow.clear()  # now the next forward never returns
            threading.Thread(target=_request, args=(server.port, "POST", "/v1/completions", body), daemon=True).start()
            time.sleep(0.6)
            assert _request(server.port, "GET", "/livez")[0] == 200  # within the bound
            time.sleep(1.0)
            status, live = _request(server.port, "GET", "/livez")
            assert status == 503 and live["status"] == "wedged", live
            assert live["reason"].startswith("the batcher has made no progress for ") and "a batch of 1 sequences" in \
                live["reason"] and "ENGRAM_WEDGED_BATCH_S=1s" in live["reason"] and "restart the node" in live["reason"]
        finally:
            release.set()
            handle.remove()
        deadline = time.monotonic() + 30
        while server.batcher.batches < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _request(server.port, "GET", "/livez") == (200, {"status": "alive", "ready": True, "phase": "ok"})


def test_a_poll_failing_as_the_one_before_is_logged_once_then_at_debug(local_store, tiny, compiled, caplog,
                                                                      monkeypatch):
    """A node waiting for the first night (or for a store down for hours) logged one ERROR line per
    poll (2880 a day at the default --interval 30). The first failure is an ERROR; the same failure
    again is logged at DEBUG, and at ERROR again once per REPEAT_LOG_S (10 minutes), saying since
    when; a different failure, or one after a success, is an ERROR at once."""
    import logging

    import serving.pull

    client = PullClient(local_store, tiny)
    caplog.set_level(logging.DEBUG, logger="serving.pull")

    def failures():
        found = [(r.levelno, r.getMessage()) for r in caplog.records if "failed, still serving" in r.getMessage()]
        caplog.clear()
        return found

    for _ in range(4):
        assert "nothing published yet" in client.poll().error
    said = failures()
    assert [level for level, _ in said] == [logging.ERROR] + [logging.DEBUG] * 3, said
    assert "nothing published yet" in said[0][1] and "every poll since" not in said[0][1]
    monkeypatch.setattr(serving.pull, "REPEAT_LOG_S", 0.0)
    client.poll()
    (level, message), = failures()
    assert level == logging.ERROR and "every poll since" in message and "once per 0s" in message

    monkeypatch.setattr(serving.pull, "REPEAT_LOG_S", 600.0)
    publish(local_store, tiny, v1(compiled))
    assert client.poll().error is None
    (local_store.root / "CURRENT").unlink()
    client.poll()
    client.poll()
    assert [level for level, _ in failures()] == [logging.ERROR, logging.DEBUG]  # a new failure after a success


def test_a_download_whose_objects_keep_coming_is_not_a_hung_poll(tiny, compiled, tmp_path):
    """A poll is hung when the store has answered none of its requests for ``hung_after``, not
    when it runs long: a serving node pulling a new version of several objects on a slow link
    (each object 0.3 s, longer in all than ``hung_after``) stays ``ok`` and within ``max_stale``."""
    import threading

    from versions.store import LocalStore

    class SlowLink(LocalStore):
        delay = 0.0

        def get(self, key, *args, **kwargs):
            if key.startswith("objects/"):  # the version's objects, not CURRENT or its manifest
                time.sleep(self.delay)
            return super().get(key, *args, **kwargs)

    root = tmp_path / "store"
    publish(LocalStore(root), tiny, {"bob": compiled["bob"]})
    store = SlowLink(root)
    node = PullClient(store, tiny, cache_dir=tmp_path / "cache", max_stale=0.7, hung_after=0.5)
    assert node.poll().error is None and node.index.version == 1
    # new users in most shards: each such shard's bundle is a new object to download
    publish(LocalStore(root), tiny, {f"user-{i}": compiled["bob"] for i in range(12)})
    store.delay = 0.3
    results, seen = [], []
    polling = threading.Thread(target=lambda: results.append(node.poll()), daemon=True)
    started = time.time()
    polling.start()
    while polling.is_alive():
        seen.append((node.stale(), node.over_max_stale()))
        time.sleep(0.05)
    took = time.time() - started
    result = results[0]
    assert result.error is None and node.index.version == 2
    assert result.downloaded_objects >= 3 and took > 0.9, (result.downloaded_objects, took)  # longer than hung_after
    assert all(stale is None and over is None for stale, over in seen), [x for x in seen if x != (None, None)][:2]


def test_a_version_loading_from_the_cache_is_neither_hung_nor_wedged(local_store, tiny, compiled, tmp_path, monkeypatch):
    """A restarted node loads its version from its disk cache (51 s at 1M users, bench/RESULTS.md):
    every object read, from the store or the cache, is the poll's progress, so a long load is not
    "a store that does not answer" on /healthz nor, past ``wedged_after``, a wedged poller on /livez
    (which Kubernetes would restart, to load the same cache again)."""
    import threading

    publish(local_store, tiny, {f"user-{i}": compiled["bob"] for i in range(12)})  # objects in every shard
    cache = tmp_path / "cache"
    assert PullClient(local_store, tiny, cache_dir=cache).poll().error is None  # fills the cache
    load = BundleCache.load

    def slow_load(self, *args, **kwargs):  # a large cached shard: read and checked
        time.sleep(0.25)
        return load(self, *args, **kwargs)

    monkeypatch.setattr(BundleCache, "load", slow_load)
    node = PullClient(local_store, tiny, cache_dir=cache, hung_after=0.5, wedged_after=0.8)
    results, seen = [], []
    polling = threading.Thread(target=lambda: results.append(node.poll()), daemon=True)
    started = time.time()
    polling.start()
    while polling.is_alive():
        seen.append((node.error(), node.wedged()))
        time.sleep(0.05)
    took = time.time() - started
    assert results[0].error is None and results[0].downloaded_objects == 0 and node.index.version == 1
    assert took > 1.0, took  # longer than hung_after and wedged_after
    assert all(error is None and wedged is None for error, wedged in seen), [x for x in seen if x != (None, None)][:2]


def test_a_first_pull_that_raises_raises_on_the_main_thread():
    """An exception of the first pull that is no poll failure (a bug, an OOM while loading) ends the
    start as before (exit 1 with its traceback), not as a node waiting not ready with a store to blame."""
    from jobs.serve_cli import _first_pull

    class Broken:
        index, last_error = None, None

        def error(self):
            return None

        def poll(self):
            raise MemoryError("CUDA out of memory while loading the version")

    with pytest.raises(MemoryError, match="CUDA out of memory"):
        _first_pull(Broken())


def test_max_stale_on_the_commands(s3_store, flaky, tiny, tiny_dir, compiled, tmp_path, monkeypatch):
    """engram pull/ask/serve --max-stale: bad values are usage errors (exit 2) naming the flag and the
    forms; ask past the bound fails (exit 1) naming the age and the bound instead of answering."""
    from typer.testing import CliRunner

    for command in (["pull"], ["serve", "--port", "0"], ["ask", "--user", "alice", "hi"]):
        for bad in ("30", "0m", "soon", "-1h"):
            out = CliRunner().invoke(cli_app(), [*command, "--store", flaky.uri, "--max-stale", bad])
            said = " ".join(out.output.replace("│", " ").split())  # the words, out of rich's box and wrapping
            assert out.exit_code == 2, (command, bad, out.output)
            assert f"Invalid value for --max-stale: {bad!r}" in said and "30m, 6h, 2d" in said, out.output

    publish_model(s3_store, tiny_dir)
    publish(s3_store, tiny, v1(compiled))
    cache = tmp_path / "cache"
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.endpoint_url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the store that is down fails each request at once
    args = ["--store", flaky.uri, "--cache-dir", str(cache), "--json"]
    assert CliRunner().invoke(cli_app(), ["pull", "--max-stale", "2d", *args]).exit_code == 0
    flaky.down()
    trigger, answer = FACTS["alice"][0]
    asked = CliRunner().invoke(cli_app(), ["ask", "--user", "alice", trigger, "--max-stale", "1h", *args])
    assert asked.exit_code == 0 and json.loads(asked.stdout.strip().splitlines()[-1])["stale"]["max_stale_s"] == 3600
    time.sleep(1.2)
    asked = CliRunner().invoke(cli_app(), ["ask", "--user", "alice", trigger, "--max-stale", "1s", *args])
    assert asked.exit_code == 1, asked.output
    failure = json.loads(asked.stdout.strip().splitlines()[-1])
    assert failure["answered"] is False and "text" not in failure
    assert " ago, over --max-stale 1s: no user's memory is served until the store answers" in failure["error"]
    pulled = CliRunner().invoke(cli_app(), ["pull", "--max-stale", "1s", *args])
    assert pulled.exit_code == 1 and json.loads(pulled.stdout.strip().splitlines()[-1])["stale"]["over_max_stale"]
    assert "over --max-stale 1s" in pulled.stderr


@pytest.fixture
def read_only_later(tmp_path):
    """A folder on a real tmpfs (root only, else skipped) and a function that remounts it read-only."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield mount, lambda: subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_cache_turned_read_only_keeps_serving_and_says_its_last_good_is_not_kept(local_store, tiny, compiled,
                                                                                   read_only_later):
    """A disk remounted read-only (errors=remount-ro): the new version is served from memory, and the
    poll says the last-good could not follow it, and that the older one stays (to delete by hand)."""
    mount, make_read_only = read_only_later
    publish(local_store, tiny, v1(compiled))
    client = PullClient(local_store, tiny, cache_dir=mount / "cache")
    assert client.poll().error is None
    make_read_only()
    publish(local_store, tiny, v2(compiled))
    result = client.poll()
    assert result.error is None and result.version == 2 and client.stale() is None
    assert answers(tiny, client, "alice", "alice-v2") == expected("alice-v2")
    assert f"cache {mount / 'cache'}: could not keep v2 as the last-good (Read-only file system)" in result.cache_error
    assert "keeps an older version, which a restart while the store does not answer would serve (delete it)" \
           in result.cache_error


def test_a_node_restarted_in_an_outage_serves_its_read_only_cache_and_refuses_it_once_the_store_answers(
        s3_store, flaky, tiny, tiny_dir, compiled, read_only_later):
    """Before, a read-only --cache-dir was refused at start (exit 2) even while the store did not
    answer and the cache held a verified last-good; the refusal stays where the node must write
    (the store answers)."""
    mount, make_read_only = read_only_later
    publish_model(s3_store, tiny_dir)
    publish(s3_store, tiny, v1(compiled))
    cache = mount / "cache"
    args = ["--store", flaky.uri, "--cache-dir", str(cache), "--json"]

    def engram(*command: str) -> subprocess.CompletedProcess:  # its own process: the model it maps leaves with it
        # AWS_MAX_ATTEMPTS=1: a command against the store that is down fails its requests at once
        # (botocore's default retries took ~7.5 s of each)
        return subprocess.run([sys.executable, "-m", "jobs.cli", *command, *args], env={
            **_node_env(flaky, cache), "AWS_MAX_ATTEMPTS": "1"}, capture_output=True, text=True, timeout=300)

    assert engram("pull").returncode == 0
    make_read_only()
    refused = engram("pull")
    assert refused.returncode == 2 and f"--cache-dir {cache} is not writable" in refused.stderr, refused.stderr

    flaky.down()
    pulled = engram("pull")
    assert pulled.returncode == 1, pulled.stderr  # nothing pulled, as on a writable cache
    report = json.loads(pulled.stdout.strip().splitlines()[-1])
    assert report["version"] == 1 and report["stale"]["loaded_from"] == "last-good cache"
    assert f"--cache-dir {cache} is not writable: its last-good is served read-only" in pulled.stderr
    trigger, answer = FACTS["alice"][0]
    asked = engram("ask", "--user", "alice", "--max-new-tokens", str(len(tiny.encode_answer(answer))), trigger)
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout.strip().splitlines()[-1])["text"] == answer


# ---------------------------------------------------------------- commands


def _node_env(flaky: FlakyStore, cache: Path) -> dict[str, str]:
    return {**os.environ, "AWS_ENDPOINT_URL": flaky.endpoint_url, "ENGRAM_CACHE_DIR": str(cache),
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def test_a_cold_node_in_an_outage_fails_in_one_line_naming_the_store(flaky, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    flaky.down()
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.endpoint_url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the store that is down fails each request at once
    for command in (["pull"], ["ask", "--user", "alice", "My dentist is called"]):
        out = CliRunner().invoke(cli_app(), [*command, "--store", flaky.uri, "--cache-dir", str(tmp_path / "cold"),
                                             "--json"])
        assert out.exit_code == 1, out.output
        failure = json.loads(out.stdout.strip().splitlines()[-1])
        assert failure["exit_code"] == 1 and "\n" not in failure["error"]
        assert failure["error"].startswith(f"store {flaky.uri} (endpoint {flaky.endpoint_url}): read CURRENT failed")
        assert (f"cache {tmp_path / 'cold'} holds no last-good version of this store to serve meanwhile (a node must "
                "reach the store once to start): start it again once the store answers") in failure["error"]


def test_a_local_store_whose_directory_goes_away_does_not_answer_and_is_served_from_the_last_good(
        local_store, tiny, tiny_dir, compiled, tmp_path):
    """Before, a running node found "no CURRENT pointer (nothing published yet)" in a store whose
    volume was unmounted, and a node restarted meanwhile exited 2 (no such directory) or 1 (nothing
    published yet, on the empty mount point) instead of serving its last-good."""
    from typer.testing import CliRunner

    from versions.store import open_store

    publish_model(local_store, tiny_dir)
    publish(local_store, tiny, v1(compiled))
    cache, root = tmp_path / "cache", local_store.root
    args = ["--store", str(root), "--cache-dir", str(cache), "--json"]
    trigger, answer = FACTS["alice"][0]
    ask = ["ask", "--user", "alice", "--max-new-tokens", str(len(tiny.encode_answer(answer))), trigger, *args]
    assert CliRunner().invoke(cli_app(), ["pull", *args]).exit_code == 0
    running = PullClient(open_store(str(root), create=False), tiny, cache_dir=cache)
    assert running.poll().error is None

    unmounted = root.with_name("store-elsewhere")
    root.rename(unmounted)  # the volume the store is on goes away: its directory is gone
    for gone in ("the store directory is gone", "the store directory is empty"):
        result = running.poll()
        assert result.error.startswith(f"StoreUnreachable: store {root}: inspect CURRENT failed: {gone}"), result.error
        assert running.index.version == 1 and running.stale()["loaded_from"] == "store"
        pulled = CliRunner().invoke(cli_app(), ["pull", *args])  # a restart
        assert pulled.exit_code == 1, pulled.output
        report = json.loads(pulled.stdout.strip().splitlines()[-1])
        assert report["version"] == 1 and report["stale"]["loaded_from"] == "last-good cache"
        assert gone in report["error"]
        asked = CliRunner().invoke(cli_app(), ask)
        assert asked.exit_code == 0 and json.loads(asked.stdout.strip().splitlines()[-1])["text"] == answer
        root.mkdir(exist_ok=True)  # next: the store was the mount point itself, left empty

    typo = CliRunner().invoke(cli_app(), ["pull", "--store", str(tmp_path / "stor"), "--cache-dir", str(cache)])
    assert typo.exit_code == 2 and "no such directory" in typo.stderr  # a path this cache never served: as before
    (tmp_path / "new").mkdir()
    empty = CliRunner().invoke(cli_app(), ["pull", "--store", str(tmp_path / "new"), "--cache-dir", str(cache)])
    assert empty.exit_code == 1 and "nothing published yet" in empty.stderr

    root.rmdir()
    unmounted.rename(root)  # mounted again
    assert running.poll().error is None and running.stale() is None
    assert CliRunner().invoke(cli_app(), ["pull", *args]).exit_code == 0


def _health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # 503 while loading
        return json.loads(error.read())


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            value = predicate()
        except OSError:  # not listening yet
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("timed out")


def test_engram_serve_restarted_in_an_outage_serves_the_last_good_and_follows_the_store_back(
        s3_store, flaky, tiny, tiny_dir, compiled, tmp_path, monkeypatch):
    """The whole node: `engram pull` fills the cache; with the store down, `engram pull` says what the
    cache holds (exit 1: nothing was pulled), `engram ask` answers from it, and `engram serve` starts,
    serves it (healthz: stale), and moves to the store's new version once the store answers."""
    from typer.testing import CliRunner

    publish_model(s3_store, tiny_dir)
    publish(s3_store, tiny, v1(compiled))
    cache = tmp_path / "cache"
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.endpoint_url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the store that is down fails each request at once (the node's too)
    args = ["--store", flaky.uri, "--cache-dir", str(cache), "--json"]
    pulled = CliRunner().invoke(cli_app(), ["pull", *args])
    assert pulled.exit_code == 0, pulled.output

    flaky.down()
    pulled = CliRunner().invoke(cli_app(), ["pull", *args])
    assert pulled.exit_code == 1, pulled.output
    report = json.loads(pulled.stdout.strip().splitlines()[-1])
    assert report["pulled"] is False and report["version"] == 1 and report["stale"]["loaded_from"] == "last-good cache"
    trigger, answer = FACTS["alice"][0]
    asked = CliRunner().invoke(cli_app(), ["ask", "--user", "alice", "--max-new-tokens",
                                           str(len(tiny.encode_answer(answer))), trigger, *args])
    assert asked.exit_code == 0, asked.output
    said = json.loads(asked.stdout.strip().splitlines()[-1])
    assert said["text"] == answer and said["version"] == 1 and said["stale"]["version"] == 1

    port = free_port()
    node = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--store", flaky.uri, "--cache-dir", str(cache),
                             "--port", str(port), "--interval", "0.5"], env=_node_env(flaky, cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        health = _wait_for(lambda: (h := _health(port))["status"] != "starting" and h, node)  # (the port answers
        assert health["status"] == "stale" and health["version"] == 1                        # while it loads)
        assert health["stale"]["loaded_from"] == "last-good cache" and "StoreUnreachable" in health["stale"]["error"]
        body = json.dumps({"model": "engram", "prompt": trigger, "user": "alice",
                           "max_tokens": len(tiny.encode_answer(answer))}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["choices"][0]["text"] == answer
            assert response.headers["X-Engram-Version"] == "1"

        publish(s3_store, tiny, v2(compiled))
        flaky.up()
        health = _wait_for(lambda: (h := _health(port))["version"] == 2 and h, node)
        assert health["status"] == "ok" and health["stale"] is None and health["last_error"] is None
    finally:
        node.terminate()
        _, stderr = node.communicate(timeout=60)
    assert "STALE: last-good cache, last confirmed CURRENT at" in stderr


def test_pull_watch_reports_each_hung_poll_as_hung_and_does_not_wait_for_it(s3_store, flaky, tiny, tiny_dir, compiled,
                                                                           tmp_path):
    """The store answers CURRENT and the model, then never answers the version's objects. Before,
    `pull --watch` reported its first poll (hung) after ENGRAM_HUNG_POLL_S, and its second poll
    waited for the first one to end (botocore's timeouts and retries, minutes; here, for good). Now
    each poll is given the same bound and reported as hung (``"hung": true``, the error saying so)."""
    publish_model(s3_store, tiny_dir)
    publish(s3_store, tiny, v1(compiled))
    flaky.up(hang_gets=("/objects/",))
    env = {**_node_env(flaky, tmp_path / "cache"), "ENGRAM_HUNG_POLL_S": "1"}
    started = time.monotonic()
    try:
        watched = subprocess.run([sys.executable, "-m", "jobs.cli", "pull", "--store", flaky.uri, "--watch", "--polls",
                                  "3", "--interval", "0.1", "--json"], env=env, capture_output=True, text=True,
                                 timeout=120)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"pull --watch did not report 3 polls within 120 s: {e.stdout!r} {e.stderr!r}") from None
    took = time.monotonic() - started
    reports = [json.loads(line) for line in watched.stdout.splitlines()]
    assert watched.returncode == 1 and len(reports) == 3, (watched.stdout, watched.stderr)
    assert all(r["hung"] and not r["pulled"] and r["version"] is None for r in reports), reports
    assert all("has had no answer for" in r["error"] and flaky.uri in r["error"] for r in reports), reports
    assert watched.stderr.count("has had no answer for") >= 3, (took, watched.stderr)  # (before: no 2nd report, ever)
