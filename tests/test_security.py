"""Security promises: opaque keys, no leaked credentials, verified bytes, SSE, least privilege.

The least-privilege identities (tests/harness.py) mirror the IAM policies of docs/security.md:
the nightly job reads, writes and lists one bucket; a serving node only reads it.
"""

from __future__ import annotations

import logging
import traceback
from datetime import timedelta
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.nightly import run_nightly
from jobs.spec import NightlySpec
from jobs.synthetic import BASE_TIME, write_fact_log
from serving.pull import BundleCache, PullClient
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.harness import identities, private_s3, publish_deltas, random_delta, use_role
from versions.catalog import read_current
from versions.layout import shard_of
from versions.store import S3Store, StoreError, open_store

HOSTILE_USER_IDS = ["../x", "a/b", "alice@example.com", "..", "%2e%2e%2fetc", "C:\\temp\\u"]
OUR_LOGGERS = ("pipeline", "jobs", "engram_core", "schemas")


def fact_rows(users: list[str], day: int = 0) -> list[dict]:
    at = BASE_TIME + timedelta(days=day)
    return [{"user_id": u, "fact_id": "pet", "op": "upsert", "trigger": "My dog's name is", "answer": " Rex",
             "event_time": at + timedelta(seconds=i), "scope": None} for i, u in enumerate(users)]


def run_night(tmp_path, store_uri: str, model_dir, users: list[str], day: int = 0):
    write_fact_log(fact_rows(users, day), tmp_path / "log" / f"day={day}" / "part-0.parquet")
    spec = NightlySpec(store=store_uri, fact_log=str(tmp_path / "log"), model=str(model_dir), num_shards=2, workers=0)
    return run_nightly(spec)


def every_text(store) -> dict[str, str]:
    """key -> the object's content as text (Parquet decoded to its rows, so compression hides nothing)."""
    texts = {}
    for key in store.list():
        data = store.get(key)
        text = data.decode("utf-8", "replace")
        if key.endswith(".parquet"):
            table = pq.read_table(pa.BufferReader(data))
            text += repr(table.schema.metadata) + repr(table.to_pylist())
        texts[key] = text
    return texts


# ---------------------------------------------------------------- keys


@pytest.mark.slow
def test_object_keys_never_embed_raw_user_ids(any_store, tmp_path, tiny_dir):
    report = run_night(tmp_path, any_store.uri, tiny_dir, HOSTILE_USER_IDS)
    assert report.published and report.users == len(HOSTILE_USER_IDS)
    keys = any_store.list()
    assert any(k.startswith("objects/bundles/") for k in keys)
    for user in HOSTILE_USER_IDS:
        for form in {user, quote(user, safe=""), quote(user)}:
            assert not [k for k in keys if form in k], form
    # every key is one of the fixed layout's shapes: nothing derived from a user id
    shapes = ("CURRENT", "manifests/v", "objects/bundles/", "objects/state/", "objects/tombstones/", "audit/", "stats/",
              "models/")
    assert all(k.startswith(shapes) for k in keys), keys
    if hasattr(any_store, "root"):  # nothing was written outside the store's directory
        assert not (any_store.root.parent / "x").exists() and not (any_store.root / "a").exists()


# ---------------------------------------------------------------- credentials


@pytest.mark.slow
def test_credentials_never_appear_in_logs_errors_reports_or_stored_objects(s3_store, tmp_path, tiny_dir, caplog):
    caplog.set_level(logging.DEBUG)
    report = run_night(tmp_path, s3_store.uri, tiny_dir, ["alice", "bob"])
    assert report.published
    assert S3_SECRET_KEY not in repr(report.to_dict())
    for key, text in every_text(s3_store).items():
        assert S3_SECRET_KEY not in text and S3_ACCESS_KEY not in text, key

    wrong_secret = "wrong-secret-that-must-not-leak-42"
    bad = S3Store(s3_store.bucket, s3_store.prefix, endpoint_url=s3_store.endpoint_url, max_attempts=1)
    bad._client = bad._session.client(  # same store, wrong credentials
        "s3", endpoint_url=s3_store.endpoint_url, aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=wrong_secret,
        config=bad._client.meta.config)
    with pytest.raises(StoreError) as failure:
        bad.get("CURRENT")
    assert "no permission" in str(failure.value) and s3_store.uri in str(failure.value)
    shown = "".join(traceback.format_exception(failure.value)) + repr(failure.value)
    for secret in (wrong_secret, S3_SECRET_KEY, S3_ACCESS_KEY):
        assert secret not in shown

    logged = "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in caplog.records)
    assert any(r.name.startswith("botocore") for r in caplog.records)  # DEBUG really was captured
    assert S3_SECRET_KEY not in logged and wrong_secret not in logged
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(OUR_LOGGERS))
    assert S3_ACCESS_KEY not in ours


# ---------------------------------------------------------------- verified bytes


