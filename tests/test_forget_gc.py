"""Forgetting a user and collecting old versions, on real stores (a directory and S3)."""

from __future__ import annotations

import json
import shlex
import re
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from engram_core.delta import Delta
from pipeline.stats import query_stats, write_stats_part
from schemas.bundle import bundle_table, encode_bundle
from schemas.stats import STATS_SCHEMAS
from schemas.facts import FACT_STATE_SCHEMA, decode_fact_state, encode_fact_state, fact_hash
from versions.catalog import list_versions, load_shard_bundle, read_audit, read_current, read_manifest
from versions.forget import forget_user, scan_for_user
from versions.layout import forgotten_id, shard_of
from versions.publish import ShardPayload, publish_version
from versions.retention import collect, retained_versions
from versions.errors import UnknownVersion
from versions.rollback import rollback

NUM_SHARDS = 4
WIDTH = 8
USERS = [f"user-{i}" for i in range(10)]
TARGET = "user-3"


def _delta(rng: np.random.Generator) -> Delta:
    rows = int(rng.integers(1, 5))
    return Delta.from_unsorted(np.zeros(rows, np.int16), rng.choice(5000, rows, replace=False),
                               rng.standard_normal((rows, WIDTH)).astype(np.float16))


def _state(facts: dict[str, list[tuple[str, str, str]]]) -> bytes:
    rows = [{"user_id": u, "fact_id": f, "scope": u, "trigger": t, "answer": a,
             "event_time": datetime(2026, 1, 1, tzinfo=timezone.utc), "fact_hash": fact_hash(u, t, a)}
            for u in sorted(facts) for f, t, a in facts[u]]
    return encode_fact_state(pa.Table.from_pylist(rows, schema=FACT_STATE_SCHEMA))


def _payloads(day: int, users: list[str], shards=range(NUM_SHARDS)) -> dict[int, ShardPayload]:
    """Per shard: a bundle and fact state for ``users`` as of ``day`` (seeded: same day, same bytes)."""
    rng = np.random.default_rng(day)
    facts = {u: [(f"f{k}", f"My thing {k} is", f" {u} answer {k} day {day}") for k in range(2)] for u in users}
    deltas = {u: (_delta(rng), 2) for u in users}
    out = {}
    for shard in shards:
        mine = [u for u in users if shard_of(u, NUM_SHARDS) == shard]
        out[shard] = ShardPayload(encode_bundle(bundle_table({u: deltas[u] for u in mine})),
                                  _state({u: facts[u] for u in mine}))
    return out


def _stats(version: int, users: list[str]) -> dict[str, pa.Table]:
    return {
        "facts": pa.table({"user_id": [u for u in users for _ in range(2)], "fact_id": ["f0", "f1"] * len(users),
                           "status": ["ok"] * 2 * len(users), "loss": [0.1] * 2 * len(users),
                           "steps": [15] * 2 * len(users), "rows": [3] * 2 * len(users)}),
        "users": pa.table({"user_id": users, "shard": [shard_of(u, NUM_SHARDS) for u in users],
                           "facts": [2] * len(users), "facts_ok": [2] * len(users), "rows": [3] * len(users),
                           "bytes": [48] * len(users)}),
        "collisions": pa.table({"layer": [0], "row_id": [7], "owners": [3], "owner_kind": ["users"],
                                "example_owners": [[users[0], TARGET, users[-1]]]}),
    }


def _publish(store, day: int, users: list[str], previous, shards=range(NUM_SHARDS)):
    stats = {name: [write_stats_part(store, name, table)] for name, table in _stats(day, users).items()}
    return publish_version(store, shard_payloads=_payloads(day, users, shards), previous=previous,
                           fingerprint="fp", num_shards=NUM_SHARDS, job_id=f"job-{day}",
                           watermark=f"2026-01-0{day}", stats=stats)


@pytest.fixture
def four_versions(any_store):
    """v1..v4: the target's shard changes on days 1, 2 and 4; v3 only touches other shards."""
    store = any_store
    v1 = _publish(store, 1, USERS, None)
    v2 = _publish(store, 2, USERS, v1)
    other = [s for s in range(NUM_SHARDS) if s != shard_of(TARGET, NUM_SHARDS)]
    v3 = _publish(store, 3, USERS, v2, shards=other)
    v4 = _publish(store, 4, USERS, v3)
    return store, [v1, v2, v3, v4]


def _shows_user_nowhere(store, manifest) -> bool:
    bundle = load_shard_bundle(store, manifest.shard(shard_of(TARGET, NUM_SHARDS)))
    entry = manifest.shard(shard_of(TARGET, NUM_SHARDS))
    state = decode_fact_state(store.get(entry.state_key))
    return TARGET not in bundle.column("user_id").to_pylist() and TARGET not in state.column("user_id").to_pylist()


# ---------------------------------------------------------------- forget


def test_forget_then_rollback_to_every_retained_version_shows_the_user_nowhere(four_versions):
    store, versions = four_versions
    assert scan_for_user(store, TARGET)  # bundles, state and stats hold the user before
    report = forget_user(store, TARGET, actor="dpo@example.com", reason="GDPR erasure request 42")
    assert report.found and sorted(report.rewritten) == [1, 2, 3, 4]
    assert scan_for_user(store, TARGET) == []  # every object in the store, read back
    retained = [info.version for info in list_versions(store)]
    assert retained == sorted(report.rewritten.values())
    for version in retained:
        target = rollback(store, version, reason="test", actor="ops")
        assert forgotten_id(TARGET) in target.forgotten
        assert _shows_user_nowhere(store, target)
        assert scan_for_user(store, TARGET) == []
    # Everyone else is intact in the rewrite of CURRENT.
    current, _ = read_current(store)
    users = set()
    for entry in current.shards:
        users |= set(load_shard_bundle(store, entry).column("user_id").to_pylist())
    assert users == set(USERS) - {TARGET}


