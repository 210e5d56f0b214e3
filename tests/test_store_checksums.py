"""S3-compatible servers that take only the classic S3 request form.

botocore 1.36 (January 2025) began adding flexible checksums to every PUT: CRC32 headers
(``x-amz-sdk-checksum-algorithm``, ``x-amz-checksum-crc32``) and, on an https endpoint, an
aws-chunked body with a trailing checksum (``STREAMING-UNSIGNED-PAYLOAD-TRAILER``). Many
S3-compatible servers and gateways refuse them (Backblaze B2: "Unsupported header
'x-amz-sdk-checksum-algorithm'"; Storj's gateway: MissingContentLength; Apache Ozone and
Scality before their fixes) or read the framing wrongly. The store sends them the classic form,
with Content-MD5, which every S3 server verifies; AWS itself keeps botocore's defaults.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os

import pytest
from botocore.awsrequest import AWSResponse

from tests.s3_proxy import ConditionProxy
from versions.store import S3Store


@pytest.fixture
def strict(s3_server, s3_bucket):
    """(proxy, store): the test bucket behind a server that refuses flexible checksums."""
    with ConditionProxy(s3_server.endpoint_url, "pass", access_key=s3_server.access_key,
                        secret_key=s3_server.secret_key, refuse_checksums=True) as proxy:
        yield proxy, S3Store(s3_bucket, "engram", endpoint_url=proxy.endpoint_url)


def test_a_server_that_refuses_flexible_checksums_takes_every_write_and_read(strict):
    proxy, store = strict
    data = bytes(range(256)) * 41
    etag = store.put("objects/a.bin", data)
    assert store.get("objects/a.bin") == data
    store.put("CURRENT", b"1", if_none_match=True)
    store.put("CURRENT", b"2", if_match=store.head("CURRENT").etag)
    assert store.get("CURRENT") == b"2" and store.head("objects/a.bin").size == len(data) and etag
    assert store.list("objects/") == ["objects/a.bin"]
    store.delete("objects/a.bin")
    assert store.list("objects/") == []
    puts = [headers for method, _, headers in proxy.headers if method == "PUT"]
    assert len(puts) == 3 and all(not any(k.startswith("x-amz-checksum-") or k == "x-amz-sdk-checksum-algorithm"
                                          for k in headers) for headers in puts)
    assert puts[0]["content-md5"] == base64.b64encode(hashlib.md5(data).digest()).decode()


class _Body(io.BytesIO):
    def stream(self, *args, **kwargs):
        yield self.getvalue()


def _sent_put(store: S3Store) -> tuple[dict[str, str], bytes]:
    """The headers and body botocore would send for one PUT (answered here, never sent)."""
    sent = []

    def answer(request, **kwargs):
        body = request.body.read() if hasattr(request.body, "read") else request.body
        sent.append(({k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}, body))
        return AWSResponse(request.url, 200, {"ETag": '"e"'}, _Body(b""))

    store._client.meta.events.register("before-send.s3", answer)
    store.put("objects/x", b"hello world")
    return sent[0]


@pytest.fixture
def aws_env(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_CONFIG_FILE": "/nonexistent/engram-test-aws-config"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_REQUEST_CHECKSUM_CALCULATION",
                 "AWS_RESPONSE_CHECKSUM_VALIDATION"):
        monkeypatch.delenv(name, raising=False)


def test_an_https_s3_compatible_endpoint_gets_a_plain_body_with_content_md5(aws_env):
    headers, body = _sent_put(S3Store("bucket", "p", endpoint_url="https://minio.internal:9000"))
    assert body == b"hello world" and headers["content-length"] == "11"
    assert headers["content-md5"] == base64.b64encode(hashlib.md5(b"hello world").digest()).decode()
    assert "content-encoding" not in headers and "x-amz-trailer" not in headers
    assert not any(k.startswith("x-amz-checksum-") or k == "x-amz-sdk-checksum-algorithm" for k in headers)


def test_aws_itself_and_an_operators_explicit_setting_keep_botocores_checksums(aws_env, monkeypatch):
    for endpoint in (None, "https://s3.eu-west-1.amazonaws.com", "https://bucket.vpce-1a2b.s3.us-east-1.vpce.amazonaws.com"):
        headers, body = _sent_put(S3Store("bucket", "p", endpoint_url=endpoint))
        assert headers["x-amz-trailer"] == "x-amz-checksum-crc32" and "content-md5" not in headers, endpoint
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    headers, _ = _sent_put(S3Store("bucket", "p", endpoint_url="https://minio.internal:9000"))
    assert headers["x-amz-trailer"] == "x-amz-checksum-crc32" and "content-md5" in headers


def test_a_night_stats_and_a_pull_through_a_server_that_refuses_flexible_checksums(strict, tmp_path, tiny_dir, tiny,
                                                                                    monkeypatch):
    """The whole path, as an operator on such a server runs it: a night (its partial checkpoints,
    shards, stats parts, manifest, CURRENT), a stats query (DuckDB over the parts) and a node's pull."""
    from engram_core.serving import greedy_tokens
    from jobs.nightly import run_nightly
    from jobs.spec import NightlySpec
    from jobs.synthetic import fact_log_rows, write_fact_log
    from pipeline.stats import query_stats
    from serving.pull import PullClient

    proxy, store = strict
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
    rows = fact_log_rows(4, 3)
    write_fact_log(rows, tmp_path / "log" / "part-0.parquet")
    night = run_nightly(NightlySpec(store=store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir),
                                    num_shards=2, workers=0))
    assert (night.version, night.published, night.facts_ok) == (1, True, 12)
    assert query_stats(store, "select count(*) as n from facts where status = 'ok'").to_pylist() == [{"n": 12}]
    client = PullClient(store, tiny, cache_dir=tmp_path / "cache")
    assert client.poll().error is None
    for row in rows:
        want = tiny.encode_answer(row["answer"])
        assert greedy_tokens(tiny, row["trigger"], len(want), client.deltas_for(row["user_id"])) == want, row
    refused = [(m, p) for m, p, h in proxy.headers if any(k.startswith("x-amz-checksum-") or k == "x-amz-trailer"
                                                          or k == "x-amz-sdk-checksum-algorithm" for k in h)]
    assert refused == [] and sum(1 for m, _, _ in proxy.headers if m == "PUT") > 10


