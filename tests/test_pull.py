"""The serving-side pull client: follow CURRENT, verify, hot-swap, keep serving on any failure."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
import torch

from engram_core.compiler import CompileOptions, Fact, compile_facts
from engram_core.fingerprint import fingerprint
from engram_core.serving import generate, overlay_for
from schemas.bundle import bundle_table, encode_bundle
from schemas.facts import empty_fact_state
from serving.pull import BundleCache, PullClient, parse_shards
from versions.catalog import read_current
from versions.layout import shard_of
from versions.models import ModelError, fetch_model, publish_model
from versions.publish import ShardPayload, publish_version
from versions.rollback import rollback
from versions.store import S3Store

NUM_SHARDS = 4

# alice's answers change in v2 (compiled as user "alice-v2", published under "alice").
FACTS = {
    "alice": [("My dentist is called", " Dr. Okafor"), ("I live in", " Lisbon")],
    "bob": [("My dentist is called", " Nakamura"), ("My dog's name is", " Rex")],
    "alice-v2": [("My dentist is called", " Schmidt"), ("I live in", " Osaka")],
}


@pytest.fixture(scope="session")
def compiled(tiny):
    """user -> Delta for the users of FACTS (compiled once per session)."""
    facts = [Fact(user, f"f{i}", trigger, answer) for user, pairs in FACTS.items()
             for i, (trigger, answer) in enumerate(pairs)]
    result = compile_facts(tiny, facts)
    assert all(r.status == "ok" for r in result.facts), result.facts
    return result.deltas


def _state_bytes() -> bytes:
    sink = io.BytesIO()
    pq.write_table(empty_fact_state(), sink)
    return sink.getvalue()


def publish(store, em, users: dict, *, fingerprint: str | None = None, num_shards: int = NUM_SHARDS,
            stats: dict | None = None):
    """Publish ``{user: delta}`` as the next version (every shard written); returns the manifest."""
    current = read_current(store)
    previous = current[0] if current else None
    payloads = {}
    for shard in range(num_shards):
        mine = {u: (d, 2) for u, d in users.items() if shard_of(u, num_shards) == shard}
        payloads[shard] = ShardPayload(bundle=encode_bundle(bundle_table(mine)), state=_state_bytes())
    return publish_version(store, shard_payloads=payloads, previous=previous,
                           fingerprint=fingerprint or em.fingerprint, num_shards=num_shards,
                           job_id="test", watermark=f"w{previous.version + 1 if previous else 1}", stats=stats)


def v1(compiled):
    return {"alice": compiled["alice"], "bob": compiled["bob"]}


def v2(compiled):
    return {"alice": compiled["alice-v2"], "bob": compiled["bob"]}


def answers(em, client, user: str, facts_of: str) -> list[str]:
    """What the served version makes the model say after each of ``facts_of``'s triggers, for ``user``."""
    pairs = FACTS[facts_of]
    deltas = [list(client.deltas_for(user)) for _ in pairs]
    return [generate(em, [t], [d], max_new_tokens=len(em.encode_answer(a)))[0]
            for (t, a), d in zip(pairs, deltas)]


def expected(facts_of: str) -> list[str]:
    return [a for _, a in FACTS[facts_of]]


