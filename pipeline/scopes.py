"""Shared scopes compile once: one delta per scope, composed with each member's own delta.

A fact-state row whose ``scope`` is not its ``user_id`` (ingest writes the user id when the log
gives none) is a fact of a shared scope, e.g. ``org:acme``'s opening hours carried by each of its
members. Compiling each member's copy into the member's delta would repeat the same rows in
every member's delta (and fight the member's own facts for rows). Instead, per scope:

1. the scope's facts (one per fact_id: the copy with the latest ``event_time`` wins; the members'
   copies are the same fact) compile into **one scope delta**, owner = the scope id;
2. each member's own facts compile with the scope delta fixed underneath
   (:func:`pipeline.collisions.compile_with_scope`), so ``[scope_delta, member_delta]`` is
   exact; a member whose rows disturb a scope fact is recompiled with it as a constraint;
3. rows written by both the scope and a member are reported (``collisions``, kind ``user+scope``).

A scope id is not a user id: user ``acme`` (its personal facts) and scope ``acme`` (other users'
facts filed under it) are two owners, kept apart everywhere (the scope's delta in
``ScopedCompileResult.scope_deltas`` and the version's scopes object, the user's in its shard).

Serving composes them: a request of a member is served with ``(scope_delta, member_delta)``
(``overlay_for(em, [[scope_delta, member_delta]])``). A user in several scopes keeps the first
scope (by id) as its shared delta; the other (*extra*) scopes' facts compile into its own delta,
and they are the scopes' merged facts (every fact of the scope, the latest copy over every user
carrying it: :func:`extra_scope_facts`), never the user's own copies, so every user of a scope is
served the same answers. Its own fact on the same trigger wins, as over its first scope's. (Not
stacked as several scope deltas at serving: two scopes compiled apart may write the same rows with
other values, and their sum can break both; compiled into the user's delta they are checked
against its first scope's delta and its own facts like any of its facts.)

:func:`compile_scoped` is the function a night calls with the facts of the users it compiles
(plain users go through one ``compile_facts`` call; each scope through ``compile_with_scope``).
No Ray here: the night runs it per scope on its workers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.collisions import compile_with_scope
from schemas.stats import COLLISIONS_STATS_SCHEMA

if TYPE_CHECKING:
    from engram_core.checkpoint import EngramModel
    from engram_core.compiler import CompileOptions, Fact, FactResult
    from engram_core.delta import Delta


@dataclass(frozen=True)
class ScopedFacts:
    """A fact state split into plain per-user facts and shared scopes."""

    personal: dict[str, list["Fact"]]  # user -> own facts (no copy of a scope's fact)
    scope_facts: dict[str, list["Fact"]]  # scope id -> its facts (user_id = the scope id), scopes with members
    members: dict[str, list[str]]  # scope id -> member user ids, sorted
    member_copies: dict[str, dict[str, str]] = field(default_factory=dict)
    """user -> fact_id -> scope id: the scope facts a member carries (compiled once, in the scope)."""
    extra_copies: dict[str, dict[str, tuple[str, str, str]]] = field(default_factory=dict)
    """user -> fact_id -> (scope id, trigger, answer): the user's copies of its extra scopes' facts
    (scopes after its first), served from the scope's merged facts in the user's own delta."""
    merged: dict[str, list["Fact"]] = field(default_factory=dict)
    """scope id -> its facts (user_id = the scope id), every scope carried, with or without members."""
    extra_facts: dict[str, list["Fact"]] = field(default_factory=dict)
    """user -> the merged facts of its extra scopes it is served (:func:`extra_scope_facts`),
    compiled in its own delta with its own facts."""


def split_scopes(state: pa.Table) -> ScopedFacts:
    """Split fact-state rows (``user_id, fact_id, scope, trigger, answer, event_time``) by scope.

    A scope's facts are the latest copy per fact_id over every user carrying it (its members and
    the users holding it as an extra scope); its members are the users whose first scope it is.
    A user's extra scopes' merged facts are its ``extra_facts``."""
    from engram_core.compiler import Fact

    cols = {name: state.column(name).to_pylist() for name in ("user_id", "fact_id", "scope", "trigger", "answer")}
    times = state.column("event_time").cast(pa.int64()).to_pylist() if "event_time" in state.column_names \
        else [None] * state.num_rows
    scopes_of: dict[str, set[str]] = {}
    for user, scope in zip(cols["user_id"], cols["scope"]):
        if scope and scope != user:
            scopes_of.setdefault(user, set()).add(scope)
    shared_scope = {user: min(scopes) for user, scopes in scopes_of.items()}  # one composed scope per user
    personal: dict[str, list[Fact]] = {}
    latest: dict[str, dict[str, tuple[int, Fact]]] = {}
    members: dict[str, set[str]] = {}
    copies: dict[str, dict[str, str]] = {}
    extra: dict[str, dict[str, tuple[str, str, str]]] = {}
    for user, fact_id, scope, trigger, answer, time in zip(*cols.values(), times):
        if scope and scope != user:
            best = latest.setdefault(scope, {}).get(fact_id)
            if best is None or (time or 0, trigger, answer) > (best[0], best[1].trigger, best[1].answer):
                latest[scope][fact_id] = (time or 0, Fact(scope, fact_id, trigger, answer, time))
            if shared_scope[user] == scope:
                members.setdefault(scope, set()).add(user)
                copies.setdefault(user, {})[fact_id] = scope
            else:
                extra.setdefault(user, {})[fact_id] = (scope, trigger, answer)
        else:
            personal.setdefault(user, []).append(Fact(user, fact_id, trigger, answer, time))
    merged = {s: [f for _, (_, f) in sorted(by_id.items())] for s, by_id in latest.items()}
    injected = {user: extra_scope_facts(user, personal.get(user, []), {s for s, _, _ in held.values()}, merged)
                for user, held in extra.items()}
    scope_facts = {s: merged[s] for s in members}
    return ScopedFacts(personal, scope_facts, {s: sorted(m) for s, m in members.items()}, copies, extra, merged,
                       injected)


EXTRA_SCOPE_DETAIL = "compiled in the user's own delta from scope "
"""Fact-result detail of a user's copy of an extra scope's fact (:func:`extra_scope_detail`)."""


def extra_scope_facts(user: str, own: Sequence["Fact"], scopes, merged: dict[str, Sequence["Fact"]]) -> list["Fact"]:
    """The facts ``user`` is served of its extra ``scopes`` (a user in several scopes is composed
    with the first only): every merged fact of each scope (``merged``: scope id -> its facts, the
    latest copy per fact_id over all its carriers), owned by ``user``, fact_id ``<scope>/<fact_id>``,
    its time kept; a fact whose trigger is one of ``own``'s (the user's own facts) is left out,
    as for a member's first scope (its own fact wins)."""
    from engram_core.compiler import Fact

    taken = {f.trigger for f in own}
    return [Fact(user, f"{scope}/{f.fact_id}", f.trigger, f.answer, f.written_at)
            for scope in sorted(scopes) for f in merged.get(scope, ()) if f.trigger not in taken]