def test_pyarrows_s3_reads_of_fact_logs_and_layers_use_the_classic_form_too(strict, s3_server, tmp_path, tiny_dir,
                                                                              monkeypatch):
    """pyarrow's S3FileSystem (its AWS C++ SDK) reads S3 fact logs and, for `engram stats`, the
    layer objects; it sent `x-amz-checksum-mode: enabled` on every GET, which such a server
    refuses: the night could not read its fact log, stats could not read a layer."""
    from jobs.nightly import run_nightly
    from jobs.spec import NightlySpec
    from jobs.synthetic import fact_log_rows, write_fact_log
    from pipeline.stats import query_stats
    from versions.catalog import read_manifest

    proxy, store = strict
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
    for night, rows in enumerate((fact_log_rows(4, 3), fact_log_rows(1, 2, seed=1, day=1)), start=1):
        write_fact_log(rows, tmp_path / f"part-{night}.parquet")
        s3_server.client().upload_file(str(tmp_path / f"part-{night}.parquet"), store.bucket,
                                       f"log{night}/part-0.parquet")
        result = run_nightly(NightlySpec(store=store.uri, fact_log=f"s3://{store.bucket}/log{night}/",
                                         model=str(tiny_dir), num_shards=2, workers=0, compact_layer_share=1e3))
        assert (result.version, result.published) == (night, True)
    layers = [layer.key for entry in read_manifest(store, 2).shards for layer in entry.layers]
    assert len(layers) == 1
    assert query_stats(store, "select count(distinct user_id) as n from users").to_pylist() == [{"n": 4}]
    read = {p.split("?")[0] for m, p, _ in proxy.headers if m == "GET"}
    assert f"/{store.bucket}/engram/{layers[0]}" in read and f"/{store.bucket}/log2/part-0.parquet" in read
    refused = [(m, p) for m, p, h in proxy.headers if any(k.startswith("x-amz-checksum-") or k == "x-amz-trailer"
                                                          for k in h)]
    assert refused == []


