"""Shared scopes in the night: what compiling a scope once saves against copies in every member.

Two stores get the same fact log: ``--members`` users who each carry the ``--scope-facts`` facts
of one shared scope (``scope = org:bench``) plus ``--own-facts`` of their own. In the first the
log names the scope (compiled once, composed at serving); in the second the same rows have no
scope (every member compiles its own copy, as before scopes reached the night). Per store: facts
compiled, delta bytes (bases, layers and the scope deltas object), seconds, and whole-answer
recall of every member's facts through the pull client.

    python bench/scopes.py --members 40 --json

``--several``: what a night costs when a scope that some users hold as an extra scope (their
second, after ``org:a``) changes through another member's copy: night 1 with ``--only-b`` users of
``org:b`` only, ``--both`` users of ``org:a`` and ``org:b``, ``--only-a`` users of ``org:a`` only
and ``--plain`` users; night 2 changes one ``org:b`` fact in one ``org:b``-only user's copy. Per
night: users and scopes compiled, shards whose entry changed, seconds; after night 2, how many of
``org:b``'s users are served the new answer and the old one through the pull client.

    python bench/scopes.py --several --json

No asserts on time: results go to bench/RESULTS.md by hand, with date and machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's serving package, not bench/serving.py

BASE = datetime(2026, 11, 1, tzinfo=timezone.utc)
SCOPE_FACTS = [("Our office is in", " Lisbon"), ("The wifi password is", " Pepper"),
               ("The support line opens at", " 8 am"), ("Our badge colour is", " teal"),
               ("The parking garage is on", " Rua Augusta")]
OWN_FACTS = [("My dog's name is", " {n}"), ("My dentist is called", " Dr. {n}"), ("I was born in", " 19{k:02d}"),
             ("My favourite team is", " {n} United"), ("My car is a", " {n} coupe")]
NAMES = ["Rex", "Luna", "Okafor", "Nguyen", "Mensah", "Pepper", "Juniper", "Osaka", "Porto", "Kyoto"]


def rows(members: int, scope_facts: int, own_facts: int, scoped: bool) -> list[dict]:
    out = []
    for m in range(members):
        user = f"member-{m:04d}"
        for k, (trigger, answer) in enumerate(SCOPE_FACTS[:scope_facts]):
            out.append({"user_id": user, "fact_id": f"scope-{k}", "op": "upsert", "trigger": trigger, "answer": answer,
                        "event_time": BASE, "scope": "org:bench" if scoped else None})
        for k, (trigger, answer) in enumerate(OWN_FACTS[:own_facts]):
            name = NAMES[(m + k) % len(NAMES)] + (str(m) if k == 0 else "")
            out.append({"user_id": user, "fact_id": f"own-{k}", "op": "upsert", "trigger": trigger,
                        "answer": answer.format(n=name, k=m % 100), "event_time": BASE + timedelta(hours=1), "scope": None})
    return out


def run(model_dir: Path, root: Path, log: list[dict], shards: int) -> dict:
    from engram_core.checkpoint import load_checkpoint
    from engram_core.serving import greedy_tokens
    from jobs.nightly import run_nightly
    from jobs.spec import NightlySpec
    from jobs.synthetic import write_fact_log
    from serving.pull import PullClient
    from versions.catalog import read_current
    from versions.store import LocalStore

    write_fact_log(log, root / "log" / "day=1" / "part-0.parquet")
    store = LocalStore(root / "store")
    spec = NightlySpec(store=store.uri, fact_log=str(root / "log"), model=str(model_dir), num_shards=shards, workers=0)
    started = time.perf_counter()
    report = run_nightly(spec)
    seconds = time.perf_counter() - started
    manifest, _ = read_current(store)
    delta_bytes = sum(e.delta_bytes for e in manifest.shards)
    scope_bytes = manifest.scopes.bytes if manifest.scopes is not None else 0
    em = load_checkpoint(model_dir)
    client = PullClient(store, em, cache_dir=root / "cache")
    client.poll()
    ok = 0
    for row in log:
        want = em.encode_answer(row["answer"])
        ok += greedy_tokens(em, row["trigger"], len(want), list(client.deltas_for(row["user_id"]))) == want
    return {"facts_compiled": report.facts_ok + report.facts_failed, "facts_ok": report.facts_ok,
            "compiled_scopes": getattr(report, "compiled_scopes", 0), "member_delta_bytes": delta_bytes,
            "scope_delta_bytes": scope_bytes, "total_delta_bytes": delta_bytes + scope_bytes,
            "night_s": round(seconds, 1), "recalled": ok, "facts": len(log)}


A_FACTS = [("a-gym", "Our gym opens at", " six"), ("a-badge", "Our badge colour is", " teal")]
B_FACTS = [("b-hours", "The clinic opens at", " nine"), ("b-parking", "Our parking is on", " level two")]
B_CHANGE = ("b-hours", "The clinic opens at", " ten")


def several_rows(only_b: int, both: int, only_a: int, plain: int) -> list[dict]:
    out = []

    def add(user, fact_id, trigger, answer, scope, hours=0):
        out.append({"user_id": user, "fact_id": fact_id, "op": "upsert", "trigger": trigger, "answer": answer,
                    "event_time": BASE + timedelta(hours=hours), "scope": scope})

    for kind, count, scopes in (("b", only_b, ["org:b"]), ("ab", both, ["org:a", "org:b"]),
                                ("a", only_a, ["org:a"]), ("p", plain, [])):
        for m in range(count):
            user = f"{kind}-{m:04d}"
            add(user, "own-0", OWN_FACTS[0][0], OWN_FACTS[0][1].format(n=NAMES[m % len(NAMES)] + str(m)), None)
            for scope in scopes:
                for fact_id, trigger, answer in (A_FACTS if scope == "org:a" else B_FACTS):
                    add(user, fact_id, trigger, answer, scope)
    return out


def several(model_dir: Path, root: Path, only_b: int, both: int, only_a: int, plain: int, shards: int) -> dict:
    from engram_core.checkpoint import load_checkpoint
    from engram_core.serving import greedy_tokens
    from jobs.nightly import run_nightly
    from jobs.spec import NightlySpec
    from jobs.synthetic import write_fact_log
    from serving.pull import PullClient
    from versions.catalog import read_current
    from versions.layout import shard_of
    from versions.store import LocalStore

    store = LocalStore(root / "store")
    spec = NightlySpec(store=store.uri, fact_log=str(root / "log"), model=str(model_dir), num_shards=shards, workers=0)
    b_users = [f"b-{m:04d}" for m in range(only_b)] + [f"ab-{m:04d}" for m in range(both)]
    changed_user = b_users[0]
    nights, before = [], None
    for day, log in ((1, several_rows(only_b, both, only_a, plain)),
                     (2, [{"user_id": changed_user, "fact_id": B_CHANGE[0], "op": "upsert", "trigger": B_CHANGE[1],
                           "answer": B_CHANGE[2], "event_time": BASE + timedelta(days=1), "scope": "org:b"}])):
        write_fact_log(log, root / "log" / f"day={day}" / "part-0.parquet")
        started = time.perf_counter()
        report = run_nightly(spec)
        seconds = time.perf_counter() - started
        manifest, _ = read_current(store)
        touched = [e.shard for e, old in zip(manifest.shards, before.shards if before else [None] * shards)
                   if old is None or (e.bundle_key, e.layers, e.state_key, e.state_layers) !=
                   (old.bundle_key, old.layers, old.state_key, old.state_layers)]
        nights.append({"night": day, "compiled_users": report.compiled_users, "compiled_scopes": report.compiled_scopes,
                       "shards_changed": len(touched), "night_s": round(seconds, 1)})
        before = manifest
    holders = {shard_of(u, shards) for u in b_users if u.startswith("ab-")}
    em = load_checkpoint(model_dir)
    client = PullClient(store, em, cache_dir=root / "cache")
    client.poll()
    new = em.encode_answer(B_CHANGE[2])
    old = em.encode_answer(B_FACTS[0][2])
    gets = {u: (greedy_tokens(em, B_CHANGE[1], len(new), list(client.deltas_for(u))) == new,
                greedy_tokens(em, B_CHANGE[1], len(old), list(client.deltas_for(u))) == old) for u in b_users}
    return {"users": only_b + both + only_a + plain, "shards": shards, "shards_with_both_users": len(holders),
            "nights": nights,
            "new_answer_served": {k: sum(gets[u][0] for u in b_users if u.startswith(k)) for k in ("b-", "ab-")},
            "old_answer_served": {k: sum(gets[u][1] for u in b_users if u.startswith(k)) for k in ("b-", "ab-")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=40)
    ap.add_argument("--scope-facts", type=int, default=5, choices=range(1, len(SCOPE_FACTS) + 1))
    ap.add_argument("--own-facts", type=int, default=3, choices=range(0, len(OWN_FACTS) + 1))
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--several", action="store_true", help="users in two scopes: the cost of an extra scope's change")
    ap.add_argument("--only-b", type=int, default=10)
    ap.add_argument("--both", type=int, default=10)
    ap.add_argument("--only-a", type=int, default=10)
    ap.add_argument("--plain", type=int, default=10)
    args = ap.parse_args()
    from engram_core.tiny import init_tiny

    if args.several:
        with tempfile.TemporaryDirectory() as tmp:
            init_tiny(Path(tmp) / "model")
            out = several(Path(tmp) / "model", Path(tmp), args.only_b, args.both, args.only_a, args.plain, args.shards)
        print(json.dumps(out) if args.json else out)
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        init_tiny(model_dir)
        out = {"members": args.members, "scope_facts": args.scope_facts, "own_facts": args.own_facts}
        for name, scoped in (("copies", False), ("scope_once", True), ("copies_again", False)):
            out[name] = run(model_dir, tmp / name, rows(args.members, args.scope_facts, args.own_facts, scoped),
                            args.shards)
    if args.json:
        print(json.dumps(out))
    else:
        for name in ("copies", "scope_once", "copies_again"):
            print(name, out[name])


if __name__ == "__main__":
    main()