def extra_scope_detail(scope: str, why: str | None = None, stale: bool = False) -> str:
    """The fact-result detail of a user's copy of an extra scope's fact: ``compiled in the user's
    own delta from scope "<id>"`` (the id as a JSON string), ``; the scope's latest copy is served,
    not this one`` when the copy's text is not the scope's, and ``; why`` when it failed."""
    text = f"{EXTRA_SCOPE_DETAIL}{json.dumps(scope, ensure_ascii=False)}"
    if stale:
        text += "; the scope's latest copy is served, not this one"
    return f"{text}; {why}" if why else text


def extra_copy_results(results: list["FactResult"], copies: dict[str, dict[str, tuple[str, str, str]]],
                       merged: dict[str, Sequence["Fact"]], own: dict[str, Sequence["Fact"]]) -> list["FactResult"]:
    """``results`` with the results of the users' extra-scope facts (:func:`extra_scope_facts` of
    ``merged``) taken out and one result per copy a user carries put in (``copies``: user ->
    fact_id -> (scope, trigger, answer)): the served scope fact's result, detail
    :func:`extra_scope_detail`; a copy whose scope fact's trigger is one of the user's ``own``
    facts' is ``CONFLICTS_WITH:<that fact_id>`` (the user's own fact is served). A scope fact the
    user carries no copy of is reported only where it failed in the user's delta (the user is not
    served it, and no other row says so: the scope's own row, if the scope has members, is its
    compile in the scope's delta): fact_id ``<scope>/<fact_id>``, detail :func:`extra_scope_detail`
    with ``the user carries no copy of it``; recalled ones are not reported (as for a member's first
    scope)."""
    from engram_core.compiler import STATUS_NOT_RECALLED, FactResult
    from pipeline.compile import SERVED_STATUSES

    injected = {(user, f"{scope}/{f.fact_id}"): f for user, held in copies.items()
                for scope in {s for s, _, _ in held.values()} for f in merged.get(scope, ())}
    by_key = {(r.user_id, r.fact_id): r for r in results if (r.user_id, r.fact_id) in injected}
    out = [r for r in results if (r.user_id, r.fact_id) not in injected]
    for user in sorted(copies):
        owner_of = {f.trigger: f.fact_id for f in own.get(user, ())}
        for fact_id, (scope, trigger, answer) in sorted(copies[user].items()):
            key = (user, f"{scope}/{fact_id}")
            result, fact = by_key.get(key), injected.get(key)
            stale = fact is not None and (fact.trigger, fact.answer) != (trigger, answer)
            if result is None:
                won = owner_of.get(fact.trigger) if fact is not None else None
                status = f"CONFLICTS_WITH:{won}" if won is not None else STATUS_NOT_RECALLED
                why = "the user's own fact on its trigger is served" if won is not None else "not in the scope's facts"
                out.append(FactResult(user, fact_id, status, float("nan"), 0, 0, float("nan"),
                                      extra_scope_detail(scope, why, stale)))
                continue
            out.append(replace_result(result, fact_id=fact_id,
                                      detail=extra_scope_detail(scope, result.detail or None, stale)))
    carried = {(user, f"{scope}/{fact_id}") for user, held in copies.items() for fact_id, (scope, _, _) in held.items()}
    for key, result in sorted(by_key.items()):
        if key not in carried and result.status not in SERVED_STATUSES:
            scope = injected[key].user_id  # (an injected fact's scope: extra_scope_facts names it <scope>/<fact_id>)
            why = "; ".join(w for w in ("the user carries no copy of it", result.detail) if w)
            out.append(replace_result(result, detail=extra_scope_detail(scope, why)))
    return out


@dataclass
class ScopedCompileResult:
    deltas: dict[str, "Delta"]
    """user -> delta: every compiled user (users only: a scope's delta is in ``scope_deltas``)."""
    scope_of: dict[str, str]
    """member -> the scope whose delta serving composes under the member's own."""
    results: list["FactResult"]
    """Every fact of every user: own facts, and per member its copies of scope facts (the scope
    fact's result, or the member's composition failure)."""
    collisions: pa.Table  # rows written by a scope and one of its members (COLLISIONS_STATS_SCHEMA)
    recompiled_members: list[str] = field(default_factory=list)
    scope_deltas: dict[str, "Delta"] = field(default_factory=dict)
    """scope id -> the scope's delta, compiled once. Kept apart from ``deltas``: a user and a scope
    may have the same id (user ``acme``, and other users' facts of scope ``acme``) and are two owners."""
    scope_results: list["FactResult"] = field(default_factory=list)
    """The scopes' own facts (``user_id`` = the scope id)."""