def test_forget_moves_current_and_keeps_roll_forward_targets(four_versions):
    store, versions = four_versions
    rollback(store, 3, reason="bad v4", actor="ops")
    report = forget_user(store, TARGET, actor="ops", reason="request")
    assert report.current_version == report.rewritten[3]
    retained = [info.version for info in list_versions(store)]
    assert report.rewritten[4] in retained and report.rewritten[4] > report.current_version
    assert read_manifest(store, report.rewritten[4]).parent == report.rewritten[3]


def test_forget_rewrites_stats_and_records_the_forget_hashed(four_versions):
    store, versions = four_versions
    report = forget_user(store, TARGET, actor="ops", reason="request")
    table = query_stats(store, "SELECT DISTINCT version FROM facts ORDER BY version")
    assert table.column("version").to_pylist() == sorted(report.rewritten.values())
    assert query_stats(store, f"SELECT count(*) AS n FROM users WHERE user_id = '{TARGET}'").column("n")[0].as_py() == 0
    records = [r for r in read_audit(store) if r["event"] == "forget"]
    assert records[-1]["forgotten"] == forgotten_id(TARGET) and records[-1]["reason"] == "request"
    assert TARGET not in json.dumps(read_audit(store))


def test_forgetting_an_unknown_user_says_so_and_still_records_the_forget(four_versions):
    """A user not published yet (their events still on the way) must stay forgotten: the forget
    tombstone is recorded in every retained version's rewrite, so the next night refuses the
    user's events up to the forget (it used to record nothing, and the night published the user)."""
    store, versions = four_versions
    before = {info.version: read_manifest(store, info.version) for info in list_versions(store)}
    report = forget_user(store, "nobody-like-this", actor="ops", reason="request")
    assert not report.found and "not found" in report.message and "recorded" in report.message
    assert report.refused_until is not None and sorted(report.rewritten) == sorted(before)
    for old, new in report.rewritten.items():
        manifest = read_manifest(store, new)
        assert forgotten_id("nobody-like-this") in manifest.forgotten
        for entry, was in zip(manifest.shards, before[old].shards):  # nobody's data changed
            if entry.shard != shard_of("nobody-like-this", NUM_SHARDS):
                assert entry == was
            else:  # only its tombstones: the forget's
                assert (entry.bundle_key, entry.layers, entry.users, entry.facts) == (was.bundle_key, was.layers, was.users,
                                                                                      was.facts)
                assert decode_fact_state(store.get(entry.state_key)) == decode_fact_state(store.get(was.state_key))
                assert entry.tombstones_key != was.tombstones_key
    # a second forget of the same absent user has nothing left to record
    again = forget_user(store, "nobody-like-this", actor="ops", reason="request")
    assert not again.found and not again.rewritten and again.current_version == report.current_version


def test_forget_twice_is_a_no_op_the_second_time(local_store):
    v1 = _publish(local_store, 1, USERS, None)
    first = forget_user(local_store, TARGET, actor="ops", reason="r")
    second = forget_user(local_store, TARGET, actor="ops", reason="r")
    assert first.found and not second.found
    assert second.current_version == first.current_version != v1.version


def test_a_rewrite_of_a_rewrite_names_the_nights_job_once(four_versions):
    """Each forget rewrote every retained version with "forget:" before its job id, so after 22 forgets
    a version's job_id was "forget:" 22 times before the night's: a rewrite names the night's job once."""
    store, _ = four_versions
    for user in (TARGET, *[u for u in USERS if u != TARGET][:2]):
        forget_user(store, user, actor="ops", reason="request")
    jobs = sorted(read_manifest(store, info.version).job_id for info in list_versions(store))
    assert jobs == ["forget:job-1", "forget:job-2", "forget:job-3", "forget:job-4"]


def test_a_forget_given_again_reports_until_when_the_recorded_forget_refuses_events(local_store):
    """`engram forget --json` of an id whose forget CURRENT already holds said `refused_until: null`
    (top level and per user): it reports the recorded forget's time, as the first forget did."""
    _publish(local_store, 1, USERS, None)
    first = json.loads(_engram("forget", "--store", local_store.uri, TARGET, "--json").stdout)
    assert first["found"] is True and first["refused_until"]
    again = _engram("forget", "--store", local_store.uri, TARGET, "--json")
    assert again.exit_code == 0, again.output
    second = json.loads(again.stdout)
    assert second["rewritten"] == {} and second["found"] is False
    assert second["refused_until"] == first["refused_until"] == second["users"][0]["refused_until"]
    assert f"its events up to {first['refused_until']} are refused" in second["users"][0]["message"]
    assert "the forget is already recorded" in second["message"]
    text = _engram("forget", "--store", local_store.uri, TARGET)
    assert f"events up to {first['refused_until']} are refused" in text.stdout


