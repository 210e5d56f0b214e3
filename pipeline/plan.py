"""Plan: which users to compile, carry over unchanged, or drop in the next version.

A user is compiled when their live facts (fact_id -> fact_hash) differ from the prior state,
carried when they are identical (their published delta is reused), and dropped when they
have no live fact left. Deltas depend on the model, so a change of base fingerprint makes
every carried delta invalid: the plan refuses unless the caller asks to recompile all.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import pyarrow as pa

from engram_core.text import canonical_prompt, normalize_token_text

logger = logging.getLogger(__name__)


class FingerprintMismatch(RuntimeError):
    """The base model changed since the prior version; deltas cannot be carried over."""


@dataclass(frozen=True)
class Plan:
    compile_users: list[str]  # sorted
    carry_users: list[str]  # sorted
    drop_users: list[str]  # sorted
    reason: str


def user_fact_digest(state: pa.Table) -> dict[str, str]:
    """sha256 per user over their live facts' sorted (fact_id, fact_hash) pairs, and over which
    fact wins each group of facts that share a trigger (:func:`trigger_winners`): an event that
    changes only a fact's time can change which of two such facts is compiled."""
    pairs: dict[str, list[tuple[str, str]]] = {}
    users = state.column("user_id").to_pylist()
    fact_ids = state.column("fact_id").to_pylist()
    hashes = state.column("fact_hash").to_pylist()
    for user_id, fact_id, fact_hash in zip(users, fact_ids, hashes):
        pairs.setdefault(user_id, []).append((fact_id, fact_hash))
    winners = trigger_winners(users, fact_ids, state.column("trigger").to_pylist(),
                              state.column("event_time").cast(pa.int64()).to_pylist())
    digests = {}
    for user_id, facts in pairs.items():
        digest = hashlib.sha256()
        for fact_id, fact_hash in sorted(facts):
            digest.update(f"{len(fact_id)}:{fact_id}:{fact_hash};".encode("utf-8"))
        for fact_id in winners.get(user_id, ()):
            digest.update(f"wins:{len(fact_id)}:{fact_id};".encode("utf-8"))
        digests[user_id] = digest.hexdigest()
    return digests


def trigger_key(trigger: str) -> str:
    """A trigger as the Engram addressing reads its words (engram_core.text.normalize_token_text,
    METHOD.md's tokenizer compression) in today's canonical form (as the compiler tokenizes it: a
    trigger stored with ’ before 2026-12-02 is the one typed with '). Facts of one owner with equal
    keys address the same rows, so no row can tell them apart (engram_core.conflicts)."""
    return normalize_token_text(canonical_prompt(trigger))


def trigger_winners(owners: list[str], fact_ids: list[str], triggers: list[str],
                    times: list[int | None]) -> dict[str, list[str]]:
    """owner -> the fact compiled from each group of its facts sharing a :func:`trigger_key`
    (groups of two or more), sorted: the later written, then the first by fact_id, as the
    compiler chooses (engram_core.compiler._plan_conflicts)."""
    groups: dict[tuple[str, str], list[tuple[bool, int, str]]] = {}
    for owner, fact_id, trigger, time in zip(owners, fact_ids, triggers, times):
        groups.setdefault((owner, trigger_key(trigger)), []).append((time is None, -(time or 0), fact_id))
    out: dict[str, list[str]] = {}
    for (owner, _), members in groups.items():
        if len(members) > 1:
            out.setdefault(owner, []).append(min(members)[2])
    return {owner: sorted(ids) for owner, ids in out.items()}


def check_model_change(prior_fingerprint: str | None, fingerprint: str, recompile_all: bool, *,
                       model: str | None = None, prior: str | None = None) -> None:
    """Raise FingerprintMismatch if the model changed since the prior version and the caller did
    not ask to recompile every user (deltas belong to exactly one model). The message names the
    fingerprint expected (``prior``: the version that has it, e.g. ``s3://b/engram v7``), the
    ``model`` path given, and the three fixes: that model, a new store, or a recompile on purpose."""
    if prior_fingerprint is not None and prior_fingerprint != fingerprint and not recompile_all:
        given = f" (model {model})" if model else ""
        where = f"{prior} was compiled for {prior_fingerprint[:16]}..; " if prior else ""
        raise FingerprintMismatch(
            f"the model changed from {prior_fingerprint} to {fingerprint}{given}; {where}deltas cannot be carried "
            f"across models: point the model (--model, the job spec's model) at the checkpoint with fingerprint "
            f"{prior_fingerprint[:16]}.. (engram model info DIR shows a checkpoint's), publish this model to a new "
            "store, or, to recompile every user for it on purpose, rerun with --recompile-all (recompile_all: true "
            "in the job spec)"
        )


def plan(
    prior_state: pa.Table | None,
    new_state: pa.Table,
    *,
    prior_fingerprint: str | None,
    fingerprint: str,
    recompile_all: bool = False,
    forgotten: set[str] | frozenset[str] = frozenset(),
) -> Plan:
    """Split users into compile / carry / drop for the version built from ``new_state``.

    ``prior_fingerprint`` is None on a first night (nothing published): every user compiles.
    Forgotten users are always dropped or recompiled, never carried, even when their facts
    look unchanged (e.g. forgotten and then told the same fact again the same night).
    """
    before = user_fact_digest(prior_state) if prior_state is not None else {}
    after = user_fact_digest(new_state)
    live = set(after)
    drop = sorted((set(before) | set(forgotten)) - live)
    model_changed = prior_fingerprint is not None and prior_fingerprint != fingerprint
    check_model_change(prior_fingerprint, fingerprint, recompile_all)
    if recompile_all or prior_fingerprint is None:
        why = "recompile-all requested" if recompile_all else "first version"
        if model_changed:
            why += f" (model changed from {prior_fingerprint} to {fingerprint})"
        result = Plan(sorted(live), [], drop, f"{why}: {len(live)} users compile, {len(drop)} dropped")
    else:
        compile_users = sorted(u for u in live if before.get(u) != after[u] or u in forgotten)
        carry = sorted(live - set(compile_users))
        result = Plan(
            compile_users,
            carry,
            drop,
            f"incremental: {len(compile_users)} users changed, {len(carry)} unchanged, {len(drop)} dropped",
        )
    logger.info("plan: %s", result.reason)
    return result