def compile_scoped(em: "EngramModel", state: pa.Table, options: "CompileOptions | None" = None) -> ScopedCompileResult:
    """Compile the users of ``state`` (fact-state rows) with each shared scope compiled once."""
    from engram_core.compiler import CompileOptions, FactResult, compile_facts

    options = options or CompileOptions()
    split = split_scopes(state)
    scoped_users = {u for ms in split.members.values() for u in ms}
    plain = [f for u in sorted(split.personal) if u not in scoped_users for f in split.personal[u]]
    out = compile_facts(em, plain, options)
    deltas, results = dict(out.deltas), list(out.facts)
    scope_deltas: dict[str, "Delta"] = {}
    scope_results: list["FactResult"] = []
    scope_of: dict[str, str] = {}
    tables, recompiled = [], []
    for scope in sorted(split.scope_facts):
        members = split.members[scope]
        scope_delta, user_deltas, report = compile_with_scope(
            em, split.scope_facts[scope],
            {u: split.personal.get(u, []) + split.extra_facts.get(u, []) for u in members}, options)
        scope_deltas[scope] = scope_delta
        deltas.update(user_deltas)
        scope_of.update({u: scope for u in members})
        recompiled += report.recompiled_users
        tables.append(report.collisions)
        # The scope's own facts have user_id = the scope id; a member never has its scope's id (a
        # row whose scope is its own user is a personal fact), so the two never mix here.
        scope_results_of = {r.fact_id: r for r in report.results if r.user_id == scope}
        member_results = [r for r in report.results if r.user_id != scope]
        failures = {(r.user_id, r.fact_id) for r in member_results if r.fact_id.startswith(f"{scope}/")}
        failure_of = {(r.user_id, r.fact_id): r for r in member_results if (r.user_id, r.fact_id) in failures}
        results += [r for r in member_results if (r.user_id, r.fact_id) not in failures]
        for user in members:
            for fact_id, owner in sorted(split.member_copies.get(user, {}).items()):
                failed = failure_of.get((user, f"{scope}/{fact_id}"))
                base = failed or scope_results_of.get(fact_id)
                if base is not None:
                    results.append(FactResult(user, fact_id, base.status, base.loss, base.steps, base.rows,
                                              base.margin, scope_detail(scope, base.detail)))
        scope_results += [r for r in report.results if r.user_id == scope]
    if split.extra_copies:  # a user's copies of its extra scopes' facts: the served scope facts' results
        results = extra_copy_results(results, split.extra_copies, split.merged, split.personal)
    collisions = pa.concat_tables(tables) if tables else COLLISIONS_STATS_SCHEMA.empty_table()
    return ScopedCompileResult(deltas, scope_of, results, collisions, sorted(recompiled), scope_deltas, scope_results)


def served_deltas(result: ScopedCompileResult, user_id: str) -> Sequence["Delta"]:
    """The deltas a request of ``user_id`` is served with: ``(scope delta, own delta)`` for a
    member, ``(own delta,)`` otherwise (what a serving index returns for the user)."""
    own = result.deltas.get(user_id)
    scope = result.scope_of.get(user_id)
    parts = [result.scope_deltas[scope]] if scope is not None else []
    return tuple(parts + ([own] if own is not None else []))


# ============================================================================ in the night
#
# The nightly job (jobs/nightly.py) runs shared scopes in two compile rounds, per shard and on
# the compile workers; the driver holds only per-shard and per-scope metadata (ids and counts):
#
# 1. apply (per shard): :func:`shard_contribution` of the shard's new fact state: per scope, the
#    scope facts its users carry (latest copy per fact_id; members and users holding it as an
#    extra scope) and how many members it has;
# 2. merge (one task): :func:`merge_scopes` puts the applied shards' contributions in place of
#    their old ones in the previous version's scope state, and compares each scope's merged facts
#    with the previous version's: a scope with members whose facts changed (or that had none, or
#    every scope on a night that recompiles everything) compiles again; a scope with no member
#    left is dropped from the scope deltas; a scope whose facts changed is ``refreshed``;
# 3. scope round: the changed scopes' facts compile on the pool, each scope whole (owner = scope
#    id); :func:`write_scopes` writes the version's scope deltas (the changed ones, and the others
#    carried) and the scopes' ``facts`` stats part;
# 4. members: every shard holding a member of a changed scope, or a user holding a refreshed
#    scope as an extra scope, recompiles those users (pipeline.shards.rescope_shard,
#    :func:`users_to_rescope`: their rows were fitted to the old scope delta, or hold the scope's
#    old facts), along with the users whose own facts changed; a member compiles with its scope's
#    published delta fixed underneath (:func:`compile_chunk_scoped`, pipeline.collisions.compile_members), its bundle row names the
#    scope, and its delta holds no copy of the scope's rows.
#
# What triggers what: a member's own facts changing recompiles that member only (against the
# scope delta as it is); a scope fact changing (any user's copy, as merged) recompiles the scope,
# all its members and the users holding it as an extra scope; a member joining or leaving
# recompiles that member only (its facts changed); the scope recompiles only if the merged facts changed (e.g. the last carrier of a fact left).

