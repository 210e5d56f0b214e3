"""A store that does not enforce conditional writes is refused before any work, by every writer.

The faulty stores are the real test S3 server (weed) behind a loopback proxy (tests/s3_proxy.py)
that drops the condition headers from PUTs, or answers them with 501: how some S3-compatible
servers and gateways behave.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from jobs.nightly import run_nightly
from jobs.spec import NightlySpec
from jobs.synthetic import fact_log_rows, write_fact_log
from tests.s3_proxy import ConditionProxy
from versions.store import ConditionalWritesUnsupported, PreconditionFailed, open_store


@pytest.fixture
def proxied(s3_server, s3_bucket, monkeypatch):
    """proxied(mode) -> (proxy, store URI); the AWS endpoint now points at the proxy."""
    proxies = []

    def start(mode: str):
        proxy = ConditionProxy(s3_server.endpoint_url, mode, access_key=s3_server.access_key,
                               secret_key=s3_server.secret_key).__enter__()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        return proxy, f"s3://{s3_bucket}/engram"

    yield start
    for proxy in proxies:
        proxy.__exit__(None, None, None)


def bucket_keys(s3_server, bucket: str) -> list[str]:
    """Every key in the bucket, listed on the server itself (not through the proxy)."""
    return [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_a_store_that_enforces_both_conditions_passes_the_probe_and_keeps_no_probe_object(any_store):
    any_store.check_conditional_writes()
    assert any_store.list("") == []
    any_store.put("k", b"1", if_none_match=True)
    with pytest.raises(PreconditionFailed):  # and the store still enforces them afterwards
        any_store.put("k", b"2", if_none_match=True)


def test_the_probe_runs_once_per_store_object(proxied):
    proxy, uri = proxied("pass")
    store = open_store(uri)
    store.check_conditional_writes()
    probed = proxy.puts_with_conditions()
    assert probed == 4  # create, create again, wrong etag, right etag
    store.check_conditional_writes()
    assert proxy.puts_with_conditions() == probed
    open_store(uri).check_conditional_writes()  # another store object (another run) proves it again
    assert proxy.puts_with_conditions() == 2 * probed


def test_the_proxy_really_makes_the_store_ignore_conditions(proxied):
    _, uri = proxied("ignore")
    store = open_store(uri)
    store.put("k", b"first")
    store.put("k", b"second", if_none_match=True)  # would raise PreconditionFailed on the server itself
    store.put("k", b"third", if_match="0" * 32)
    assert store.get("k") == b"third"


def test_a_store_that_ignores_conditional_writes_is_refused_naming_it_and_the_fix(proxied, s3_server, s3_bucket):
    _, uri = proxied("ignore")
    store = open_store(uri)
    with pytest.raises(ConditionalWritesUnsupported) as refused:
        store.check_conditional_writes()
    message = str(refused.value)
    assert uri in message and "If-None-Match" in message and "proxy or gateway" in message
    assert bucket_keys(s3_server, s3_bucket) == []  # the probe object is gone
    with pytest.raises(ConditionalWritesUnsupported):  # a refusal is not cached as a success
        store.check_conditional_writes()


def test_a_store_that_answers_conditional_writes_with_501_is_refused_naming_it(proxied, s3_server, s3_bucket):
    _, uri = proxied("501")
    with pytest.raises(ConditionalWritesUnsupported, match=r"If-None-Match: \* with an error .*NotImplemented") as refused:
        open_store(uri).check_conditional_writes()
    assert uri in str(refused.value)
    assert bucket_keys(s3_server, s3_bucket) == []


@pytest.mark.parametrize("mode", ["ignore", "501"])
def test_a_nightly_run_on_such_a_store_fails_at_the_start_and_leaves_nothing(mode, proxied, s3_server, s3_bucket,
                                                                            tmp_path, tiny_dir):
    _, uri = proxied(mode)
    write_fact_log(fact_log_rows(3, 2), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    with pytest.raises(ConditionalWritesUnsupported, match=uri):
        run_nightly(spec)
    assert bucket_keys(s3_server, s3_bucket) == []  # no model files, no partial chunks, no probe


@pytest.mark.parametrize("command", [["rollback", "--to", "1"], ["forget", "user-42"], ["gc", "--keep", "2"]])
def test_operator_commands_that_write_refuse_such_a_store_with_one_clear_line(command, proxied):
    _, uri = proxied("ignore")
    result = CliRunner().invoke(app, [*command, "--store", uri])
    assert result.exit_code != 0
    assert "does not enforce conditional writes" in result.output and uri in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("etags", ["unquoted", "weak", "opaque"])
def test_a_server_writing_etags_its_own_way_passes_the_probe_and_its_compare_and_swap_holds(proxied, s3_server,
                                                                                           s3_bucket, etags):
    """ETags without quotes, weak ones (W/"...", as a gateway that compresses answers marks
    them: the store sent them back as '"W/"..."' and the probe refused the store, blaming its
    conditional writes) and ones that are not the body's MD5 (multipart-style '...-1')."""
    proxy, uri = proxied("pass")
    proxy.etags = etags
    store = open_store(uri)
    store.check_conditional_writes()
    first = store.put("CURRENT", b"1", if_none_match=True)
    assert store.head("CURRENT").etag == first == store.get_with_etag("CURRENT")[1]
    assert '"' not in first and not first.startswith("W/")
    second = store.put("CURRENT", b"2", if_match=first)
    with pytest.raises(PreconditionFailed):  # a stale etag still loses
        store.put("CURRENT", b"3", if_match=first)
    store.put("CURRENT", b"4", if_match=second)
    assert store.get("CURRENT") == b"4"


def test_a_conditional_write_whose_answer_was_lost_after_it_landed_is_this_writes_not_a_conflict(proxied):
    """A server that fails after committing (500, a gateway's 502/504): botocore retries the
    write, and the retry fails its own condition. The audit record after CURRENT moved then
    failed the night ("created or changed by another writer") although it had published, and a
    lost answer to the probe's first write refused the store as not enforcing conditions."""

    proxy, uri = proxied("pass")
    store = open_store(uri)
    proxy.lose_answers = {("PUT", "/.engram-probe/"): 1}
    store.check_conditional_writes()
    proxy.lose_answers = {("PUT", "/audit/a.json"): 1, ("PUT", "/CURRENT"): 2}
    assert store.put("audit/a.json", b"record", if_none_match=True) == store.head("audit/a.json").etag
    first = store.put("CURRENT", b"1", if_none_match=True)
    second = store.put("CURRENT", b"2", if_match=first)
    assert store.get_with_etag("CURRENT") == (b"2", second) and not any(proxy.lose_answers.values())
    proxy.fail = {("PUT", "/CURRENT"): [503]}  # retried too, but another writer's bytes are there: a conflict
    with pytest.raises(PreconditionFailed):
        store.put("CURRENT", b"3", if_match=first)
    proxy.fail = {("PUT", "/audit/a.json"): [503]}
    with pytest.raises(PreconditionFailed):
        store.put("audit/a.json", b"another record", if_none_match=True)
    assert store.get("CURRENT") == b"2" and store.get("audit/a.json") == b"record"
