"""The serving-side pull client: follow CURRENT, verify, hot-swap, keep serving on any failure."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
import torch

from engram_core.compiler import CompileOptions, Fact, compile_facts
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


def publish(store, em, users: dict, *, fingerprint: str | None = None, num_shards: int = NUM_SHARDS):
    """Publish ``{user: delta}`` as the next version (every shard written); returns the manifest."""
    current = read_current(store)
    previous = current[0] if current else None
    payloads = {}
    for shard in range(num_shards):
        mine = {u: (d, 2) for u, d in users.items() if shard_of(u, num_shards) == shard}
        payloads[shard] = ShardPayload(bundle=encode_bundle(bundle_table(mine)), state=_state_bytes())
    return publish_version(store, shard_payloads=payloads, previous=previous,
                           fingerprint=fingerprint or em.fingerprint, num_shards=num_shards,
                           job_id="test", watermark=f"w{previous.version + 1 if previous else 1}")


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


def test_model_publish_and_fetch_round_trip(local_store, tiny_dir, tmp_path):
    fp = publish_model(local_store, tiny_dir)
    assert publish_model(local_store, tiny_dir) == fp  # second time: already there
    path = fetch_model(local_store, fp, tmp_path / "cache")
    assert path.is_dir() and fetch_model(local_store, fp, tmp_path / "cache") == path
    with pytest.raises(ModelError, match="not published"):
        fetch_model(local_store, "0" * 64, tmp_path / "cache")


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

    # with a local model of another fingerprint: refused
    other = tmp_path / "other"
    from engram_core.tiny import init_tiny

    init_tiny(other, seed=1, adapter=False)
    refused = CliRunner().invoke(cli_app(), ["ask", "--store", str(local_store.root), "--user", "alice",
                                             "--model", str(other), trigger])
    assert refused.exit_code == 1 and "fingerprint" in refused.output


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
