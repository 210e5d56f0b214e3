"""Collisions: (layer, row) pairs written by more than one owner, and what to do about them.

Three kinds, all pure functions over NumPy / Arrow (no Ray, no store), called per shard:

(a) inside one user: all of a user's facts are compiled jointly, so two facts that address
    the same row share one value (the compiler makes it serve both). The delta alone cannot
    tell which of its rows are shared: it holds the union. :func:`user_overlaps` reports per
    user the rows of its delta, and, when per-fact rows are given (:func:`fact_rows` computes
    them from the model's addressing exactly as the compiler does), how many rows are written
    by more than one fact and the rows themselves (:func:`within_user_collision_table`).

(b) user + shared scope: a scope (``org:acme``) is an owner whose delta every member's
    requests see together with the member's own (``overlay_for(em, [[scope, user]])``).
    :func:`compile_with_scope` compiles the scope first, then each member's facts with the
    scope's delta held fixed underneath (``compile_facts(base_deltas=...)``), so the composition
    is exact by construction; scope facts are then checked under every member's composition and
    a member whose rows disturb one is recompiled with the scope's facts as constraints.

(c) across users of one shard: users whose deltas share a row cannot be written into one
    shared table at once. :func:`cross_user_collisions` finds the shared rows (sort the
    ``(row key, user)`` pairs, find runs; vectorised NumPy) and partitions the shard's users
    into co-batch groups whose row sets are pairwise disjoint. Groups are per shard: users of
    different shards are never batched into one table write, so a 1M-user run is processed
    shard by shard and never holds every row in one process.

The colouring is greedy and sequential over users but O(rows of the user) each, with no
per-row Python loop: each shared row keeps a counter "next free group"; a user takes the
maximum counter over its shared rows and bumps those counters past it. Two users sharing a
row therefore never share a group. It needs at least as many groups as the hottest row has
owners (a lower bound for any valid partition) and is reported next to that bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from engram_core.delta import Delta
from schemas.stats import COLLISIONS_STATS_SCHEMA

if TYPE_CHECKING:  # model-side types only; the cross-user functions need no torch
    from engram_core.checkpoint import EngramModel
    from engram_core.compiler import CompileOptions, Fact, FactResult

log = logging.getLogger(__name__)

OWNER_KIND_USERS = "users"
OWNER_KIND_USER_SCOPE = "user+scope"
OWNER_KIND_FACTS = "facts"
EXAMPLE_OWNERS = 5
_CHECK_BATCH = 64  # sequences per forward when checking scope facts under compositions
_LAYER_SHIFT = 40  # row key = layer << 40 | row, as in engram_core.delta


def row_keys(layers: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """(layer, row) -> one sortable int64 key per row."""
    return (np.asarray(layers, np.int64) << _LAYER_SHIFT) | np.asarray(row_ids, np.int64)


def split_row_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys = np.asarray(keys, np.int64)
    return keys >> _LAYER_SHIFT, keys & ((1 << _LAYER_SHIFT) - 1)


# ------------------------------------------------------------------- (a) inside one user


def fact_rows(em: "EngramModel", facts: Iterable["Fact"], trigger_window: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """user -> fact_id -> row keys the fact writes (what the compiler trains for it).

    Written positions are the trigger's last position and every answer position but the last,
    plus the context positions of facts in conflict with another of the user's facts, in the
    target layer, the heads whose N-gram lies inside the fact's text
    (:func:`engram_core.addressing.own_text_heads`), for the canonical texts (see engram_core.compiler and
    engram_core.conflicts). Facts that conflict beyond repair (``CONFLICTS_WITH``) are listed too.
    A trigger longer than ``trigger_window`` tokens is read as the compiler reads it: its last
    ``trigger_window`` tokens (``CompileOptions.trigger_window``), or more where another of the
    user's long triggers ends the same (:func:`engram_core.conflicts.trigger_cuts`).
    """
    from engram_core.conflicts import plan_context, trigger_cuts
    from engram_core.text import canonical_fact

    from engram_core.addressing import head_orders, own_text_heads

    layer = em.config.target_layer
    addresser = em.memory.addresser
    orders, lead = head_orders(em.config), em.prompt_lead
    by_user: dict[str, list] = {}
    facts = list(facts)
    encoded = []
    for fact in facts:
        trigger, answer = canonical_fact(fact.trigger, fact.answer)
        encoded.append((em.encode_prompt(trigger), em.encode_answer(answer)))
    # as the compiler windows long triggers (engram_core.compiler._validate)
    cuts = trigger_cuts([t for t, _ in encoded], [f.user_id for f in facts], trigger_window, lead)
    for fact, (trigger_ids, answer_ids), cut in zip(facts, encoded, cuts):
        trigger_ids = trigger_ids[:lead] + trigger_ids[lead + cut:]
        by_user.setdefault(fact.user_id, []).append((fact.fact_id, trigger_ids + answer_ids[:-1], answer_ids))
    out: dict[str, dict[str, np.ndarray]] = {}
    for user, items in by_user.items():
        plan = plan_context([ids for _, ids, _ in items], [a for _, _, a in items], np.zeros(len(items), np.int64),
                            addresser.canonical_ids, em.config.max_ngram, addresser.pad_id, [f for f, _, _ in items])
        for k, (fact_id, ids, answer) in enumerate(items):
            ids_array = np.asarray([ids], np.int64)
            rows = addresser.rows(ids_array, layer)[0]  # (T, H)
            positions = sorted(set(range(len(ids) - len(answer), len(ids))) | set(plan.context.get(k, ())))
            inside = own_text_heads(np.asarray(positions) - lead, orders, np.asarray(positions) >= len(ids) - len(answer))
            written = rows[positions][inside]
            out.setdefault(user, {})[fact_id] = np.unique(row_keys(np.full(written.size, layer), written.ravel()))
    return out


def user_overlaps(deltas: Mapping[str, Delta],
                  fact_rows_by_user: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> pa.Table:
    """Per user: ``rows`` of its delta, and ``shared_rows`` (rows written by >1 of its facts).

    ``shared_rows`` and ``facts`` are null for a user whose per-fact rows were not given: the
    delta alone holds only the union of its facts' rows.
    """
    users = sorted(deltas)
    rows, facts, shared = [], [], []
    for user in users:
        rows.append(deltas[user].num_rows)
        per_fact = (fact_rows_by_user or {}).get(user)
        if per_fact is None:
            facts.append(None)
            shared.append(None)
            continue
        facts.append(len(per_fact))
        shared.append(int(len(_shared_keys(per_fact)[0])))
    return pa.table({
        "user_id": pa.array(users, pa.string()),
        "rows": pa.array(rows, pa.int64()),
        "facts": pa.array(facts, pa.int64()),
        "shared_rows": pa.array(shared, pa.int64()),
    })


def _shared_keys(per_fact: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Keys written by more than one fact, their fact counts, and the fact ids per key."""
    names = sorted(per_fact)
    if not names:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), []
    keys = np.concatenate([np.unique(np.asarray(per_fact[n], np.int64)) for n in names])
    owner = np.repeat(np.arange(len(names)), [len(np.unique(per_fact[n])) for n in names])
    runs = _runs(keys, owner)
    hot = runs.counts > 1
    examples = [[names[o] for o in runs.owners_of(i)] for i in np.flatnonzero(hot)]
    return runs.keys[hot], runs.counts[hot], examples