def test_a_nightly_publish_after_a_forget_carries_the_forget(local_store):
    v1 = _publish(local_store, 1, USERS, None)
    forget_user(local_store, TARGET, actor="ops", reason="r")
    current, _ = read_current(local_store)
    v_next = _publish(local_store, 2, [u for u in USERS if u != TARGET], current)
    assert forgotten_id(TARGET) in v_next.forgotten
    with pytest.raises(UnknownVersion, match=f"version {v1.version} was rewritten by forgets as v{current.version} "
                                             f"\\(roll back to v{current.version};"):
        rollback(local_store, v1.version, reason="r", actor="ops")
    second = forget_user(local_store, USERS[5], actor="ops", reason="r")  # rewrites the rewrite of v1 again
    again = second.rewritten[current.version]
    with pytest.raises(UnknownVersion, match=f"as v{current.version} -> v{again} \\(roll back to v{again};"):
        rollback(local_store, v1.version, reason="r", actor="ops")
    rollback(local_store, again, reason="r", actor="ops")  # the hint names a version that can be rolled back to


# ---------------------------------------------------------------- gc


def test_gc_keeps_exactly_what_it_must(four_versions):
    store, (v1, v2, v3, v4) = four_versions
    rollback(store, 3, reason="bad v4", actor="ops")  # v4 is now a roll-forward target
    dry = collect(store, keep=1, dry_run=True)
    assert dry.deleted_versions == [1, 2] and dry.kept_versions == [3, 4]
    assert [info.version for info in list_versions(store)] == [1, 2, 3, 4]  # dry run deletes nothing
    report = collect(store, keep=1, dry_run=False)
    assert report.deleted_objects == dry.deleted_objects
    assert [info.version for info in list_versions(store)] == [3, 4]
    kept = [read_manifest(store, 3), read_manifest(store, 4)]
    referenced = {k for m in kept for e in m.shards for k in (e.bundle_key, e.state_key)}
    on_store = set(store.list("objects/"))
    assert on_store == referenced  # nothing unreferenced survives, nothing referenced goes
    stats_parts = {k for m in kept for table in STATS_SCHEMAS for k in m.stats_parts(table)}
    assert set(store.list("stats/")) == stats_parts and stats_parts
    for version in (4, 3):  # both still load completely
        rollback(store, version, reason="check", actor="ops")
    assert read_audit(store)[-3]["event"] == "gc"


def test_gc_never_collects_current_even_when_it_is_old(four_versions):
    store, _ = four_versions
    rollback(store, 1, reason="r", actor="ops")
    report = collect(store, keep=1)
    assert report.kept_versions == [1, 2, 3, 4] and report.deleted_versions == []


def test_gc_removes_orphan_manifests_of_crashed_runs_below_current(local_store):
    v1 = _publish(local_store, 1, USERS, None)

    def crash(step):
        if step == "swap_current":
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        publish_version(local_store, shard_payloads=_payloads(2, USERS), previous=v1, fingerprint="fp",
                        num_shards=NUM_SHARDS, job_id="crashed", watermark="x", crash_hook=crash)
    _publish(local_store, 3, USERS, v1)  # takes v3: v2 is the crashed run's orphan
    report = collect(local_store, keep=5)
    assert report.orphan_manifests == [2] and report.deleted_versions == []


@pytest.mark.parametrize("keep", [0, -1])
def test_gc_refuses_keep_zero(local_store, keep):
    _publish(local_store, 1, USERS, None)
    with pytest.raises(ValueError, match="at least 1"):
        collect(local_store, keep=keep)


def test_retained_versions_rule():
    assert retained_versions([1, 2, 3, 4, 5], current=5, keep=2) == [4, 5]
    assert retained_versions([1, 2, 3, 4, 5], current=2, keep=1) == [2, 3, 4, 5]


# ---------------------------------------------------------------- commands