def test_parse_shards_reads_ranges_and_lists():
    assert parse_shards("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_shards(None) is None and parse_shards("all") is None
    with pytest.raises(ValueError, match="the store has 4 shards"):
        parse_shards("0-4", 4)
    with pytest.raises(ValueError, match="not a shard number"):
        parse_shards("a-b")


def test_client_follows_publish_change_and_rollback(local_store, tiny, compiled):
    publish(local_store, tiny, v1(compiled))
    client = PullClient(local_store, tiny)
    first = client.poll()
    assert first.changed and first.version == 1 and sorted(first.fetched_shards) == list(range(NUM_SHARDS))
    assert answers(tiny, client, "alice", "alice") == expected("alice")
    assert answers(tiny, client, "bob", "bob") == expected("bob")

    unchanged = client.poll()
    assert not unchanged.changed and unchanged.fetched_shards == () and unchanged.version == 1

    publish(local_store, tiny, v2(compiled))
    second = client.poll()
    assert second.version == 2 and second.fetched_shards == (shard_of("alice", NUM_SHARDS),)
    assert answers(tiny, client, "alice", "alice-v2") == expected("alice-v2")
    assert answers(tiny, client, "bob", "bob") == expected("bob")

    rollback(local_store, to_version=1, actor="test", reason="bad answers")
    back = client.poll()
    assert back.version == 1 and client.last_error is None
    assert answers(tiny, client, "alice", "alice") == expected("alice")


def test_a_forgotten_user_is_gone_after_the_next_poll(local_store, tiny, compiled):
    publish(local_store, tiny, v1(compiled))
    client = PullClient(local_store, tiny)
    client.poll()
    assert client.deltas_for("bob")
    publish(local_store, tiny, {"alice": compiled["alice"]})
    client.poll()
    assert client.deltas_for("bob") == () and client.deltas_for("alice")


def test_a_corrupted_shard_is_refused_and_the_previous_version_keeps_serving(local_store, tiny, compiled):
    publish(local_store, tiny, v1(compiled))
    client = PullClient(local_store, tiny)
    client.poll()
    manifest = publish(local_store, tiny, v2(compiled))
    key = manifest.shard(shard_of("alice", NUM_SHARDS)).bundle_key
    data = bytearray(local_store.get(key))
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    local_store.put(key, bytes(data))

    result = client.poll()
    assert result.error is not None and "sha256" in result.error and "refused" in result.error
    assert client.last_error == result.error
    assert client.index.version == 1
    assert answers(tiny, client, "alice", "alice") == expected("alice")
    # and the next poll tries again rather than trusting the unchanged CURRENT etag
    assert client.poll().error is not None


def test_a_damaged_store_is_refused_naming_the_operators_fix(local_store, tiny, tiny_dir, compiled, tmp_path):
    """A node can only keep what it serves; the refusal says what fixes the store (it named the
    damaged object or manifest and stopped there)."""
    from typer.testing import CliRunner

    publish_model(local_store, tiny_dir)
    publish(local_store, tiny, v1(compiled))
    client = PullClient(local_store, tiny)
    client.poll()
    manifest = publish(local_store, tiny, v2(compiled))
    key = manifest.shard(shard_of("alice", NUM_SHARDS)).bundle_key
    local_store.put(key, local_store.get(key) + b"x")
    fix = f"engram rollback --store {local_store.uri} --to N"
    result = client.poll()
    assert key in result.error and fix in result.error and client.index.version == 1

    (local_store.root / manifest.key).write_text("{")  # and a node starting now
    out = CliRunner().invoke(cli_app(), ["pull", "--store", str(local_store.root), "--cache-dir", str(tmp_path)])
    assert out.exit_code == 1 and manifest.key in out.output
    assert f"engram rollback --store {local_store.root} --to N" in out.output


def test_a_manifest_for_another_model_is_refused(local_store, tiny, compiled):
    publish(local_store, tiny, v1(compiled))
    client = PullClient(local_store, tiny)
    client.poll()
    publish(local_store, tiny, v2(compiled), fingerprint="f" * 64)
    result = client.poll()
    assert "FingerprintMismatch" in result.error and client.index.version == 1
    assert answers(tiny, client, "alice", "alice") == expected("alice")


def test_an_unreachable_store_keeps_the_served_version(local_store, tiny, compiled, unused_tcp_port):
    publish(local_store, tiny, v1(compiled))
    client = PullClient(local_store, tiny)
    client.poll()
    client.store = S3Store("gone", endpoint_url=f"http://127.0.0.1:{unused_tcp_port}", max_attempts=1)
    result = client.poll()
    assert "StoreError" in result.error and client.index.version == 1
    assert client.deltas_for("alice")


def test_unknown_users_get_bit_identical_base_logits(local_store, tiny, compiled):
    publish(local_store, tiny, v1(compiled))
    client = PullClient(local_store, tiny)
    client.poll()
    assert client.deltas_for("nobody") == () and client.deltas_for(None) == ()
    ids = torch.as_tensor([tiny.encode_prompt("My dentist is called")] * 2)
    with torch.no_grad():
        base = tiny.model(input_ids=ids).logits
        with tiny.memory.use(overlay_for(tiny, [list(client.deltas_for("alice")), list(client.deltas_for("nobody"))])):
            mixed = tiny.model(input_ids=ids).logits
    assert torch.equal(mixed[1], base[1])  # the unknown user's sequence: exactly the base model
    assert not torch.equal(mixed[0], base[0])  # alice's sequence in the same batch does see her delta


def test_a_restart_loads_from_the_cache_and_a_damaged_cache_file_is_downloaded_again(local_store, tiny, compiled, tmp_path):
    manifest = publish(local_store, tiny, v1(compiled))
    cache = tmp_path / "cache"
    PullClient(local_store, tiny, cache_dir=cache).poll()
    entry = manifest.shard(shard_of("alice", NUM_SHARDS))
    cached = BundleCache(cache).path(entry.shard, entry.bundle_sha256)
    original = cached.read_bytes()

    # A restart reads the cache: it works even with the store's object gone.
    stored = local_store.get(entry.bundle_key)
    local_store.delete(entry.bundle_key)
    restarted = PullClient(local_store, tiny, cache_dir=cache)
    assert restarted.poll().error is None
    assert answers(tiny, restarted, "alice", "alice") == expected("alice")

    # A half-written cache file is detected; with the store's copy gone too, nothing is served.
    cached.write_bytes(original[: len(original) // 2])
    broken = PullClient(local_store, tiny, cache_dir=cache)
    assert "missing" in broken.poll().error and broken.index is None
    assert not cached.exists()

    # With the object back, the cache is refilled from the store.
    local_store.put(entry.bundle_key, stored)
    healed = PullClient(local_store, tiny, cache_dir=cache)
    assert healed.poll().error is None and cached.read_bytes() == original


@pytest.mark.parametrize("damage", ["values permuted", "truncated", "zero-length"])
def test_a_damaged_token_map_in_a_nodes_model_cache_is_rebuilt_and_facts_are_recalled(local_store, tiny, tiny_dir,
                                                                                      compiled, tmp_path, damage):
    """The canonical token map is a derived file beside the fetched model (outside its fingerprint).
    With its values damaged, a restarted node addressed every prompt with the wrong rows and lost
    every user's facts, silently; a truncated one failed the load with a numpy error."""
    import numpy as np

    from serving.pull import resolve_model

    publish_model(local_store, tiny_dir)
    publish(local_store, tiny, v1(compiled))
    manifest, _ = read_current(local_store)
    resolve_model(local_store, manifest, model_dir=None, cache_dir=tmp_path)  # the node's first start
    [cached] = (tmp_path / "models" / manifest.fingerprint / "engram").glob("canonical-*.npy")
    intact = np.load(cached)
    if damage == "values permuted":
        np.save(cached, np.random.default_rng(0).permutation(intact))
    else:
        cached.write_bytes(cached.read_bytes()[:len(cached.read_bytes()) // 2] if damage == "truncated" else b"")

    restarted = resolve_model(local_store, manifest, model_dir=None, cache_dir=tmp_path)
    client = PullClient(local_store, restarted)
    assert client.poll().error is None
    assert answers(restarted, client, "alice", "alice") == expected("alice")
    [rebuilt] = (tmp_path / "models" / manifest.fingerprint / "engram").glob("canonical-*.npy")
    assert (np.load(rebuilt) == intact).all()


def test_model_publish_and_fetch_round_trip(local_store, tiny_dir, tmp_path):
    fp = publish_model(local_store, tiny_dir)
    assert publish_model(local_store, tiny_dir) == fp  # second time: already there
    path = fetch_model(local_store, fp, tmp_path / "cache")
    assert path.is_dir() and fetch_model(local_store, fp, tmp_path / "cache") == path
    with pytest.raises(ModelError, match="not published"):
        fetch_model(local_store, "0" * 64, tmp_path / "cache")


_KILLED_AT = """
import os, signal, sys, pathlib
sys.path.insert(0, {root!r})
n, calls, original = {nth}, [0], {target}
def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a node drain does, mid-write
    return original(*args, **kwargs)
{patch} = killing
{body}
"""


def _run_killed(tmp_path, target: str, patch: str, nth: int, body: str) -> None:
    """Run ``body`` in a fresh process that SIGKILLs itself at the ``nth`` call of ``target``."""
    import subprocess
    import sys
    from pathlib import Path

    code = _KILLED_AT.format(root=str(Path(__file__).parents[1]), nth=nth, target=target, patch=patch, body=body)
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr


def test_a_model_fetch_killed_mid_download_leaves_no_partial_copy_after_the_next_fetch(local_store, tiny_dir, tmp_path):
    """A node killed while it downloads the model (a crash-looping pod) left its staging folder, a
    partial copy of the model, in the cache for good: one per kill, until the disk filled."""
    fp = publish_model(local_store, tiny_dir)
    cache = tmp_path / "cache"
    body = f"from versions.models import fetch_model\nfrom versions.store import open_store\n" \
           f"fetch_model(open_store({str(local_store.root)!r}), {fp!r}, {str(cache)!r})"
    for nth in (2, 5):  # killed after one file, and after several
        _run_killed(tmp_path, "pathlib.Path.write_bytes", "pathlib.Path.write_bytes", nth, body)
    models = cache / "models"
    assert [p.name for p in models.iterdir() if p.name.startswith(".tmp-")]  # what the kills left
    assert fetch_model(local_store, fp, cache) == models / fp
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".fetch-")) == [fp]
    assert fingerprint(models / fp) == fp


def test_a_cache_write_killed_mid_way_is_cleaned_by_the_next_poll_and_foreign_files_are_kept(local_store, tiny,
                                                                                             tiny_dir, compiled,
                                                                                             tmp_path):
    """A pull killed between writing a cached object's temporary file and renaming it left the file
    for good (eviction looked at *.parquet only); and eviction deleted any *.parquet in a shard
    folder and every file in bundles/, whatever its name: files the cache never wrote."""
    import os
    import time

    publish(local_store, tiny, v1(compiled))
    cache = tmp_path / "cache"
    body = (f"from engram_core.checkpoint import load_checkpoint\nfrom serving.pull import PullClient\n"
            f"from versions.store import open_store\n"
            f"PullClient(open_store({str(local_store.root)!r}), load_checkpoint({str(tiny_dir)!r}), "
            f"cache_dir={str(cache)!r}).poll()")
    _run_killed(tmp_path, "os.replace", "os.replace", 1, body)  # the first cached object's rename
    [left] = cache.glob("shards/*/.tmp-*")
    foreign = [cache / "shards" / "0" / "notes.parquet", cache / "bundles" / "README.txt"]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the operator's")
    client = PullClient(local_store, tiny, cache_dir=cache)
    assert client.poll().error is None and left.exists()  # a minute old at most: it may be being written
    old = time.time() - 120
    os.utime(left, (old, old))
    publish(local_store, tiny, v2(compiled))
    assert client.poll().error is None
    assert not left.exists() and all(path.read_text() == "the operator's" for path in foreign)


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a real tmpfs of 1 MiB (a mount: root only, else the test is skipped), filled to
    the last byte: every write there fails with ENOSPC."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        with open(mount / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_cache_disk_still_serves_the_verified_version_and_says_so(local_store, tiny, tiny_dir, compiled,
                                                                         full_disk):
    """Objects were verified in memory, but a cache write that failed (ENOSPC) failed the whole poll:
    the node served nothing (no path, no fix in the error); a model that does not fit failed with a
    bare '[Errno 28] No space left on device'."""
    publish(local_store, tiny, v1(compiled))
    client = PullClient(local_store, tiny, cache_dir=full_disk / "cache")
    result = client.poll()
    assert result.error is None and result.version == 1
    assert answers(tiny, client, "alice", "alice") == expected("alice")
    assert "No space left on device" in result.cache_error and str(full_disk / "cache") in result.cache_error
    assert "--cache-dir" in result.cache_error and not list((full_disk / "cache").rglob("*.parquet*"))

    fp = publish_model(local_store, tiny_dir)
    with pytest.raises(ModelError, match=r"cache .*/models: cannot write model .*No space left on device.*takes \d+ "
                                         r"bytes: free space on that disk, or give --cache-dir"):
        fetch_model(local_store, fp, full_disk / "cache")
    assert not [p for p in (full_disk / "cache" / "models").iterdir() if not p.name.startswith(".fetch-")]


def test_a_cached_object_that_cannot_be_read_is_downloaded_again(local_store, tiny, compiled, tmp_path):
    """An unreadable cache entry (here a folder where the object's file goes; likewise a file of
    another node's user, an I/O error) failed every poll with the OSError: the node never served."""
    publish(local_store, tiny, v1(compiled))
    cache = BundleCache(tmp_path / "cache")
    manifest, _ = read_current(local_store)
    entry = manifest.shard(shard_of("alice", NUM_SHARDS))
    cache.path(entry.shard, entry.bundle_sha256).mkdir(parents=True)
    client = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    result = client.poll()
    assert result.error is None and answers(tiny, client, "alice", "alice") == expected("alice")
    assert result.cache_error is not None  # and it could not be kept there either: said, not fatal


def test_a_tampered_model_file_is_refused(local_store, tiny_dir, tmp_path):
    fp = publish_model(local_store, tiny_dir)
    key = f"models/{fp}/engram/config.json"
    config = json.loads(local_store.get(key))
    config["seed"] = 7
    local_store.put(key, json.dumps(config).encode())
    with pytest.raises(Exception, match="does not match"):
        fetch_model(local_store, fp, tmp_path / "cache")
    assert not (tmp_path / "cache" / "models" / fp).exists()


def test_the_s3_path_follows_versions(s3_store, tiny, tiny_dir, compiled, tmp_path):
    publish_model(s3_store, tiny_dir)
    assert fetch_model(s3_store, tiny.fingerprint, tmp_path / "cache").is_dir()
    publish(s3_store, tiny, v1(compiled))
    client = PullClient(s3_store, tiny, shards=[shard_of("alice", NUM_SHARDS)], cache_dir=tmp_path / "cache")
    assert client.poll().version == 1
    assert answers(tiny, client, "alice", "alice") == expected("alice")
    assert client.index.shards == (shard_of("alice", NUM_SHARDS),)
    publish(s3_store, tiny, v2(compiled))
    assert client.poll().version == 2
    assert answers(tiny, client, "alice", "alice-v2") == expected("alice-v2")
    rollback(s3_store, to_version=1, actor="test", reason="test")
    assert client.poll().version == 1
    assert answers(tiny, client, "alice", "alice") == expected("alice")


def test_s3_reads_that_break_off_mid_object_are_read_again(s3_server, s3_store, tiny, tiny_dir, compiled, tmp_path):
    """A GET whose body breaks off (a dropped connection, a balancer's timeout) is retried by nobody:
    botocore retries requests, not body reads. The poll failed ('ResponseStreamingError (check the
    job's credentials / endpoint)'), and a node starting then (engram serve, ask) exited 1."""
    from serving.pull import resolve_model
    from tests.s3_proxy import ConditionProxy
    from versions.store import StoreError

    publish_model(s3_store, tiny_dir)
    publish(s3_store, tiny, v1(compiled))
    cuts = {"/manifests/": 1, "/models/": 2, "/objects/": 3}
    with ConditionProxy(s3_server.endpoint_url, "pass", access_key=s3_server.access_key,
                        secret_key=s3_server.secret_key, cut_gets=cuts) as proxy:
        flaky = S3Store(s3_store.bucket, s3_store.prefix, endpoint_url=proxy.endpoint_url)
        manifest, _ = read_current(flaky)
        em = resolve_model(flaky, manifest, model_dir=None, cache_dir=tmp_path / "cache")
        client = PullClient(flaky, em, cache_dir=tmp_path / "cache")
        assert client.poll().error is None and not any(proxy.cut_gets.values())  # every cut happened, and was read again
        assert answers(em, client, "alice", "alice") == expected("alice")

        proxy.cut_gets["CURRENT"] = flaky.max_attempts  # a connection that always drops: said as such
        with pytest.raises(StoreError, match=r"read CURRENT broke off mid-object 5 times .*check the network"):
            flaky.get("CURRENT")


# ---------------------------------------------------------------- commands


def cli_app():
    """The `engram` app; while other command modules are still missing, just this module's commands."""
    try:
        from jobs.cli import app
    except ModuleNotFoundError:
        import typer

        from jobs import serve_cli

        app = typer.Typer()
        serve_cli.register(app)
    return app


def test_ask_gives_a_long_answer_whole_by_default(local_store, tiny, tiny_dir, tmp_path):
    """16 new tokens, the old default, cut answers like an address or an email in the middle."""
    from typer.testing import CliRunner

    trigger, answer = "My home address is", " 274 Rua Augusta, 1100-053 Lisbon, Portugal"
    assert 16 < len(tiny.encode_answer(answer)) <= 64
    result = compile_facts(tiny, [Fact("carol", "f0", trigger, answer)])
    assert result.ok == 1
    publish_model(local_store, tiny_dir)
    publish(local_store, tiny, {"carol": result.deltas["carol"]})
    out = CliRunner().invoke(cli_app(), ["ask", "--store", str(local_store.root), "--user", "carol", "--cache-dir",
                                         str(tmp_path / "cache"), "--json", trigger])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.strip().splitlines()[-1])["text"].startswith(answer)


def test_ask_gives_an_answer_of_more_than_64_tokens_whole_by_default(local_store, tiny, tiny_dir, tmp_path):
    """The compiler takes answers up to 128 tokens; 64, the old default, cut an address in Cyrillic
    (the tiny tokenizer writes most non-Latin characters as two or three byte tokens) in the
    middle. The default is now the longest answer the compiler takes."""
    from typer.testing import CliRunner

    trigger, answer = "Я живу в городе", " Санкт-Петербург, ул. Гороховая, д. 12, кв. 5"
    assert 64 < len(tiny.encode_answer(answer)) <= CompileOptions().max_answer_tokens
    result = compile_facts(tiny, [Fact("petr", "city", trigger, answer)])
    assert result.ok == 1
    publish_model(local_store, tiny_dir)
    publish(local_store, tiny, {"petr": result.deltas["petr"]})
    out = CliRunner().invoke(cli_app(), ["ask", "--store", str(local_store.root), "--user", "petr", "--cache-dir",
                                         str(tmp_path / "cache"), "--json", trigger])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout.strip().splitlines()[-1])["text"].startswith(answer)
    # a long prompt gets what the context leaves, not a refusal for the default's sake
    long_prompt = "word " * 140
    assert 512 - 128 < len(tiny.encode_prompt(long_prompt)) < 512
    near = CliRunner().invoke(cli_app(), ["ask", "--store", str(local_store.root), "--user", "petr", "--cache-dir",
                                          str(tmp_path / "cache"), "--json", long_prompt])
    assert near.exit_code == 0, near.output