def within_user_collision_table(fact_rows_by_user: Mapping[str, Mapping[str, np.ndarray]]) -> pa.Table:
    """Rows shared by several facts of one user, in the ``collisions`` stats schema.

    ``owner_kind`` is "facts"; ``example_owners`` holds ``user_id/fact_id`` names.
    """
    parts = []
    for user in sorted(fact_rows_by_user):
        keys, counts, examples = _shared_keys(fact_rows_by_user[user])
        parts.append((keys, counts, [[f"{user}/{f}" for f in ex[:EXAMPLE_OWNERS]] for ex in examples]))
    keys = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    counts = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    examples = [e for p in parts for e in p[2]]
    return _collision_rows(keys, counts, OWNER_KIND_FACTS, examples)


# ------------------------------------------------------------------- runs of shared keys


@dataclass(frozen=True)
class _Runs:
    """Sorted (key, owner) pairs grouped into runs of one key."""

    keys: np.ndarray  # (R,) distinct keys, ascending
    counts: np.ndarray  # (R,) owners per key
    starts: np.ndarray  # (R,) first index of each run in ``sorted_owner``
    sorted_owner: np.ndarray  # (n,) owner of each pair, sorted by (key, owner)
    run_of: np.ndarray  # (n,) run index of each *input* pair (input order)

    def owners_of(self, run: int, limit: int | None = None) -> np.ndarray:
        start = self.starts[run]
        count = self.counts[run] if limit is None else min(limit, self.counts[run])
        return self.sorted_owner[start:start + count]