SCOPE_STATE_SCHEMA = pa.schema([
    pa.field("scope", pa.string(), nullable=False),
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("fact_id", pa.string(), nullable=False),
    pa.field("trigger", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("event_time", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("members", pa.int64(), nullable=False),  # the shard's members of the scope (repeated per fact)
], metadata={"engram.schema": "scope_state", "engram.schema_version": "2"})
"""Per (scope, shard): the scope facts that shard's users carry (latest copy per fact_id; its
members' copies and those of users holding it as an extra scope), and its number of members
(users composed with it). Every member carries at least one scope fact, so a (scope, shard) with
members always has a row; a (scope, shard) whose users hold it only as an extra scope has rows
with ``members`` 0. Version 1 (written before 2026-12-01) held members' copies only: see
:func:`merge_scopes`."""

SCOPE_DETAIL = "compiled once in scope "  # fact result detail of a member's copy of a scope fact ("...; why" if it failed)


def scope_detail(scope: str, why: str | None = None) -> str:
    """The fact-result detail of a member's copy of a scope fact: ``compiled once in scope "<id>"``
    (the id as a JSON string, so that no id, "acme; inc" included, runs into the ``; why`` after it)."""
    named = f"{SCOPE_DETAIL}{json.dumps(scope, ensure_ascii=False)}"
    return f"{named}; {why}" if why else named


def scope_of_detail(detail) -> pa.Array:
    """The scope named by fact-result details (:func:`scope_detail`; also the unquoted
    ``compiled once in scope <id>[; why]`` of results written before 2026-12-01), else null."""
    import re

    if isinstance(detail, pa.ChunkedArray):
        detail = detail.combine_chunks()
    quoted = pc.extract_regex(detail, f'^{re.escape(SCOPE_DETAIL)}(?P<scope>"(?:[^"\\\\]|\\\\.)*")')
    legacy = pc.extract_regex(detail, f"^{re.escape(SCOPE_DETAIL)}(?P<scope>[^\"].*?)(?:; .*)?$")
    texts = pc.struct_field(quoted, "scope").to_pylist() if pc.any(pc.is_valid(quoted)).as_py() else []
    if texts:  # JSON-unquote (escapes are rare; a plain id is its text between the quotes)
        quoted_scope = pa.array([None if t is None else (json.loads(t) if "\\" in t else t[1:-1]) for t in texts],
                                pa.string())
    else:
        quoted_scope = pa.nulls(len(detail), pa.string())
    legacy_scope = pc.if_else(pc.is_valid(legacy), pc.struct_field(legacy, "scope"), pa.scalar(None, pa.string()))
    return pc.coalesce(quoted_scope, legacy_scope)


def member_rows(state: pa.Table) -> pa.Table:
    """The rows of fact-state ``state`` that are copies of a shared scope's facts composed under
    their user: ``scope`` is not the user, and is the user's first scope (by id); a user's facts of
    its other scopes are served from its own delta (:func:`extra_scope_facts`). Sorted by (user_id, fact_id)."""
    foreign = state.filter(pc.not_equal(state.column("scope"), state.column("user_id")))
    if foreign.num_rows == 0:
        return foreign
    first = foreign.group_by("user_id").aggregate([("scope", "min")])
    joined = foreign.join(first, "user_id")
    joined = joined.filter(pc.equal(joined.column("scope"), joined.column("scope_min"))).drop_columns(["scope_min"])
    return joined.sort_by([("user_id", "ascending"), ("fact_id", "ascending")])


def scope_copies(state: pa.Table) -> pa.Table:
    """Every row of fact-state ``state`` that is a copy of a shared scope's fact (``scope`` is not
    the user), with a bool column ``composed``: the scope is the user's first (the copy is of the
    scope composed under the user); false for the user's extra scopes. Sorted by (user_id, fact_id)."""
    foreign = state.filter(pc.not_equal(state.column("scope"), state.column("user_id")))
    if foreign.num_rows == 0:
        return foreign.append_column("composed", pa.array([], pa.bool_()))
    first = foreign.group_by("user_id").aggregate([("scope", "min")])
    joined = foreign.join(first, "user_id")
    joined = joined.append_column("composed", pc.equal(joined.column("scope"), joined.column("scope_min")))
    return joined.drop_columns(["scope_min"]).sort_by([("user_id", "ascending"), ("fact_id", "ascending")])


def users_to_rescope(state: pa.Table, compiled: Sequence[str], refreshed: Sequence[str]) -> pa.Array:
    """The users of fact-state ``state`` whose deltas a night's scope round outdates: the members of
    the ``compiled`` scopes (fitted to the old scope delta) and the users holding one of the
    ``refreshed`` scopes (whose merged facts changed) as an extra scope (they are served its facts
    from their own delta). Unique, sorted."""
    rows = scope_copies(state.select(["user_id", "fact_id", "scope"]))
    wanted = pc.or_(pc.and_(rows.column("composed"), pc.is_in(rows.column("scope"), pa.array(compiled, pa.string()))),
                    pc.and_(pc.invert(rows.column("composed")),
                            pc.is_in(rows.column("scope"), pa.array(refreshed, pa.string()))))
    users = pc.unique(rows.filter(wanted).column("user_id")).cast(pa.string())
    users = users.combine_chunks() if isinstance(users, pa.ChunkedArray) else users
    return pc.take(users, pc.sort_indices(users))


def _latest(rows: pa.Table, keys: list[str]) -> pa.Table:
    """One row per ``keys``: the latest copy (event_time, then trigger, then answer, as
    :func:`split_scopes` picks)."""
    if rows.num_rows == 0:
        return rows
    rows = rows.sort_by([(k, "ascending") for k in keys] + [("event_time", "descending"), ("trigger", "descending"),
                                                            ("answer", "descending")])
    key = pc.binary_join_element_wise(*[rows.column(k).cast(pa.string()) for k in keys], "\x00")
    key = key.combine_chunks() if isinstance(key, pa.ChunkedArray) else key
    first = np.ones(rows.num_rows, bool)
    first[1:] = pc.not_equal(key.slice(1), key.slice(0, len(key) - 1)).to_numpy(zero_copy_only=False)
    return rows.filter(pa.array(first))


def shard_contribution(state: pa.Table, shard: int) -> pa.Table:
    """Shard ``shard``'s rows of the scope state (SCOPE_STATE_SCHEMA) from its fact state: per
    scope the latest copy of each fact among every user carrying it (as its first scope or an
    extra one), and ``members``: the users of the shard composed with it (first scope; 0 when
    the shard's users hold it only as an extra scope)."""
    rows = scope_copies(state)
    if rows.num_rows == 0:
        return SCOPE_STATE_SCHEMA.empty_table()
    composed = rows.filter(rows.column("composed"))
    members = composed.group_by("scope").aggregate([("user_id", "count_distinct")])
    latest = _latest(rows.select(["scope", "fact_id", "trigger", "answer", "event_time"]), ["scope", "fact_id"])
    out = latest.join(members, "scope", join_type="left outer")
    out = out.set_column(out.schema.get_field_index("user_id_count_distinct"), "members",
                         pc.fill_null(out.column("user_id_count_distinct"), 0))
    out = out.append_column("shard", pa.array(np.full(out.num_rows, shard, np.int32)))
    return out.select(SCOPE_STATE_SCHEMA.names).cast(SCOPE_STATE_SCHEMA).sort_by(
        [("scope", "ascending"), ("fact_id", "ascending")])


def merged_scope_facts(scope_state: pa.Table) -> pa.Table:
    """Every scope's facts over all shards (scope, fact_id, trigger, answer, event_time): the latest
    copy per (scope, fact_id); sorted."""
    latest = _latest(scope_state.select(["scope", "fact_id", "trigger", "answer", "event_time"]), ["scope", "fact_id"])
    return latest.sort_by([("scope", "ascending"), ("fact_id", "ascending")])


def _digests(facts: pa.Table) -> dict[str, str]:
    """scope -> sha256 of its merged facts (fact_id, trigger, answer) and of which fact wins each
    group sharing a trigger (pipeline.plan.trigger_winners: a time alone can change it)."""
    from pipeline.plan import trigger_winners

    out: dict[str, hashlib._Hash] = {}
    cols = [facts.column(c).to_pylist() for c in ("scope", "fact_id", "trigger", "answer")]
    for scope, fact_id, trigger, answer in zip(*cols):
        out.setdefault(scope, hashlib.sha256()).update(repr((fact_id, trigger, answer)).encode())
    winners = trigger_winners(cols[0], cols[1], cols[2], facts.column("event_time").cast(pa.int64()).to_pylist())
    for scope, ids in winners.items():
        out[scope].update(repr(("wins", ids)).encode())
    return {scope: h.hexdigest() for scope, h in out.items()}


def _compile_rows(facts: pa.Table) -> pa.Table:
    """Compile rows (user_id = scope = the scope id) of merged scope facts."""
    columns = {name: facts.column(name) for name in ("fact_id", "scope", "trigger", "answer", "event_time")}
    return pa.table({"user_id": facts.column("scope"), **columns}).select(
        ["user_id", "fact_id", "scope", "trigger", "answer", "event_time"])


def _with_members(scope_state: pa.Table) -> set[str]:
    """The scopes of a scope state with at least one member (composed with it) in some shard."""
    return set(pc.unique(scope_state.filter(pc.greater(scope_state.column("members"), 0)).column("scope")).to_pylist())


def encode_scope_state(table: pa.Table, version: int = 2) -> bytes:
    """Parquet bytes of a scope state (SCOPE_STATE_SCHEMA, sorted): the same rows, the same bytes.
    ``version`` 1 keeps a legacy state's mark (versions.forget rewrites one without a user's copies)."""
    from schemas.facts import encode_table

    schema = SCOPE_STATE_SCHEMA if version == 2 else SCOPE_STATE_SCHEMA.with_metadata(
        {**SCOPE_STATE_SCHEMA.metadata, b"engram.schema_version": str(version).encode()})
    return encode_table(table, schema, "scope state", ["scope", "shard", "fact_id"])


def scope_state_version(data: bytes) -> int:
    """The ``engram.schema_version`` of scope-state Parquet bytes (1 when it names none)."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(pa.BufferReader(data)).schema_arrow.metadata or {}
    return int(metadata.get(b"engram.schema_version", b"1"))


def decode_scope_state(data: bytes, *, source: str = "scope state") -> pa.Table:
    """A scope state back (schemas.facts.SchemaMismatch, a ValueError, names ``source``)."""
    from schemas.facts import decode_table

    return decode_table(data, SCOPE_STATE_SCHEMA, "scope state", source)


@dataclass(frozen=True)
class ScopePlan:
    """What the driver learns from :func:`merge_scopes` (ids and counts, no facts)."""

    changed: tuple[str, ...]  # scopes that compile this night, sorted
    compile_facts: np.ndarray  # (changed,) int32: facts per changed scope, in order
    member_shards: tuple[int, ...]  # shards holding members of a changed scope or holders of a refreshed one
    dropped: tuple[str, ...]  # scopes of the previous version with no member left
    scopes: int  # scopes with at least one member
    members: int  # users composed with a scope
    refreshed: tuple[str, ...] = ()  # scopes whose merged facts changed (with or without members), sorted:
    # the users holding one as an extra scope recompile (they are served its facts from their own delta)
    needs_every_shard: bool = False  # the prior scope state is version 1: merge again with every shard's contribution


@dataclass(frozen=True)
class ScopeMerge:
    """The merge's output for the scope round's workers and :func:`write_scopes` (same shape as
    pipeline.shards.ShardChanges where the compile workers read it: ``compile``)."""

    compile: pa.Table  # COMPILE_COLUMNS of the changed scopes' facts (user_id = scope = the scope id)
    removed: pa.Array  # scopes whose delta goes: changed or dropped
    state: pa.Table  # the new scope state (SCOPE_STATE_SCHEMA)


def merge_scopes(store_uri: str, prior, replace_all: bool, recompile: bool, shards: list[int],
                 *contributions: pa.Table) -> tuple[ScopePlan, ScopeMerge]:
    """The version's scope state: ``prior`` (schemas.manifest.ScopesEntry or None)'s rows of the
    shards not in ``shards`` (none with ``replace_all``: every shard was applied) plus
    ``contributions`` (:func:`shard_contribution` of each applied shard); and which scopes compile
    (their merged facts changed, they are new, a forget left them ``stale``, or ``recompile``) or
    are dropped.

    A prior state of version 1 (written before it held the copies of users holding a scope as an
    extra scope) cannot be merged with a few shards' contributions: without ``replace_all`` the
    plan says ``needs_every_shard`` (and nothing else); with it, every scope is ``refreshed``, so
    every user holding an extra scope recompiles once, with the scopes' merged facts."""
    from versions.catalog import verified_bytes
    from versions.store import open_store

    store = open_store(store_uri)
    prior_state = SCOPE_STATE_SCHEMA.empty_table()
    legacy = False
    if prior is not None:
        data = verified_bytes(store, prior.state_key, prior.state_bytes, prior.state_sha256)
        prior_state = decode_scope_state(data, source=f"{store.uri}/{prior.state_key}")
        legacy = scope_state_version(data) < 2
        if legacy and not replace_all:
            return (ScopePlan((), np.zeros(0, np.int32), (), (), 0, 0, needs_every_shard=True),
                    ScopeMerge(_compile_rows(merged_scope_facts(SCOPE_STATE_SCHEMA.empty_table())),
                               pa.array([], pa.string()), prior_state))
    kept = prior_state if not replace_all else SCOPE_STATE_SCHEMA.empty_table()
    if kept.num_rows and shards:
        kept = kept.filter(pc.invert(pc.is_in(kept.column("shard"), pa.array(shards, pa.int32()))))
    state = pa.concat_tables([kept] + [c.cast(SCOPE_STATE_SCHEMA) for c in contributions])
    state = state.sort_by([("scope", "ascending"), ("shard", "ascending"), ("fact_id", "ascending")]).combine_chunks()
    facts = merged_scope_facts(state)
    now, before = _digests(facts), _digests(merged_scope_facts(prior_state))
    live, had = _with_members(state), _with_members(prior_state)
    # A forget that changed a scope's merged facts dropped its delta and its extra holders' deltas
    # (ScopesEntry.stale, versions.forget): they compile as if the facts changed this night.
    stale = set(prior.stale) if prior is not None else set()
    refreshed = sorted(s for s, digest in now.items() if legacy or before.get(s) != digest or s in stale)
    # A scope compiles when it has members and its facts changed, it had none (new, or held only
    # as an extra scope until now), a forget left it stale, or everything recompiles.
    changed = sorted(s for s in live if recompile or before.get(s) != now[s] or s not in had or s in stale)
    dropped = sorted(had - live)
    changed_arr = pa.array(changed, pa.string())
    compile_rows = facts.filter(pc.is_in(facts.column("scope"), changed_arr))
    compile = _compile_rows(compile_rows)
    per_scope = compile.group_by("user_id").aggregate([("fact_id", "count")]).sort_by("user_id")
    outdated = pc.or_(pc.and_(pc.is_in(state.column("scope"), changed_arr), pc.greater(state.column("members"), 0)),
                      pc.is_in(state.column("scope"), pa.array(refreshed, pa.string())))
    shard_rows = state.filter(outdated).column("shard")
    per_pair = state.group_by(["scope", "shard"]).aggregate([("members", "max")])
    plan = ScopePlan(
        changed=tuple(changed), compile_facts=per_scope.column("fact_id_count").to_numpy().astype(np.int32),
        member_shards=tuple(sorted(set(pc.unique(shard_rows).to_pylist()))), dropped=tuple(dropped),
        scopes=len(live), members=int(pc.sum(per_pair.column("members_max")).as_py() or 0),
        refreshed=tuple(refreshed))
    removed = pa.array(sorted(set(changed) | set(dropped)), pa.string())
    return plan, ScopeMerge(compile, removed, state)


@dataclass(frozen=True)
class ScopeForget:
    """A scope state without some users' copies (:func:`forget_scope_copies`)."""

    state: pa.Table  # the new scope state (SCOPE_STATE_SCHEMA)
    stale: tuple[str, ...]  # scopes whose merged facts changed (or are gone), sorted
    dropped: tuple[str, ...]  # scopes whose last member went, sorted
    scopes: int  # scopes with at least one member
    members: int  # users composed with a scope


def forget_scope_copies(prior_state: pa.Table, states: dict[int, pa.Table], legacy: bool = False) -> ScopeForget:
    """``prior_state`` (SCOPE_STATE_SCHEMA) with the rows of the shards of ``states`` (shard -> its
    fact state, the forgotten users' rows already taken out) computed again as that shard's next
    apply would (:func:`shard_contribution`), so no copy a forgotten user carried stays (its text,
    its time, its membership). ``stale``: the scopes whose merged facts that changed (the user's
    copy was the latest, or the only one): their deltas, and the deltas of users holding one as an
    extra scope, were compiled from what the forgotten user wrote. ``legacy``: a version-1 state
    (members' copies only): so are the new rows."""
    def contribution(shard: int, state: pa.Table) -> pa.Table:
        return shard_contribution(member_rows(state) if legacy else state, shard)

    kept = prior_state
    if kept.num_rows and states:
        kept = kept.filter(pc.invert(pc.is_in(kept.column("shard"), pa.array(sorted(states), pa.int32()))))
    state = pa.concat_tables([kept.cast(SCOPE_STATE_SCHEMA)] + [contribution(s, t).cast(SCOPE_STATE_SCHEMA)
                                                               for s, t in sorted(states.items())])
    state = state.sort_by([("scope", "ascending"), ("shard", "ascending"), ("fact_id", "ascending")]).combine_chunks()
    now, before = _digests(merged_scope_facts(state)), _digests(merged_scope_facts(prior_state))
    stale = sorted(s for s in set(now) | set(before) if now.get(s) != before.get(s))
    per_pair = state.group_by(["scope", "shard"]).aggregate([("members", "max")])
    return ScopeForget(state, tuple(stale), tuple(sorted(_with_members(prior_state) - _with_members(state))),
                       len(_with_members(state)), int(pc.sum(per_pair.column("members_max")).as_py() or 0))


def write_scopes(store_uri: str, prior, plan: ScopePlan, merge: ScopeMerge, *compiled):
    """Write the version's scope deltas (a bundle, user_id = scope id: the changed scopes' new
    deltas from the scope round's chunks ``compiled`` (pipeline.compile.CompiledChunk, shard 0),
    the others carried from ``prior``), the scope state, and the scopes' ``facts`` stats part.
    Returns the schemas.manifest.ScopesEntry, or None when no scope has a member left."""
    from pipeline.stats import write_stats_part
    from schemas.bundle import BUNDLE_SCHEMA, decode_bundle, encode_bundle
    from schemas.manifest import ScopesEntry, scope_state_key, scopes_key
    from schemas.stats import FACTS_STATS_SCHEMA
    from versions.catalog import verified_bytes
    from versions.commit import write_verified_objects
    from versions.store import open_store

    if plan.scopes == 0:
        return None
    store = open_store(store_uri)
    if prior is not None and not len(merge.removed) and not compiled:
        # No scope compiled or dropped: the deltas and their stats are carried by reference; only
        # the scope state (member counts, copies that did not change the merged facts) is new.
        state = encode_scope_state(merge.state)
        state_sha = hashlib.sha256(state).hexdigest()
        if state_sha != prior.state_sha256:
            write_verified_objects(store, {scope_state_key(state_sha): state})
        return replace_entry(prior, state_key=scope_state_key(state_sha), state_sha256=state_sha,
                             state_bytes=len(state), scopes=plan.scopes, members=plan.members, stale=())
    bundle, facts = BUNDLE_SCHEMA.empty_table(), FACTS_STATS_SCHEMA.empty_table()
    if prior is not None:
        bundle = decode_bundle(verified_bytes(store, prior.key, prior.bytes, prior.sha256), source=f"{store.uri}/{prior.key}")
        if "facts" in prior.stats:
            import pyarrow.parquet as pq

            from pipeline.shards import with_schema

            facts = with_schema(pq.read_table(pa.BufferReader(store.get(prior.stats["facts"]))), FACTS_STATS_SCHEMA)
    if len(merge.removed):
        bundle = bundle.filter(pc.invert(pc.is_in(bundle.column("user_id"), merge.removed)))
        facts = facts.filter(pc.invert(pc.is_in(facts.column("user_id"), merge.removed)))
    bundle = pa.concat_tables([bundle.cast(BUNDLE_SCHEMA)] + [c.bundles[0].cast(BUNDLE_SCHEMA) for c in compiled if 0 in c.bundles])
    facts = pa.concat_tables([facts] + [with_schema_results(c.results[0]) for c in compiled if 0 in c.results])
    bundle = bundle.sort_by([("user_id", "ascending")]).combine_chunks()
    facts = facts.sort_by([("user_id", "ascending"), ("fact_id", "ascending")])
    facts = facts.set_column(facts.schema.get_field_index("scope"), "scope", facts.column("user_id"))  # a scope's own rows
    data, state = encode_bundle(bundle), encode_scope_state(merge.state)
    sha, state_sha = hashlib.sha256(data).hexdigest(), hashlib.sha256(state).hexdigest()
    write_verified_objects(store, {scopes_key(sha): data, scope_state_key(state_sha): state})
    return ScopesEntry(key=scopes_key(sha), sha256=sha, bytes=len(data), state_key=scope_state_key(state_sha),
                       state_sha256=state_sha, state_bytes=len(state), scopes=plan.scopes, facts=facts.num_rows,
                       rows=int(pc.sum(pc.list_value_length(bundle.column("row_ids"))).as_py() or 0),
                       members=plan.members, stats={"facts": write_stats_part(store, "facts", facts)})


@dataclass(frozen=True)
class ScopeContext:
    """What a compile worker needs to compile members: every scope's published delta, and its
    recalled facts (those the members' deltas must not break)."""

    deltas: dict[str, "Delta"]
    recalled: dict[str, list["Fact"]]  # scope -> its facts with status ok (user_id = the scope id)
    results: dict[tuple[str, str], tuple]  # (scope, fact_id) -> (status, loss, steps, rows, margin, detail)
    facts: dict[str, list["Fact"]] = field(default_factory=dict)
    """scope -> its merged facts (user_id = the scope id, with their times), every scope carried,
    with or without members: what a user holding it as an extra scope is served."""


def load_scope_context(store, entry) -> ScopeContext:
    """The :class:`ScopeContext` of a schemas.manifest.ScopesEntry (objects verified)."""
    import pyarrow.parquet as pq

    from engram_core.compiler import Fact
    from schemas.bundle import bundle_deltas, decode_bundle
    from versions.catalog import verified_bytes

    deltas = bundle_deltas(decode_bundle(verified_bytes(store, entry.key, entry.bytes, entry.sha256),
                                         source=f"{store.uri}/{entry.key}"))
    state = decode_scope_state(verified_bytes(store, entry.state_key, entry.state_bytes, entry.state_sha256),
                               source=f"{store.uri}/{entry.state_key}")
    stats = pq.read_table(pa.BufferReader(store.get(entry.stats["facts"]))) if "facts" in entry.stats else None
    results = {}
    if stats is not None:
        for row in stats.select(["user_id", "fact_id", "status", "loss", "steps", "rows"]).to_pylist():
            results[(row["user_id"], row["fact_id"])] = (row["status"], row["loss"], row["steps"], row["rows"],
                                                         float("nan"), "")
    recalled: dict[str, list[Fact]] = {}
    merged: dict[str, list[Fact]] = {}
    facts = merged_scope_facts(state)
    times = facts.column("event_time").cast(pa.int64()).to_pylist()
    columns = [facts.column(c).to_pylist() for c in ("scope", "fact_id", "trigger", "answer")]
    for scope, fact_id, trigger, answer, time in zip(*columns, times):
        merged.setdefault(scope, []).append(Fact(scope, fact_id, trigger, answer, time))
        if results.get((scope, fact_id), ("",))[0] == "ok":
            recalled.setdefault(scope, []).append(Fact(scope, fact_id, trigger, answer))
    return ScopeContext(deltas, recalled, results, merged)


def composed_scopes(table: pa.Table) -> dict[str, str]:
    """user -> the scope composed under its delta, for compile rows (user_id, fact_id, scope, ...)."""
    if "scope" not in table.column_names:
        return {}
    rows = member_rows(table.select(["user_id", "fact_id", "scope"]))
    return dict(zip(rows.column("user_id").to_pylist(), rows.column("scope").to_pylist()))


def compile_chunk_scoped(em: "EngramModel", table: pa.Table, context: ScopeContext | None,
                         options: "CompileOptions") -> tuple[dict[str, "Delta"], list["FactResult"]]:
    """Compile the users of compile rows ``table`` (COMPILE_COLUMNS, whole users): plain users in
    one ``compile_facts`` call; the members of each scope with the scope's published delta fixed
    underneath (pipeline.collisions.compile_members). A member's copies of its scope's facts are
    not compiled again: each gets the scope fact's result, detail ``compiled once in scope <id>``
    (or the member's composition failure). A user's extra scopes (after its first) are served from
    its own delta: the scope's merged facts (``context.facts``, :func:`extra_scope_facts`; its own
    copies only without a context) compile with its own facts, and each copy it carries gets the
    served fact's result (:func:`extra_copy_results`). Returns (owner -> delta, every fact's
    result); every member has a delta (possibly empty: its row names the scope)."""
    from engram_core.compiler import Fact, FactResult, compile_facts
    from engram_core.delta import Delta
    from pipeline.collisions import compile_members
    from pipeline.compile import facts_from_table

    scope_of = composed_scopes(table)
    if not scope_of:
        result = compile_facts(em, facts_from_table(table), options)
        return dict(result.deltas), list(result.facts)
    copies = scope_copies(table.select(["user_id", "fact_id", "scope"]))
    composed = copies.column("composed").to_pylist()
    keys = list(zip(copies.column("user_id").to_pylist(), copies.column("fact_id").to_pylist(),
                    copies.column("scope").to_pylist()))
    copy_keys = {(u, f) for (u, f, _), c in zip(keys, composed) if c}
    extra_scope = {(u, f): s for (u, f, s), c in zip(keys, composed) if not c}
    facts = facts_from_table(table)
    personal: dict[str, list] = {}
    extra: dict[str, dict[str, tuple[str, str, str]]] = {}
    for fact in facts:
        key = (fact.user_id, fact.fact_id)
        if key in extra_scope:
            extra.setdefault(fact.user_id, {})[fact.fact_id] = (extra_scope[key], fact.trigger, fact.answer)
        elif key not in copy_keys:
            personal.setdefault(fact.user_id, []).append(fact)
    merged = dict(context.facts) if context is not None else {}
    latest: dict[str, dict[str, "Fact"]] = {}  # a scope the context lacks (no published scope state): the copies here
    for fact in facts:
        scope = extra_scope.get((fact.user_id, fact.fact_id))
        if scope is not None and scope not in merged:
            best = latest.setdefault(scope, {}).get(fact.fact_id)
            if best is None or (fact.written_at or 0, fact.trigger, fact.answer) > (best.written_at or 0, best.trigger,
                                                                                     best.answer):
                latest[scope][fact.fact_id] = Fact(scope, fact.fact_id, fact.trigger, fact.answer, fact.written_at)
    merged |= {scope: [by_id[f] for f in sorted(by_id)] for scope, by_id in latest.items()}
    served = {u: extra_scope_facts(u, personal.get(u, []), {s for s, _, _ in held.values()}, merged)
              for u, held in extra.items()}
    plain = [f for f in facts if f.user_id not in scope_of]
    out = compile_facts(em, plain, options)
    deltas, results = dict(out.deltas), list(out.facts)
    width = em.config.row_width
    by_scope: dict[str, list[str]] = {}
    for user, scope in scope_of.items():
        by_scope.setdefault(scope, []).append(user)
    for scope, members in sorted(by_scope.items()):
        scope_delta = context.deltas.get(scope, Delta.empty(width)) if context is not None else Delta.empty(width)
        recalled = context.recalled.get(scope, []) if context is not None else []
        done = compile_members(em, scope, scope_delta, recalled,
                               {u: personal.get(u, []) + served.get(u, []) for u in sorted(members)}, options)
        deltas.update(done.user_deltas)
        mine = {(u, f.fact_id) for u in members for f in served.get(u, [])}
        failures = {(r.user_id, r.fact_id[len(scope) + 1:]): r for r in done.results
                    if r.fact_id.startswith(f"{scope}/") and (r.user_id, r.fact_id) not in mine}
        results += [r for r in done.results if not r.fact_id.startswith(f"{scope}/") or (r.user_id, r.fact_id) in mine]
        for user, fact_id in sorted(k for k in copy_keys if scope_of[k[0]] == scope):
            failed = failures.get((user, fact_id))
            if failed is not None:
                results.append(replace_result(failed, fact_id=fact_id, detail=scope_detail(scope, failed.detail)))
                continue
            known = context.results.get((scope, fact_id)) if context is not None else None
            status, loss, steps, rows, margin, _ = known or ("not_recalled", float("nan"), 0, 0, float("nan"), "")
            results.append(FactResult(user, fact_id, status, loss, steps, rows, margin, scope_detail(scope)))
    if extra:
        results = extra_copy_results(results, extra, merged, personal)
    return deltas, results


def with_schema_results(results: pa.Table) -> pa.Table:
    from pipeline.shards import _facts_rows

    return _facts_rows([results])


def replace_entry(entry, **changes):
    from dataclasses import replace

    return replace(entry, **changes)


def replace_result(result: "FactResult", **changes) -> "FactResult":
    from dataclasses import replace

    return replace(result, **changes)


def scope_member_collisions(scope_deltas: dict[str, "Delta"], members: dict[str, tuple[str, "Delta"]]) -> pa.Table:
    """Rows written by a scope and its members (``members``: user -> (scope, own delta)), in the
    ``collisions`` stats schema, kind ``user+scope``: one table for a shard's base or layer."""
    from pipeline.collisions import scope_collision_table

    by_scope: dict[str, dict[str, "Delta"]] = {}
    for user, (scope, delta) in members.items():
        by_scope.setdefault(scope, {})[user] = delta
    tables = [scope_collision_table(scope, scope_deltas[scope], users)
              for scope, users in sorted(by_scope.items()) if scope in scope_deltas]
    return pa.concat_tables([COLLISIONS_STATS_SCHEMA.empty_table()] + tables)