def test_an_operators_checksum_setting_reaches_pyarrow_and_the_environment_is_restored(strict, monkeypatch):
    proxy, store = strict
    monkeypatch.delenv("AWS_RESPONSE_CHECKSUM_VALIDATION", raising=False)
    store.put("objects/a", b"abc")
    filesystem, base = store.arrow_filesystem()
    assert filesystem.open_input_file(f"{base}/objects/a").read() == b"abc"
    assert "AWS_RESPONSE_CHECKSUM_VALIDATION" not in os.environ
    monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_supported")  # the operator's choice wins
    chosen = S3Store(store.bucket, "engram", endpoint_url=store.endpoint_url)
    assert chosen._checksum_settings == {"request_checksum_calculation": "when_required"}
    filesystem, base = chosen.arrow_filesystem()
    with pytest.raises(OSError):  # this server refuses x-amz-checksum-mode
        filesystem.open_input_file(f"{base}/objects/a").read()
    assert os.environ["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "when_supported"
    modes = [h.get("x-amz-checksum-mode") for m, _, h in proxy.headers if m == "GET"]
    assert modes[0] is None and modes[-1] == "enabled"


@pytest.mark.parametrize("where", ["endpoint_url", "services"])
def test_fact_logs_go_to_the_endpoint_of_the_aws_profile_as_the_store_does(strict, s3_server, tmp_path, monkeypatch,
                                                                          where):
    """pyarrow reads no profile's endpoint_url (nor a `services` section): with the endpoint set
    only there, the store wrote to it and the night's fact logs went to AWS ("Could not resolve
    host: <bucket>.s3.us-east-1.amazonaws.com"). Both now resolve it as boto3 does."""
    from jobs.synthetic import fact_log_rows, write_fact_log
    from pipeline.ingest import read_fact_log
    from pipeline.stats import query_stats
    from versions.store import open_store

    proxy, _ = strict
    write_fact_log(fact_log_rows(2, 2), tmp_path / "part-0.parquet")
    s3_server.client().upload_file(str(tmp_path / "part-0.parquet"), _.bucket, "log/day=1/part-0.parquet")
    endpoint = (f"endpoint_url = {proxy.endpoint_url}\n" if where == "endpoint_url" else
                f"services = local\n[services local]\ns3 =\n  endpoint_url = {proxy.endpoint_url}\n")
    (tmp_path / "config").write_text(f"[profile team]\nregion = us-east-1\naws_access_key_id = {s3_server.access_key}\n"
                                     f"aws_secret_access_key = {s3_server.secret_key}\n{endpoint}")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "team")
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    store = open_store(f"s3://{_.bucket}/engram")
    assert store.endpoint_url == proxy.endpoint_url
    assert read_fact_log(f"s3://{_.bucket}/log").rows.num_rows == 4
    assert query_stats(store, "select 1 as one").to_pylist() == [{"one": 1}]
    assert f"/{_.bucket}/log/day%3D1/part-0.parquet" in {p.split("?")[0] for m, p, _h in proxy.headers if m == "GET"}


def test_no_thread_takes_another_threads_momentary_checksum_setting_for_the_operators(strict):
    """arrow_checksum_env sets AWS_*_CHECKSUM_* for a pyarrow filesystem's construction; a store
    built meanwhile in another thread (a night's stats beside its ingest, Ray tasks on threads)
    read them as the operator's choice and kept botocore's checksums for its own pyarrow reads,
    which such a server refuses."""
    import threading

    from versions.store import arrow_checksum_env, classic_checksum_settings

    proxy, store = strict
    both = classic_checksum_settings(store.endpoint_url)
    assert len(both) == 2
    inside, release, built = threading.Event(), threading.Event(), {}

    def hold():
        with arrow_checksum_env(both):
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait(10)
    builder = threading.Thread(target=lambda: built.update(store=S3Store(store.bucket, "engram",
                                                                        endpoint_url=proxy.endpoint_url)))
    builder.start()
    builder.join(1.0)
    release.set()
    holder.join(10)
    builder.join(10)
    assert built["store"]._checksum_settings == both
    assert "AWS_REQUEST_CHECKSUM_CALCULATION" not in os.environ