def _runs(keys: np.ndarray, owner: np.ndarray) -> _Runs:
    """Group (key, owner) pairs by key; pairs must be unique (a delta's rows are)."""
    order = np.lexsort((owner, keys))
    sorted_keys = keys[order]
    boundary = np.empty(len(sorted_keys), bool)
    if len(sorted_keys):
        boundary[0] = True
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=boundary[1:])
    starts = np.flatnonzero(boundary)
    counts = np.diff(np.append(starts, len(sorted_keys)))
    run_sorted = np.cumsum(boundary) - 1
    run_of = np.empty(len(keys), np.int64)
    run_of[order] = run_sorted
    return _Runs(sorted_keys[starts], counts, starts, owner[order], run_of)


def _collision_rows(keys: np.ndarray, counts: np.ndarray, kind: str, examples: Sequence[Sequence[str]]) -> pa.Table:
    layers, rows = split_row_keys(keys)
    return pa.Table.from_arrays([
        pa.array(layers, pa.int64()),
        pa.array(rows, pa.int64()),
        pa.array(np.asarray(counts, np.int64), pa.int64()),
        pa.array([kind] * len(keys), pa.string()),
        pa.array([list(e) for e in examples], pa.list_(pa.string())),
    ], schema=COLLISIONS_STATS_SCHEMA)


# ------------------------------------------------------------------- (c) across users


@dataclass(frozen=True)
class CollisionReport:
    """Cross-user collisions of one shard.

    ``groups``: the shard's users partitioned into co-batch groups with pairwise disjoint row
    sets (every user in exactly one group). ``hot_rows``: the most shared rows in the
    ``collisions`` stats schema. ``pairs``: sum over shared rows of C(owners, 2), i.e. user
    pairs counted once per row they share (the distinct-pair graph of a row shared by 10^5
    users has 5*10^9 edges and is never materialised). ``min_groups``: the owners of the
    hottest row, a lower bound on the number of groups of any valid partition.
    """

    users: int
    rows: int  # (user, row) pairs in the shard
    distinct_rows: int
    shared_rows: int  # distinct rows with more than one owner
    conflicted_users: int  # users with at least one shared row
    pairs: int
    min_groups: int
    groups: list[list[str]] = field(repr=False)
    hot_rows: pa.Table = field(repr=False)

    def summary(self) -> dict:
        return {"users": self.users, "rows": self.rows, "distinct_rows": self.distinct_rows,
                "shared_rows": self.shared_rows, "conflicted_users": self.conflicted_users,
                "pairs": self.pairs, "groups": len(self.groups), "min_groups": self.min_groups}


def cross_user_collisions(deltas: Mapping[str, Delta], *, top: int = 100) -> CollisionReport:
    """Collisions between the users of one shard (``deltas``: user_id -> delta)."""
    users = sorted(deltas)
    sizes = np.fromiter((deltas[u].num_rows for u in users), np.int64, len(users))
    keys = (np.concatenate([row_keys(deltas[u].layers, deltas[u].row_ids) for u in users])
            if users else np.zeros(0, np.int64))
    return cross_user_collisions_arrays(users, sizes, keys, top=top)