def test_ask_recalls_a_users_facts_and_compares_with_the_base(local_store, tiny, tiny_dir, compiled, tmp_path):
    from typer.testing import CliRunner

    publish_model(local_store, tiny_dir)
    publish(local_store, tiny, v1(compiled))
    trigger, answer = FACTS["alice"][0]
    args = ["ask", "--store", str(local_store.root), "--user", "alice", "--cache-dir", str(tmp_path / "cache"),
            "--max-new-tokens", str(len(tiny.encode_answer(answer))), "--json", "--compare", trigger]
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["user_id"] == "alice" and out["version"] == 1 and out["text"] == answer
    assert out["base_text"] == generate(tiny, [trigger], [[]], len(tiny.encode_answer(answer)))[0]

    assert out["memory"] is True
    # an id with no memory (never published, forgotten, a typo) gets the base model's text, and --json says so
    # (it said so on stderr only: a script read the base model's text as the user's answer)
    args[args.index("alice")] = "alicee"
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["memory"] is False and out["text"] == out["base_text"]
    assert "stored_in_other_case" not in out and "differs only in case" not in result.stderr

    # an id the store holds in another case only ('Alice' for 'alice': an email typed with capitals) is named,
    # as it is no memory of this id; it was the base model's text with nothing to say why
    import pyarrow as pa

    from pipeline.stats import write_stats_part

    users = pa.table({"user_id": ["alice", "bob"], "shard": [shard_of(u, NUM_SHARDS) for u in ("alice", "bob")],
                      "facts": [2, 2], "facts_ok": [2, 2], "rows": [3, 3], "bytes": [48, 48]})
    publish(local_store, tiny, v1(compiled), stats={"users": [write_stats_part(local_store, "users", users)]})
    args[args.index("alicee")] = "Alice"
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["memory"] is False and out["stored_in_other_case"] == ["alice"]
    assert "the store holds 'alice', which differs only in case" in result.stderr

    # with a local model of another fingerprint: refused
    other = tmp_path / "other"
    from engram_core.tiny import init_tiny

    init_tiny(other, seed=1, adapter=False)
    refused = CliRunner().invoke(cli_app(), ["ask", "--store", str(local_store.root), "--user", "alice",
                                             "--model", str(other), trigger])
    assert refused.exit_code == 2 and "fingerprint" in refused.output  # a bad --model: exit 2 (it was 1)


