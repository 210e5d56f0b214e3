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

Serving composes them: a request of a member is served with ``(scope_delta, member_delta)``
(``overlay_for(em, [[scope_delta, member_delta]])``). A user in several scopes keeps the first
scope (by id) as its shared delta and compiles the other scopes' facts into its own delta.

:func:`compile_scoped` is the function a night calls with the facts of the users it compiles
(plain users go through one ``compile_facts`` call; each scope through ``compile_with_scope``).
No Ray here: the night runs it per scope on its workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import pyarrow as pa

from pipeline.collisions import compile_with_scope
from schemas.stats import COLLISIONS_STATS_SCHEMA

if TYPE_CHECKING:
    from engram_core.checkpoint import EngramModel
    from engram_core.compiler import CompileOptions, Fact, FactResult
    from engram_core.delta import Delta


@dataclass(frozen=True)
class ScopedFacts:
    """A fact state split into plain per-user facts and shared scopes."""

    personal: dict[str, list["Fact"]]  # user -> own facts (including facts of extra scopes)
    scope_facts: dict[str, list["Fact"]]  # scope id -> its facts (user_id = the scope id)
    members: dict[str, list[str]]  # scope id -> member user ids, sorted
    member_copies: dict[str, dict[str, str]] = field(default_factory=dict)
    """user -> fact_id -> scope id: the scope facts a member carries (compiled once, in the scope)."""


def split_scopes(state: pa.Table) -> ScopedFacts:
    """Split fact-state rows (``user_id, fact_id, scope, trigger, answer, event_time``) by scope."""
    from engram_core.compiler import Fact

    cols = {name: state.column(name).to_pylist() for name in ("user_id", "fact_id", "scope", "trigger", "answer")}
    times = state.column("event_time").cast(pa.int64()).to_pylist() if "event_time" in state.column_names \
        else [0] * state.num_rows
    scopes_of: dict[str, set[str]] = {}
    for user, scope in zip(cols["user_id"], cols["scope"]):
        if scope and scope != user:
            scopes_of.setdefault(user, set()).add(scope)
    shared_scope = {user: min(scopes) for user, scopes in scopes_of.items()}  # one composed scope per user
    personal: dict[str, list[Fact]] = {}
    latest: dict[str, dict[str, tuple[int, Fact]]] = {}
    members: dict[str, set[str]] = {}
    copies: dict[str, dict[str, str]] = {}
    for user, fact_id, scope, trigger, answer, time in zip(*cols.values(), times):
        if scope and scope != user and shared_scope[user] == scope:
            members.setdefault(scope, set()).add(user)
            copies.setdefault(user, {})[fact_id] = scope
            best = latest.setdefault(scope, {}).get(fact_id)
            if best is None or (time, trigger, answer) > (best[0], best[1].trigger, best[1].answer):
                latest[scope][fact_id] = (time, Fact(scope, fact_id, trigger, answer))
        else:
            personal.setdefault(user, []).append(Fact(user, fact_id, trigger, answer))
    scope_facts = {s: [f for _, (_, f) in sorted(by_id.items())] for s, by_id in latest.items()}
    return ScopedFacts(personal, scope_facts, {s: sorted(m) for s, m in members.items()}, copies)


@dataclass
class ScopedCompileResult:
    deltas: dict[str, "Delta"]
    """owner -> delta: every compiled user, and every scope (owner id = the scope id)."""
    scope_of: dict[str, str]
    """member -> the scope whose delta serving composes under the member's own."""
    results: list["FactResult"]
    """Every fact of every user: own facts, and per member its copies of scope facts (the scope
    fact's result, or the member's composition failure)."""
    collisions: pa.Table  # rows written by a scope and one of its members (COLLISIONS_STATS_SCHEMA)
    recompiled_members: list[str] = field(default_factory=list)


def compile_scoped(em: "EngramModel", state: pa.Table, options: "CompileOptions | None" = None) -> ScopedCompileResult:
    """Compile the users of ``state`` (fact-state rows) with each shared scope compiled once."""
    from engram_core.compiler import CompileOptions, FactResult, compile_facts

    options = options or CompileOptions()
    split = split_scopes(state)
    scoped_users = {u for ms in split.members.values() for u in ms}
    plain = [f for u in sorted(split.personal) if u not in scoped_users for f in split.personal[u]]
    out = compile_facts(em, plain, options)
    deltas, results = dict(out.deltas), list(out.facts)
    scope_of: dict[str, str] = {}
    tables, recompiled = [], []
    for scope in sorted(split.scope_facts):
        members = split.members[scope]
        scope_delta, user_deltas, report = compile_with_scope(
            em, split.scope_facts[scope], {u: split.personal.get(u, []) for u in members}, options)
        deltas[scope] = scope_delta
        deltas.update(user_deltas)
        scope_of.update({u: scope for u in members})
        recompiled += report.recompiled_users
        tables.append(report.collisions)
        scope_results = {r.fact_id: r for r in report.results if r.user_id == scope}
        failures = {(r.user_id, r.fact_id) for r in report.results if r.user_id in members
                    and r.fact_id.startswith(f"{scope}/")}
        failure_of = {(r.user_id, r.fact_id): r for r in report.results if (r.user_id, r.fact_id) in failures}
        results += [r for r in report.results if r.user_id in members and (r.user_id, r.fact_id) not in failures]
        for user in members:
            for fact_id, owner in sorted(split.member_copies.get(user, {}).items()):
                failed = failure_of.get((user, f"{scope}/{fact_id}"))
                base = failed or scope_results.get(fact_id)
                if base is not None:
                    results.append(FactResult(user, fact_id, base.status, base.loss, base.steps, base.rows,
                                              base.margin, base.detail or f"compiled once in scope {scope}"))
        results += [r for r in report.results if r.user_id == scope]
    collisions = pa.concat_tables(tables) if tables else COLLISIONS_STATS_SCHEMA.empty_table()
    return ScopedCompileResult(deltas, scope_of, results, collisions, sorted(recompiled))


def served_deltas(result: ScopedCompileResult, user_id: str) -> Sequence["Delta"]:
    """The deltas a request of ``user_id`` is served with: ``(scope delta, own delta)`` for a
    member, ``(own delta,)`` otherwise (what a serving index returns for the user)."""
    own = result.deltas.get(user_id)
    scope = result.scope_of.get(user_id)
    parts = [result.deltas[scope]] if scope is not None else []
    return tuple(parts + ([own] if own is not None else []))