def cross_user_collisions_arrays(users: Sequence[str], rows_per_user: np.ndarray, keys: np.ndarray, *,
                                 top: int = 100) -> CollisionReport:
    """The same from flat arrays: ``keys`` (sum(rows_per_user),) row keys, user by user in order.

    Each user's keys must be unique (a delta's rows are). This is the form a shard's bundle
    gives without building Delta objects (``row_keys`` of the flattened list columns).
    """
    rows_per_user = np.asarray(rows_per_user, np.int64)
    keys = np.asarray(keys, np.int64)
    if rows_per_user.sum() != len(keys) or len(rows_per_user) != len(users):
        raise ValueError(f"collisions: {len(users)} users with {int(rows_per_user.sum())} rows in all, "
                         f"but {len(keys)} row keys")
    owner = np.repeat(np.arange(len(users), dtype=np.int32), rows_per_user)
    runs = _runs(keys, owner)
    shared_run = runs.counts > 1
    colour = _greedy_groups(runs.run_of, rows_per_user, shared_run, runs.counts)
    groups = _groups_from_colours(users, colour)
    hot = np.flatnonzero(shared_run)
    hot = hot[np.argsort(-runs.counts[hot], kind="stable")[:top]]
    examples = [[users[o] for o in runs.owners_of(r, EXAMPLE_OWNERS)] for r in hot]
    shared_counts = runs.counts[shared_run]
    conflicted = np.zeros(len(users), bool)
    conflicted[owner[shared_run[runs.run_of]]] = True
    return CollisionReport(
        users=len(users), rows=len(keys), distinct_rows=len(runs.keys), shared_rows=int(shared_run.sum()),
        conflicted_users=int(conflicted.sum()),
        pairs=int((shared_counts * (shared_counts - 1) // 2).sum()),
        min_groups=int(runs.counts.max()) if len(runs.counts) else 0,
        groups=groups, hot_rows=_collision_rows(runs.keys[hot], runs.counts[hot], OWNER_KIND_USERS, examples),
    )


def _greedy_groups(run_of: np.ndarray, rows_per_user: np.ndarray, shared_run: np.ndarray,
                   counts: np.ndarray) -> np.ndarray:
    """Group index per user such that two users sharing a row never share a group.

    Users with the most shared rows go first (they are the hardest to place). Per user: the
    group is the max "next free group" counter over its shared rows; those counters then move
    past it. Users without a shared row all land in group 0.
    """
    num_users = len(rows_per_user)
    entry_shared = shared_run[run_of]  # (n,) does this (user, row) pair sit on a shared row
    user_of_entry = np.repeat(np.arange(num_users), rows_per_user)
    shared_per_user = np.bincount(user_of_entry[entry_shared], minlength=num_users)
    colour = np.zeros(num_users, np.int64)
    # Shared rows compacted to 0..S-1; per user only its shared rows (entries stay in user order).
    compact = np.cumsum(shared_run) - 1
    kept_rows = compact[run_of[entry_shared]]
    starts = np.concatenate([[0], np.cumsum(shared_per_user)])
    next_free = np.zeros(int(shared_run.sum()), np.int64)
    order = np.argsort(-shared_per_user, kind="stable")
    order = order[shared_per_user[order] > 0]
    for user in order.tolist():
        rows = kept_rows[starts[user]:starts[user + 1]]
        group = next_free[rows].max()
        colour[user] = group
        next_free[rows] = group + 1
    return colour


def _groups_from_colours(users: Sequence[str], colour: np.ndarray) -> list[list[str]]:
    if not len(users):
        return []
    order = np.lexsort((np.arange(len(users)), colour))
    bounds = np.flatnonzero(np.diff(colour[order])) + 1
    return [[users[i] for i in chunk] for chunk in np.split(order, bounds)]


def collision_table(reports: Iterable[CollisionReport], *, top: int = 100) -> pa.Table:
    """The ``collisions`` stats table of a version: the hottest shared rows over all shards.

    A row shared in two shards is counted per shard (groups are per shard); ``owners`` is the
    per-shard count, and the table keeps the ``top`` rows by owners.
    """
    tables = [r.hot_rows for r in reports]
    if not tables:
        return COLLISIONS_STATS_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    order = np.argsort(-table.column("owners").to_numpy(), kind="stable")[:top]
    return table.take(pa.array(order))


# ------------------------------------------------------------------- (b) user + shared scope


@dataclass
class ScopeCompileResult:
    scope_delta: Delta
    user_deltas: dict[str, Delta]
    results: list["FactResult"]  # scope facts (user_id = scope), users' facts, composition failures
    recompiled_users: list[str]  # members recompiled with the scope's facts as constraints
    collisions: pa.Table  # rows written by both the scope and a member ("user+scope")


def compile_with_scope(
    em: "EngramModel",
    scope_facts: Sequence["Fact"],
    user_facts_by_user: Mapping[str, Sequence["Fact"]],
    options: "CompileOptions | None" = None,
) -> tuple[Delta, dict[str, Delta], "ScopeCompileResult"]:
    """Compile a shared scope and its members so that ``[scope_delta, user_delta]`` is exact.

    1. The scope's facts are compiled alone (its ``user_id`` is the scope, e.g. ``org:acme``).
    2. Every member's facts are compiled with the scope's delta fixed underneath, and the scope's
       facts as fixed facts (``compile_facts(fixed_facts=...)``): their loss is optimised with the
       member's, so the member's rows that overlap them do not break them, but their rows are not
       written into the member's delta.
    3. Every scope fact is checked under every member's composition (a member's rows can sit on
       the scope's rows or at the scope triggers' positions). A member that breaks one is
       recompiled with the scope's facts added to its own as constraints, so its delta also
       writes those rows (only for such members); what still fails is reported per member.
       A member's own fact with the same trigger as a scope fact overrides the scope's answer
       for that member (the personal fact wins; the scope fact is not checked for them).

    Returns ``(scope_delta, user_deltas, result)``; ``result.results`` lists every fact.
    """
    from engram_core.compiler import CompileOptions, compile_facts

    options = options or CompileOptions()
    scope_ids = {f.user_id for f in scope_facts}
    if len(scope_ids) > 1:
        raise ValueError(f"compile_with_scope: scope facts name several owners {sorted(scope_ids)}; one scope per call")
    scope_result = compile_facts(em, list(scope_facts), options)
    scope_id = next(iter(scope_ids), "")
    scope_delta = scope_result.deltas.get(scope_id, Delta.empty(em.config.row_width))
    good_scope = [f for f in scope_facts if _status_ok(scope_result, f)]
    members = compile_members(em, scope_id, scope_delta, good_scope, user_facts_by_user, options)
    results = list(scope_result.facts) + members.results
    return scope_delta, members.user_deltas, ScopeCompileResult(scope_delta, members.user_deltas, results,
                                                                members.recompiled_users, members.collisions)


@dataclass
class MembersCompileResult:
    user_deltas: dict[str, Delta]  # member -> its own delta (no copy of the scope's rows)
    results: list["FactResult"]  # members' own facts, and composition failures (fact_id "<scope>/<fact_id>")
    recompiled_users: list[str]
    collisions: pa.Table  # rows written by both the scope and a member ("user+scope")


def compile_members(
    em: "EngramModel",
    scope_id: str,
    scope_delta: Delta,
    scope_facts: Sequence["Fact"],
    user_facts_by_user: Mapping[str, Sequence["Fact"]],
    options: "CompileOptions | None" = None,
) -> MembersCompileResult:
    """Steps 2-3 of :func:`compile_with_scope` for an already compiled scope: the members' own
    facts compiled with ``scope_delta`` fixed underneath and ``scope_facts`` (the scope's recalled
    facts) riding along as fixed facts; members that still break a scope fact are recompiled with
    the scope's facts as constraints. The night calls this on its compile workers, with the scope
    delta that the night's scope round (or an earlier night) published."""
    from engram_core.compiler import STATUS_NOT_RECALLED, CompileOptions, Fact, FactResult, compile_facts

    options = options or CompileOptions()
    width = em.config.row_width
    members = sorted(user_facts_by_user)
    # A member's own fact on a scope fact's trigger overrides it for that member (personal wins).
    scope_for = {u: [f for f in scope_facts if f.trigger not in {g.trigger for g in user_facts_by_user[u]}]
                 for u in members}
    base = {u: scope_delta for u in members}
    user_facts = [f for u in members for f in user_facts_by_user[u]]
    # The scope's facts ride along as fixed facts: a member's rows that overlap theirs are
    # optimised not to break them, without writing the scope's rows into the member's delta.
    fixed = {u: [Fact(u, f"{scope_id}/{f.fact_id}", f.trigger, f.answer) for f in scope_for[u]] for u in members}
    user_result = compile_facts(em, user_facts, options, base_deltas=base, fixed_facts=fixed)
    user_deltas = {u: user_result.deltas.get(u, Delta.empty(width)) for u in members}
    user_results = {(r.user_id, r.fact_id): r for r in user_result.facts}

    broken = _scope_facts_broken(em, scope_delta, user_deltas, scope_for)
    recompiled = sorted(broken)
    composition_failures: list[FactResult] = []
    if recompiled:
        log.info("scope %s: %d member(s) disturb scope facts; recompiling them with the scope's facts", scope_id, len(recompiled))
        constrained = [f for u in recompiled for f in user_facts_by_user[u]]
        constrained += [Fact(u, f"{scope_id}/{f.fact_id}", f.trigger, f.answer) for u in recompiled for f in scope_for[u]]
        again = compile_facts(em, constrained, options, base_deltas={u: scope_delta for u in recompiled})
        for u in recompiled:
            user_deltas[u] = again.deltas.get(u, Delta.empty(width))
        for r in again.facts:
            if r.fact_id.startswith(f"{scope_id}/"):
                continue
            user_results[(r.user_id, r.fact_id)] = r
        still = _scope_facts_broken(em, scope_delta, {u: user_deltas[u] for u in recompiled}, scope_for)
        for u, fact_ids in sorted(still.items()):
            for fact_id in fact_ids:
                composition_failures.append(FactResult(
                    u, f"{scope_id}/{fact_id}", STATUS_NOT_RECALLED, float("nan"), 0, 0, float("nan"),
                    f"scope fact {fact_id!r} of {scope_id} is not recalled with {u}'s delta composed"))
    results = [user_results[k] for k in sorted(user_results)] + composition_failures
    collisions = scope_collision_table(scope_id, scope_delta, user_deltas)
    return MembersCompileResult(user_deltas, results, recompiled, collisions)


def _status_ok(result, fact) -> bool:
    return any(r.fact_id == fact.fact_id and r.status == "ok" for r in result.facts)


def _scope_facts_broken(em: "EngramModel", scope_delta: Delta, user_deltas: Mapping[str, Delta],
                        scope_for: Mapping[str, Sequence["Fact"]]) -> dict[str, list[str]]:
    """member -> scope fact ids not reproduced (teacher-forced greedy argmax) under [scope, member]."""
    if not user_deltas:
        return {}
    import torch

    from engram_core.serving import overlay_for
    from engram_core.text import canonical_fact

    cases = [(u, f) for u in sorted(user_deltas) for f in scope_for[u]]
    if not cases:
        return {}
    broken: dict[str, list[str]] = {}
    pad = em.tokenizer.pad_token_id or 0
    for start in range(0, len(cases), _CHECK_BATCH):
        chunk = cases[start:start + _CHECK_BATCH]
        encoded = [(em.encode_prompt(t), em.encode_answer(a)) for t, a in (canonical_fact(f.trigger, f.answer) for _, f in chunk)]
        seqs = [t + a[:-1] for t, a in encoded]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, seq in enumerate(seqs):
            ids[b, T - len(seq):] = torch.as_tensor(seq)
            mask[b, T - len(seq):] = 1
        overlay = overlay_for(em, [[scope_delta, user_deltas[u]] for u, _ in chunk])
        with torch.no_grad(), em.memory.use(overlay):
            logits = em.model(input_ids=ids.to(em.device), attention_mask=mask.to(em.device),
                              position_ids=(mask.cumsum(-1) - 1).clamp_min(0).to(em.device)).logits
        predicted = logits.argmax(-1).cpu()  # (B, T)
        for b, ((user, fact), (_, answer)) in enumerate(zip(chunk, encoded)):
            if predicted[b, T - len(answer):].tolist() != answer:
                broken.setdefault(user, []).append(fact.fact_id)
    return broken


def scope_collision_table(scope_id: str, scope_delta: Delta, user_deltas: Mapping[str, Delta]) -> pa.Table:
    """Rows written by the scope and at least one member, in the ``collisions`` stats schema."""
    scope_keys = row_keys(scope_delta.layers, scope_delta.row_ids)
    members = sorted(user_deltas)
    if not members or not len(scope_keys):
        return COLLISIONS_STATS_SCHEMA.empty_table()
    keys = np.concatenate([row_keys(user_deltas[u].layers, user_deltas[u].row_ids) for u in members])
    owner = np.repeat(np.arange(len(members)), [user_deltas[u].num_rows for u in members])
    on_scope = np.isin(keys, scope_keys)
    runs = _runs(keys[on_scope], owner[on_scope])
    examples = [[scope_id] + [members[o] for o in runs.owners_of(r, EXAMPLE_OWNERS - 1)] for r in range(len(runs.keys))]
    return _collision_rows(runs.keys, runs.counts + 1, OWNER_KIND_USER_SCOPE, examples)