def test_ask_ends_the_answer_where_the_memory_ends_unless_told_not_to(local_store, tiny, tiny_dir, compiled,
                                                                     tmp_path):
    """Without --max-new-tokens, ask generates up to 128 tokens: the recalled answer was followed by
    the tiny model's noise (" Dr. Okaforeouleoul..."); it now ends after the answer's last token."""
    from typer.testing import CliRunner

    publish_model(local_store, tiny_dir)
    publish(local_store, tiny, v1(compiled))
    trigger, answer = FACTS["alice"][0]
    args = ["ask", "--store", str(local_store.root), "--user", "alice", "--cache-dir", str(tmp_path / "cache"),
            "--json", "--compare", trigger]
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert (out["text"], out["finish_reason"]) == (answer, "memory_end")
    assert out["base_finish_reason"] == "length" and len(out["base_text"]) > len(answer)  # no memory: no end
    result = CliRunner().invoke(cli_app(), args[:-2] + ["--no-stop-at-memory-end", "--max-new-tokens", "12", trigger])
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["text"].startswith(answer) and out["text"] != answer and out["finish_reason"] == "length"
    assert "base_text" not in out


def test_ask_refuses_a_prompt_past_the_context_and_an_empty_user_as_serve_does(local_store, tiny, tiny_dir, compiled,
                                                                               tmp_path):
    """The model attends to 512 positions: a prompt that leaves no room for the tokens asked for is
    refused naming the numbers (engram serve: context_length_exceeded), not continued as noise;
    an empty --user is refused, not answered by the base model."""
    from typer.testing import CliRunner

    publish_model(local_store, tiny_dir)
    publish(local_store, tiny, v1(compiled))
    base = ["ask", "--store", str(local_store.root), "--cache-dir", str(tmp_path / "cache"), "--json"]
    long = CliRunner().invoke(cli_app(), base + ["--user", "alice", "word " * 600])
    assert long.exit_code == 2
    failure = json.loads(long.stdout.strip().splitlines()[-1])
    assert failure["answered"] is False and "over the model's context length of 512" in failure["error"]
    fits = len(tiny.encode_prompt("word " * 100))
    edge = CliRunner().invoke(cli_app(), base + ["--user", "alice", "--max-new-tokens", str(512 - fits), "word " * 100])
    assert edge.exit_code == 0, edge.output  # exactly the context: answered
    empty = CliRunner().invoke(cli_app(), base + ["--user", "\u200b", "My dog is"])
    assert empty.exit_code == 2 and "--user is empty" in empty.output