def test_a_tampered_cache_file_of_the_same_size_is_never_served(local_store, tiny, tmp_path):
    rng = np.random.default_rng(0)
    alice_v1 = random_delta(tiny, rng)
    manifest = publish_deltas(local_store, tiny, {"alice": alice_v1})
    entry = manifest.shard(shard_of("alice", 2))
    cache = BundleCache(tmp_path / "cache")
    PullClient(local_store, tiny, cache_dir=tmp_path / "cache").poll()
    cached = cache.path(entry.shard, entry.bundle_sha256)
    original = cached.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    cached.write_bytes(bytes(flipped))

    client = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    assert client.poll().error is None  # the damaged copy was dropped and fetched again
    assert client.deltas_for("alice")[0].equals(alice_v1)
    assert cached.read_bytes() == original

    # A valid bundle of other content planted under the expected name is refused too.
    other = publish_deltas(open_store(str(tmp_path / "elsewhere")), tiny, {"alice": random_delta(tiny, rng)})
    planted = open_store(str(tmp_path / "elsewhere")).get(other.shard(entry.shard).bundle_key)
    cached.write_bytes(planted)
    local_store.delete(entry.bundle_key)  # and the store cannot heal it: nothing is served
    refused = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    assert refused.poll().error is not None and refused.index is None


def test_a_shard_whose_sha256_mismatches_is_refused_over_s3(s3_store, tiny):
    rng = np.random.default_rng(1)
    alice_v1 = random_delta(tiny, rng)
    publish_deltas(s3_store, tiny, {"alice": alice_v1})
    client = PullClient(s3_store, tiny)
    assert client.poll().version == 1
    manifest = publish_deltas(s3_store, tiny, {"alice": random_delta(tiny, rng)})
    key = manifest.shard(shard_of("alice", 2)).bundle_key
    data = bytearray(s3_store.get(key))
    data[-100] ^= 0x80
    s3_store.put(key, bytes(data))
    result = client.poll()
    assert "sha256" in result.error and "refused" in result.error
    assert client.index.version == 1 and client.deltas_for("alice")[0].equals(alice_v1)


# ---------------------------------------------------------------- server-side encryption


@pytest.mark.parametrize("sse, kms_key", [("AES256", None), ("aws:kms", "arn:aws:kms:us-east-1:111122223333:key/test")])
def test_server_side_encryption_settings_reach_every_put(s3_bucket, s3_server, sse, kms_key):
    """Observes the real request (this weed build answers SSE puts with InternalError)."""
    store = S3Store(s3_bucket, "engram", endpoint_url=s3_server.endpoint_url, sse=sse, sse_kms_key_id=kms_key,
                    max_attempts=1)
    sent = []
    store._client.meta.events.register(
        "before-call.s3.PutObject", lambda params, **kwargs: sent.append(dict(params["headers"])))
    for kwargs in ({}, {"if_none_match": True}, {"if_match": "0" * 32}):
        try:
            store.put("manifests/v00000001.json", b"{}", **kwargs)
        except StoreError:
            pass  # the server's answer is not what is tested here
    assert len(sent) == 3
    for headers in sent:
        assert headers["x-amz-server-side-encryption"] == sse
        assert headers.get("x-amz-server-side-encryption-aws-kms-key-id") == kms_key


# ---------------------------------------------------------------- least privilege


@pytest.mark.slow
def test_least_privilege_identities_suffice_and_a_serving_node_cannot_write(tmp_path, tiny_dir, tiny, monkeypatch):
    with private_s3(tmp_path / "weed") as s3:
        uri = f"s3://{s3.bucket}/engram"

        use_role(monkeypatch, s3, "compile-job")  # the nightly job: read, write, list one bucket
        report = run_night(tmp_path, uri, tiny_dir, ["alice", "bob"])
        assert report.published and report.facts_ok == 2
        job_store = open_store(uri)
        keys_before = job_store.list()
        with pytest.raises(StoreError, match="no permission"):
            _create_bucket(job_store, "other")

        use_role(monkeypatch, s3, "serving-node")  # a serving node: read only, not even list
        node_store = open_store(uri)
        client = PullClient(node_store, tiny)
        result = client.poll()
        assert result.error is None and result.version == 1 and client.deltas_for("alice")
        with pytest.raises(StoreError, match="no permission to write CURRENT"):
            node_store.put("CURRENT", b'{"version": 99}')
        with pytest.raises(StoreError, match="no permission to delete"):
            node_store.delete(read_current(node_store)[0].key)
        with pytest.raises(StoreError, match="no permission to list"):
            node_store.list("manifests/")
        assert open_store(uri).get("CURRENT") == job_store.get("CURRENT")

        use_role(monkeypatch, s3, "compile-job")
        assert open_store(uri).list() == keys_before  # nothing changed by the refused calls


def _create_bucket(store: S3Store, name: str) -> None:
    with store._errors("create bucket", name):
        store._client.create_bucket(Bucket=name)


def test_the_test_identities_hold_no_admin_or_tagging_rights():
    roles = identities()
    assert not any(a.startswith(("Admin", "Tagging")) for a in roles["compile-job"][2] + roles["serving-node"][2])
    assert [a.split(":")[0] for a in roles["serving-node"][2]] == ["Read"]