def test_forget_and_gc_commands(local_store):
    from jobs.cli import app

    _publish(local_store, 1, USERS, None)
    v1, _ = read_current(local_store)
    _publish(local_store, 2, USERS, v1)
    runner = CliRunner()
    out = runner.invoke(app, ["forget", "--store", str(local_store.root), TARGET, "--reason", "ticket 7", "--json"])
    assert out.exit_code == 0, out.output
    reported = json.loads(out.output)
    assert reported["found"] is True and reported["forgotten"] is True and len(reported["users"]) == 1
    # the operator learns until when the id's events are refused: a day past the command's clock
    refused_until = datetime.fromisoformat(reported["refused_until"])
    ahead = refused_until - datetime.now(timezone.utc)
    assert timedelta(hours=23) < ahead <= timedelta(days=1)
    out = runner.invoke(app, ["forget", "--store", str(local_store.root), USERS[1]])
    assert out.exit_code == 0 and "later nights refuse this user's events stamped up to" in out.output
    # an id no version holds (yet): not found, and the forget is recorded all the same
    out = runner.invoke(app, ["forget", "--store", str(local_store.root), "ghost", "--json"])
    ghost = json.loads(out.output)
    assert out.exit_code == 0 and ghost["found"] is False and ghost["rewritten"]
    assert timedelta(hours=23) < datetime.fromisoformat(ghost["refused_until"]) - datetime.now(timezone.utc)
    out = runner.invoke(app, ["forget", "--store", str(local_store.root), "ghost2"])
    assert out.exit_code == 0 and "not found" in out.output and "later nights refuse" in out.output
    out = runner.invoke(app, ["forget", "--store", str(local_store.root), "ghost2"])  # already recorded
    assert out.exit_code == 0 and "not found" in out.output and "later nights refuse" not in out.output
    # several users: one object (README: --json prints one object), each user's report under users
    out = runner.invoke(app, ["forget", "--store", str(local_store.root), "ghost3", USERS[2], "--json"])
    assert out.exit_code == 0, out.output
    both = json.loads(out.output)
    assert both["forgotten"] is True and both["found"] is True and len(both["users"]) == 2
    assert [u["found"] for u in both["users"]] == [False, True] and len(both["user_hashes"]) == 2
    assert "ghost3" not in out.output and USERS[2] not in out.output  # hashes only, never the ids
    out = runner.invoke(app, ["gc", "--store", str(local_store.root), "--keep", "1", "--dry-run", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["dry_run"] is True and json.loads(out.output)["collected"] is True
    out = runner.invoke(app, ["gc", "--store", str(local_store.root), "--keep", "0"])
    assert out.exit_code != 0 and "at least 1" in out.output


def test_forget_of_an_id_the_store_holds_only_in_another_case_names_the_stored_id(local_store):
    """An erasure request quotes the id as the person wrote it ('ana.silva@example.com'); the log
    kept another case ('Ana.Silva@Example.com'). Ids are case-sensitive, so `engram forget` found
    nobody and said "no data of theirs is stored": the operator closed the request, the data stayed
    served. It still forgets exactly the id given (never folded), and says which stored ids differ
    only in case, with the command that forgets one (text: on stderr; --json: a count per user on
    stdout, which holds hashes only, never ids)."""
    from jobs.cli import app

    stored = "Ana.Silva@Example.com"
    _publish(local_store, 1, USERS + [stored], None)
    runner = CliRunner()
    out = runner.invoke(app, ["forget", "--store", str(local_store.root), "ana.silva@example.com"])
    assert out.exit_code == 0, out.output
    assert "not found" in out.stdout and stored not in out.stdout
    assert f"'ana.silva@example.com' is not stored, but {stored!r} is" in out.stderr
    assert "differs only in case" in out.stderr
    command = out.stderr.split("forget it too: ", 1)[1].splitlines()[0]
    assert shlex.split(command) == ["engram", "forget", "--store", str(local_store.root), stored]  # as a shell reads it
    version = read_current(local_store)[0].version
    assert stored in query_stats(local_store, f"select user_id from users where version = {version}"
                                 ).column("user_id").to_pylist()  # never folded: the stored id is kept
    out = runner.invoke(app, ["forget", "--store", str(local_store.root), "ANA.SILVA@EXAMPLE.COM", USERS[1], "--json"])
    assert out.exit_code == 0, out.output
    reported = json.loads(out.stdout)
    assert [u["stored_in_other_case"] for u in reported["users"]] == [1, 0]
    assert stored not in out.stdout and "differs only in case" in out.stderr
    out = runner.invoke(app, ["forget", "--store", str(local_store.root), "ghost"])  # no such id in any case
    assert out.exit_code == 0 and "differs only in case" not in out.stderr


def test_forgets_note_of_an_id_in_another_case_is_a_command_a_shell_reads_as_the_stored_id(local_store):
    """The note's forget command is pasted into a shell: an id with a quote and a '$' (repr printed
    "O'Brien$HOME..." in double quotes, where the shell expands $HOME) comes back as the stored id."""
    from jobs.cli import app

    stored = "O'Brien$HOME@Example.com"
    _publish(local_store, 1, USERS + [stored], None)
    out = CliRunner().invoke(app, ["forget", "--store", str(local_store.root), "o'brien$home@example.com"])
    assert out.exit_code == 0, out.output
    command = out.stderr.split("forget it too: ", 1)[1].splitlines()[0]
    assert shlex.split(command) == ["engram", "forget", "--store", str(local_store.root), stored]


def test_forget_of_several_users_is_one_rewrite_one_current_move_and_reports_each(four_versions):
    """`engram forget A B C` rewrote the store once per id: three ids made three rounds of versions
    and moved CURRENT three times (every serving node re-pulled each time). Now every id given is
    forgotten in one rewrite of the retained versions: one new version per retained one, one CURRENT
    move, one forget audit record, and each id still gets its own line (found or not)."""
    store, versions = four_versions
    uri = store.uri
    audit_before = len(read_audit(store))
    others = [u for u in USERS if u != TARGET and shard_of(u, NUM_SHARDS) != shard_of(TARGET, NUM_SHARDS)]
    given = [TARGET, "ghost-9", others[0], TARGET]  # found, absent, found in another shard, repeated
    out = _engram("forget", "--store", uri, *given, "--reason", "ticket 8", "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert sorted(report["rewritten"]) == ["1", "2", "3", "4"]  # each retained version once
    assert sorted(report["rewritten"].values()) == [5, 6, 7, 8] and report["current_version"] == 8
    assert [info.version for info in list_versions(store)] == [5, 6, 7, 8]
    assert [u["found"] for u in report["users"]] == [True, False, True, True]
    assert [u["user_hash"] for u in report["users"]] == [forgotten_id(u) for u in given]
    assert all(u["refused_until"] == report["refused_until"] is not None for u in report["users"])
    moves = [r for r in read_audit(store)[audit_before:] if r["event"] in ("forget", "rollback", "publish")]
    assert [r["event"] for r in moves] == ["forget"]  # one CURRENT move
    current, _ = read_current(store)
    assert {forgotten_id(u) for u in given} <= set(current.forgotten)
    assert scan_for_user(store, TARGET) == [] and scan_for_user(store, others[0]) == []
    assert not any(u in out.stdout for u in given)  # hashes only, never the ids
    # the text form: one line per id, then the rewrite once
    out = _engram("forget", "--store", uri, others[1], "ghost-10")
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"{others[1]}: found") and lines[1].startswith("ghost-10: not found")
    assert sum("rewrote" in line for line in lines) == 1
    assert "forgot 1 of 2 users (the others not found: their forget is recorded) in 4 version(s)" in out.stdout
    assert [info.version for info in list_versions(store)] == [9, 10, 11, 12]


def test_forget_with_one_bad_id_among_several_refuses_them_all_before_rewriting(four_versions):
    """One id that is bad input (empty once invisible characters go, or not UTF-8) refuses the whole
    command, naming it, exit 2, and nothing is rewritten (the ids before it were forgotten before)."""
    store, versions = four_versions
    audit_before = read_audit(store)
    for bad in ("\u200b", "u-\udcff"):
        out = _engram("forget", "--store", store.uri, TARGET, bad, USERS[1], "--json")
        assert out.exit_code == 2, out.output
        failure = json.loads(out.stdout)
        assert failure["forgotten"] is False and "nothing was forgotten" in failure["error"]
        assert ascii(bad) in failure["error"] or repr(bad) in failure["error"]
    assert [info.version for info in list_versions(store)] == [1, 2, 3, 4]
    assert read_audit(store) == audit_before and scan_for_user(store, TARGET)


def test_forget_takes_an_id_ingest_rejects_and_says_when_nothing_was_stored(four_versions):
    """An id that breaks ingest's rules (over 256 characters, a control character) can still be in a
    version: its events' rows in the rejects stats keep the id they came with. So forget takes it
    (a refusal there, for one day of 2026-12-03, left such rows unforgettable); only an id that is
    empty once invisible characters go is refused. An id not stored is recorded, and the report
    says no data of it is stored."""
    from versions.forget import forget_users

    store, versions = four_versions
    for odd in ("u" * 300, "u-\x07bell"):
        out = _engram("forget", "--store", store.uri, odd)
        assert out.exit_code == 0, out.output
        assert "no data of theirs is stored; the forget is recorded (its tombstone alone, data unchanged)" in out.output
    out = _engram("forget", "--store", store.uri, "\u200b", "--json")  # a zero-width space alone
    assert out.exit_code == 2 and "is empty once invisible characters are removed" in json.loads(out.stdout)["error"]
    with pytest.raises(ValueError, match="empty once invisible characters"):
        forget_users(store, ["\u200b"], actor="ops", reason="request")


def test_a_forgotten_user_whose_id_holds_a_slash_leaves_no_collision_owner_name():
    """Within-user collision owners are named ``user/fact``; a user id may hold "/" itself."""
    import numpy as np
    import pyarrow as pa

    from pipeline.collisions import within_user_collision_table
    from versions.forget import _holds_users, _without_users

    table = within_user_collision_table({"org/alice": {"f1": np.array([5, 6]), "f2": np.array([6, 7])},
                                         "bob": {"g1": np.array([1, 2]), "g2": np.array([2, 3])}})
    assert _holds_users(table, pa.array(["org/alice"]))
    scrubbed = _without_users(table, pa.array(["org/alice"]))
    owners = [o for ls in scrubbed.column("example_owners").to_pylist() for o in ls or []]
    assert owners and not any(o.startswith("org/alice/") for o in owners)
    assert any(o.startswith("bob/") for o in owners)  # another user's names stay
    assert not _holds_users(scrubbed, pa.array(["org/alice"]))
    assert not _holds_users(table, pa.array(["alice"]))  # a suffix is not the user


def _a_night_names(store, bundle: str, size: int) -> None:
    """A night in progress writes its manifest (not CURRENT): TARGET's shard names ``bundle``."""
    from dataclasses import replace

    from versions.catalog import read_pointer
    from versions.commit import write_manifest

    shard = shard_of(TARGET, NUM_SHARDS)
    current = read_manifest(store, read_pointer(store).version)
    sha = bundle.split("/")[-1].removesuffix(".parquet")
    shards = tuple(replace(e, bundle_key=bundle, bundle_sha256=sha, bundle_bytes=size) if e.shard == shard else e
                   for e in current.shards)
    write_manifest(store, replace(current, version=current.version + 1, parent=current.version, shards=shards,
                                  job_id="night-in-progress"), read_pointer(store))


def test_forget_records_the_unreferenced_objects_it_deletes_first_and_keeps_those_a_manifest_named_meanwhile(
        local_store, monkeypatch):
    """Objects no manifest names that hold the user (a killed night's, or a night's in progress) are
    recorded (audit ``forget_deletes``) before the first delete, and the manifests are read again
    after the record: one a night wrote in between (its version about to be published) keeps its
    objects; the others go. A night writing its manifest later finds the record (jobs.nightly)."""
    import hashlib

    import versions.forget as forget
    from schemas.manifest import bundle_key

    v1 = _publish(local_store, 1, USERS, None)
    rng = np.random.default_rng(7)
    keys, sizes = [], []
    for _ in range(2):  # two bundles holding the user that no manifest names
        data = encode_bundle(bundle_table({TARGET: (_delta(rng), 2)}))
        keys.append(bundle_key(hashlib.sha256(data).hexdigest()))
        sizes.append(len(data))
        local_store.put(keys[-1], data)
    named, unnamed = keys
    real = forget.append_audit

    def record_then_a_night_writes_its_manifest(store, event, **fields):
        out = real(store, event, **fields)
        if event == forget.FORGET_DELETES and named in fields.get("keys", ()):
            _a_night_names(store, named, sizes[0])
        return out

    monkeypatch.setattr(forget, "append_audit", record_then_a_night_writes_its_manifest)
    report = forget_user(local_store, TARGET, actor="ops", reason="r")
    assert report.found and unnamed in report.deleted_objects and named not in report.deleted_objects
    assert local_store.head(named) is not None and local_store.head(unnamed) is None
    recorded = [r for r in read_audit(local_store) if r["event"] == "forget_deletes"]
    assert len(recorded) == 1 and set(keys) <= set(recorded[0]["keys"])
    assert v1.version != read_current(local_store)[0].version


def test_gc_records_the_objects_it_deletes_first_and_keeps_those_a_manifest_named_meanwhile(local_store, monkeypatch):
    """gc records the objects it is about to delete (audit ``gc_deletes``) and reads the manifests
    again after the record: an unreferenced bundle that a night's manifest, written in between,
    names is kept; the other goes (a night writing its manifest later finds the record)."""
    import hashlib

    import versions.retention as retention
    from schemas.manifest import bundle_key

    _publish(local_store, 1, USERS, None)
    rng = np.random.default_rng(8)
    keys, sizes = [], []
    for _ in range(2):  # two bundles no manifest names
        data = encode_bundle(bundle_table({TARGET: (_delta(rng), 2)}))
        keys.append(bundle_key(hashlib.sha256(data).hexdigest()))
        sizes.append(len(data))
        local_store.put(keys[-1], data)
    named, unnamed = keys
    real = retention.append_audit

    def record_then_a_night_writes_its_manifest(store, event, **fields):
        out = real(store, event, **fields)
        if event == retention.GC_DELETES:
            _a_night_names(store, named, sizes[0])
        return out

    monkeypatch.setattr(retention, "append_audit", record_then_a_night_writes_its_manifest)
    report = collect(local_store, keep=1)
    assert unnamed in report.deleted_objects and named not in report.deleted_objects
    assert local_store.head(named) is not None and local_store.head(unnamed) is None
    recorded = [r for r in read_audit(local_store) if r["event"] == "gc_deletes"]
    assert len(recorded) == 1 and set(keys) <= set(recorded[0]["keys"])


def test_a_scope_with_a_users_id_is_not_that_user_in_collisions_facts_stats_or_scope_objects(local_store):
    """User "acme" and shared scope "acme" are two owners: a ``user+scope`` collision names the
    scope first, a scope's own ``facts`` rows have user_id = scope = its id, and the scope objects
    hold scopes only; none of them is the user's, so forget neither finds nor strips them there."""
    from pipeline.collisions import scope_collision_table
    from schemas.manifest import scopes_key
    from versions.forget import _holds_users, _without_users

    def delta(rows):
        return Delta.from_unsorted(np.zeros(len(rows), np.int16), np.asarray(rows, np.int64), np.ones((len(rows), WIDTH)))

    users = pa.array(["acme"])
    collisions = scope_collision_table("acme", delta([1, 2, 3]), {"carol": delta([2, 3]), "dave": delta([9])})
    assert collisions.num_rows and {ls[0] for ls in collisions.column("example_owners").to_pylist()} == {"acme"}
    assert not _holds_users(collisions, users)
    assert _without_users(collisions, users).equals(collisions)  # the scope stays named
    # the same rows where the forgotten user is a member of another scope ("org:x") lose the user
    member = scope_collision_table("org:x", delta([1, 2]), {"acme": delta([1]), "carol": delta([2])})
    assert _holds_users(member, users)
    assert [ls for ls in _without_users(member, users).column("example_owners").to_pylist()] == [["org:x"], ["org:x", "carol"]]

    facts = pa.table({"user_id": ["acme", "acme", "acme", "carol"], "fact_id": ["wifi", "ceo", "x-wifi", "wifi"],
                      "status": ["ok"] * 4, "loss": [0.0] * 4, "steps": [1] * 4, "rows": [1] * 4,
                      "scope": ["acme", None, "org:x", "acme"]})  # the scope's own row; the user's own and copy
    kept = _without_users(facts, users)
    assert kept.to_pylist() == [facts.to_pylist()[0], facts.to_pylist()[3]]
    assert not _holds_users(kept, users)
    # fact state: a row whose scope is its user is the user's personal fact, and goes
    state = decode_fact_state(_state({"acme": [("ceo", "Our CEO is", " Ferreira")]}))
    assert _holds_users(state, users) and _without_users(state, users).num_rows == 0

    # an audit scan skips the scope objects (a bundle whose user_id is the scope id) and scope rows
    local_store.put(scopes_key("0" * 64), encode_bundle(bundle_table({"acme": (delta([1, 2]), 2)})))
    write_stats_part(local_store, "facts", facts.slice(0, 1))
    assert scan_for_user(local_store, "acme") == []
    write_stats_part(local_store, "facts", facts.slice(1, 1))
    assert len(scan_for_user(local_store, "acme")) == 1


# ---------------------------------------------------------------- keys that are not the store's, damaged manifests

_MARKERS = ("", "audit/", "manifests/", "objects/", "objects/bundles/", "objects/layers/", "objects/state/", "stats/",
            "stats/facts/", "partial/")


def _bucket_keys(s3_server, bucket: str, prefix: str) -> set[str]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _engram(*args: str):
    from jobs.cli import app

    return CliRunner().invoke(app, list(args))


def test_folder_markers_in_an_s3_store_are_never_store_objects_for_any_command(s3_store, s3_server, s3_bucket):
    """Zero-byte folder markers (S3 console "Create folder", s3a, Cyberduck) under the store's
    prefix: versions, stats, forget and gc work as without them, gc neither lists nor deletes
    them (it once aborted with "empty path segment", and versions blamed CURRENT)."""
    v1 = _publish(s3_store, 1, USERS, None)
    _publish(s3_store, 2, USERS, v1)
    markers = {f"engram/{m}" for m in _MARKERS}
    for key in markers:
        s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=b"")
    uri = s3_store.uri

    out = _engram("versions", "--store", uri, "--json")
    assert out.exit_code == 0, out.output
    assert [row["version"] for row in json.loads(out.stdout)] == [1, 2]
    out = _engram("stats", "--store", uri, "--json", "select count(*) n from facts where version = 2")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == [{"n": 2 * len(USERS)}]
    dry = _engram("gc", "--store", uri, "--keep", "1", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.stdout)["deleted_objects"]
    assert planned and not any(k.endswith("/") for k in planned)
    out = _engram("forget", "--store", uri, TARGET, "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["found"] is True
    out = _engram("gc", "--store", uri, "--keep", "1", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["kept_versions"] == [4]
    assert markers <= _bucket_keys(s3_server, s3_bucket, "engram/")  # not the store's: never deleted
    out = _engram("versions", "--store", uri, "--json")
    assert out.exit_code == 0 and [row["version"] for row in json.loads(out.stdout)] == [4], out.output
    assert "empty path segment" not in out.output


def test_gc_never_deletes_keys_whose_names_the_store_does_not_write(any_store):
    v1 = _publish(any_store, 1, USERS, None)
    _publish(any_store, 2, USERS, v1)
    foreign = sorted(["objects/bundles/README.txt", "objects/layers/" + "a" * 64 + ".parquet.bak",
                      "objects/state/old/" + "b" * 64 + ".parquet", "stats/facts/export.csv",
                      "stats/facts/by-hand.parquet", "objects/tombstones/" + "C" * 64 + ".parquet"])
    for key in foreign:
        any_store.put(key, b"not the store's")
    dry = collect(any_store, keep=1, dry_run=True)
    assert dry.foreign_keys == foreign and not set(foreign) & set(dry.deleted_objects)
    report = collect(any_store, keep=1)
    assert report.deleted_versions == [1] and report.foreign_keys == foreign
    for key in foreign:
        assert any_store.get(key) == b"not the store's"
    referenced = set(read_manifest(any_store, 2).object_keys()) | {
        k for e in read_manifest(any_store, 2).shards for k in e.object_keys()}
    assert set(any_store.list("objects/")) | set(any_store.list("stats/")) == referenced | set(foreign)


def test_gc_of_a_store_synced_to_s3_with_a_temp_file_and_the_lock_collects_and_leaves_them(tmp_path, s3_server,
                                                                                           s3_bucket):
    """`aws s3 sync` of a local store carries a killed write's `.engram-tmp-...` file and the
    `.engram-store.lock`: gc on the copy collects v1 and leaves them (it once deleted v1's
    manifest and stats, then stopped with exit 2 and no audit record)."""
    from versions.store import LocalStore, open_store

    local = LocalStore(tmp_path / "store")
    v1 = _publish(local, 1, USERS, None)
    _publish(local, 2, USERS, v1)
    bundle = local.list("objects/bundles/")[0].rsplit("/", 1)[1]
    (local.root / "objects" / "bundles" / f".engram-tmp-{bundle}-0a1b2c3d4e5f").write_bytes(b"partial")
    (local.root / "stats" / "facts" / f".engram-tmp-x.parquet-0a1b2c3d4e5f").write_bytes(b"partial")
    assert (local.root / ".engram-store.lock").exists()
    client = s3_server.client()
    for path in local.root.rglob("*"):
        if path.is_file():
            client.put_object(Bucket=s3_bucket, Key=f"copy/{path.relative_to(local.root).as_posix()}",
                              Body=path.read_bytes())
    leftovers = {k for k in _bucket_keys(s3_server, s3_bucket, "copy/") if ".engram-" in k}
    assert len(leftovers) == 3
    copy = open_store(f"s3://{s3_bucket}/copy")

    dry = _engram("gc", "--store", copy.uri, "--keep", "1", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert not any(".engram-" in k for k in json.loads(dry.stdout)["deleted_objects"])
    out = _engram("gc", "--store", copy.uri, "--keep", "1", "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["deleted_versions"] == [1] and report["deleted_objects"] == json.loads(dry.stdout)["deleted_objects"]
    assert leftovers <= _bucket_keys(s3_server, s3_bucket, "copy/")
    assert [info.version for info in list_versions(copy)] == [2]
    assert read_audit(copy)[-1]["event"] == "gc" and read_audit(copy)[-1]["deleted_versions"] == [1]


def test_a_forget_of_several_users_that_fails_after_current_moved_says_it_is_recorded_and_a_rerun_finishes(
        s3_store, s3_server, s3_bucket, monkeypatch):
    """One rewrite for all the ids: a store failure after the compare-and-swap (deleting the old
    objects) leaves every id's forget recorded in CURRENT; the error says so and to run the same
    forget again, which leaves no object holding either user."""
    from tests.s3_proxy import ConditionProxy
    from versions.store import open_store

    v1 = _publish(s3_store, 1, USERS, None)
    _publish(s3_store, 2, USERS, v1)
    given = [TARGET, USERS[1]]
    with ConditionProxy(s3_server.endpoint_url, "pass", access_key=s3_server.access_key,
                        secret_key=s3_server.secret_key, deny_deletes=("engram/manifests/v00000001.json",
                                                                       "manifests/v00000001.json")) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        out = _engram("forget", "--store", s3_store.uri, *given, "--json")
    assert out.exit_code == 1, out.output
    failure = json.loads(out.stdout)
    assert failure["forgotten"] is False
    assert "the forget of every user given is recorded in v4 (CURRENT)" in failure["error"]
    assert "run the same forget again" in failure["error"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    store = open_store(s3_store.uri)
    current, _ = read_current(store)
    assert current.version == 4 and {forgotten_id(u) for u in given} <= set(current.forgotten)
    out = _engram("forget", "--store", s3_store.uri, *given, "--json")
    assert out.exit_code == 0, out.output
    assert scan_for_user(store, TARGET) == [] and scan_for_user(store, USERS[1]) == []
    assert json.loads(out.stdout)["rewritten"] == {} and [i.version for i in list_versions(store)] == [3, 4]


def test_a_gc_whose_delete_fails_part_way_says_what_it_deleted_exits_1_and_records_it(s3_store, s3_server, s3_bucket,
                                                                                      monkeypatch):
    """A delete refused by the server (a policy, an object lock) after gc deleted v1's manifest:
    the failure names what is gone (JSON too), exits 1 (a store problem, not a bad argument), the
    audit record says what was done, and a second gc finishes the collection."""
    from tests.s3_proxy import ConditionProxy
    from versions.store import open_store

    v1 = _publish(s3_store, 1, USERS, None)
    _publish(s3_store, 2, USERS, v1)
    plan = collect(s3_store, keep=1, dry_run=True).deleted_objects
    assert plan[0] == "manifests/v00000001.json" and len(plan) > 3
    refused = plan[-2]  # an object near the end: the manifest and most objects go first
    with ConditionProxy(s3_server.endpoint_url, "pass", access_key=s3_server.access_key,
                        secret_key=s3_server.secret_key, deny_deletes=(refused,)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        out = _engram("gc", "--store", s3_store.uri, "--keep", "1", "--json")
    assert out.exit_code == 1, out.output
    failure = json.loads(out.stdout)
    assert failure["collected"] is False and failure["exit_code"] == 1
    assert failure["deleted_versions"] == [1] and failure["deleted_objects"] == plan[:-2]
    assert refused in failure["error"] and "run gc again" in failure["error"]
    assert "manifests/v00000001.json" in out.stderr
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    store = open_store(s3_store.uri)
    record = read_audit(store)[-1]
    assert record["event"] == "gc" and record["incomplete"] is True and record["deleted_versions"] == [1]
    assert record["deleted_objects"] == len(plan) - 2 and refused in record["error"]
    assert set(store.list("")) >= {refused, plan[-1]}
    again = collect(store, keep=1)
    assert again.deleted_objects == plan[-2:] and again.deleted_versions == []
    assert [info.version for info in list_versions(store)] == [2]


def _truncate(store, key: str) -> bytes:
    body = store.get(key)
    store.put(key, body[:200])
    return body


def test_gc_keeps_a_damaged_manifest_and_every_object_it_may_name(four_versions, caplog):
    """A published manifest truncated by a bad copy is no orphan: gc keeps it and deletes no
    unreferenced object (it cannot know which ones it names), warning with its key; restored, the
    version is whole again. gc once deleted it and its objects."""
    store, _ = four_versions
    damaged = "manifests/v00000002.json"
    body = _truncate(store, damaged)
    objects = set(store.list("objects/")) | set(store.list("stats/"))
    with caplog.at_level("WARNING", logger="versions.retention"):
        report = collect(store, keep=1)
    assert report.unreadable_manifests == [damaged] and report.orphan_manifests == []
    assert report.deleted_versions == [1, 3] and report.deleted_objects == ["manifests/v00000001.json",
                                                                            "manifests/v00000003.json"]
    assert any(damaged in r.getMessage() and "restore it" in r.getMessage() for r in caplog.records)
    assert store.exists(damaged)
    assert set(store.list("objects/")) | set(store.list("stats/")) == objects
    out = _engram("gc", "--store", store.uri, "--keep", "1", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["unreadable_manifests"] == [damaged]
    store.put(damaged, body)  # the operator restores it from a backup
    rollback(store, 2, reason="restored", actor="ops")
    manifest = read_manifest(store, 2)
    for entry in manifest.shards:
        load_shard_bundle(store, entry)
    assert query_stats(store, "select count(*) n from facts where version = 2").column("n").to_pylist() == [
        2 * len(USERS)]


def test_gc_keeps_a_damaged_manifest_below_current_that_looks_like_an_orphan(local_store):
    """An unpublished-looking damaged manifest below CURRENT (its parent link unreadable) is kept too."""
    v1 = _publish(local_store, 1, USERS, None)
    v2 = _publish(local_store, 2, USERS, v1)
    _publish(local_store, 3, USERS, v2)
    _truncate(local_store, "manifests/v00000002.json")
    report = collect(local_store, keep=5)
    assert report.unreadable_manifests == ["manifests/v00000002.json"] and report.deleted_objects == []
    assert local_store.exists("manifests/v00000002.json")


def test_forget_keeps_a_damaged_manifest_it_cannot_read(four_versions, caplog):
    """forget's clean-up of orphan manifests never takes an unreadable manifest for one."""
    store, _ = four_versions
    damaged = "manifests/v00000001.json"
    _truncate(store, damaged)
    with caplog.at_level("WARNING", logger="versions.forget"):
        report = forget_user(store, TARGET, actor="ops", reason="ticket")
    assert report.found and damaged not in report.deleted_objects
    assert store.exists(damaged)
    assert any(damaged in r.getMessage() for r in caplog.records if r.name == "versions.forget")