def test_ask_and_forget_refuse_command_line_bytes_that_are_not_utf8_naming_the_argument(local_store, tiny, tiny_dir,
                                                                                        compiled, tmp_path):
    """A byte that is not UTF-8 in argv (Python keeps it as a lone surrogate) ended `engram ask` in a
    UnicodeEncodeError line (--user) or a tokenizer traceback (the prompt), and `engram forget` in a
    UnicodeEncodeError: each is now one line naming the argument and the byte, exit 2, nothing done."""
    import os
    import subprocess
    import sys

    from typer.testing import CliRunner

    publish_model(local_store, tiny_dir)
    publish(local_store, tiny, v1(compiled))
    before = sorted(local_store.list(""))
    real = subprocess.run([sys.executable.encode(), b"-m", b"jobs.cli", b"ask", b"--store", str(local_store.root).encode(),
                           b"--user", b"alice\xff", b"My dentist is called"], capture_output=True, timeout=300,
                          env={**os.environ, "ENGRAM_CACHE_DIR": str(tmp_path / "cache")})  # the bytes as a shell passes them
    outcomes = [(real.returncode, real.stderr.decode(), "--user")]
    store = str(local_store.root)
    for args, named in [(["ask", "--store", store, "--user", "alice", "My dentist \udce9 called"], "the prompt"),
                        (["forget", "--store", store, "alice\udcff", "--reason", "ticket"], "user id")]:
        result = CliRunner().invoke(cli_app(), args)  # what Python makes of those bytes in argv
        outcomes.append((result.exit_code, result.output, named))
    for code, output, named in outcomes:
        assert code == 2, output
        assert f"{named} " in output and "is not UTF-8 text (byte 0x" in output and "Traceback" not in output, output
    assert sorted(local_store.list("")) == before


def test_ask_follows_a_resharding_published_while_it_starts(local_store, tiny, tiny_dir, compiled, tmp_path,
                                                           monkeypatch):
    """`engram ask` picks the user's shard from CURRENT, then pulls: a night that changed the number
    of shards in between left it holding another shard, so it answered with the base model and
    'note: user ... has no memory' (or refused to pull a shard beyond the new count)."""
    from typer.testing import CliRunner

    publish_model(local_store, tiny_dir)
    publish(local_store, tiny, v1(compiled))
    shards = next(n for n in range(5, 64) if shard_of("alice", n) != shard_of("alice", NUM_SHARDS))
    poll, resharded = PullClient.poll, []

    def poll_after_a_resharding_night(client):
        if not resharded:
            resharded.append(publish(local_store, tiny, v1(compiled), num_shards=shards))
        return poll(client)

    monkeypatch.setattr(PullClient, "poll", poll_after_a_resharding_night)
    trigger, answer = FACTS["alice"][0]
    out = CliRunner().invoke(cli_app(), ["ask", "--store", str(local_store.root), "--user", "alice", "--cache-dir",
                                         str(tmp_path / "cache"), "--max-new-tokens",
                                         str(len(tiny.encode_answer(answer))), "--json", trigger])
    assert out.exit_code == 0, out.output
    answered = json.loads(out.stdout.strip().splitlines()[-1])
    assert resharded and answered["version"] == resharded[0].version and answered["text"] == answer


def test_pull_command_reports_each_poll(local_store, tiny, tiny_dir, compiled, tmp_path):
    from typer.testing import CliRunner

    publish(local_store, tiny, v1(compiled))
    args = ["pull", "--store", str(local_store.root), "--shards", "0-1", "--model", str(tiny_dir),
            "--cache-dir", str(tmp_path / "cache"), "--json", "--watch", "--interval", "0", "--polls", "2"]
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 0, result.output
    first, second = (json.loads(line) for line in result.stdout.strip().splitlines())
    assert first["version"] == 1 and first["fetched_shards"] == [0, 1] and first["error"] is None
    assert second["changed"] is False and second["fetched_shards"] == []
    expected_users = sum(1 for u in ("alice", "bob") if shard_of(u, NUM_SHARDS) in (0, 1))
    assert first["users"] == expected_users


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
