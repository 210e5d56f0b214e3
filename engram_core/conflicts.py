"""Conflicts between a user's written positions, and the context rows that resolve them.

A written position (the trigger's last position, or an answer position but the last) addresses
the rows of the suffix N-grams (orders 2..N) ending there. Two written positions of one user
whose last N canonical tokens are equal address exactly the same rows: the rows alone cannot
make one predict " 2019" and the other " 1979". Realistic profiles are full of these ("My
child's birth year is" / "My spouse's birth year is"; "Dr. Okafor" / "Dr. Nguyen" at the "."
after "Dr"; "in 2004 ... in 2015" inside one answer; with a character-level tokenizer most
numbers): on the tiny model's tokenizer 82% of a realistic corpus's facts hold one (N = 3).

Resolution (measured in bench/RESULTS.md, "fidelity"): for each conflicting pair, the first
token where the two histories differ is found going back, and the N positions whose N-grams
include it become *context positions* of the fact: their rows are trained too (no target of
their own), so the information that tells the two facts apart reaches the conflicting position
through the model (the Engram gate and attention), which the joint optimisation exploits.
Context rows are ordinary rows of the user's delta: locality holds as for every written row
(nothing changes before the first position that addresses one), and isolation is untouched.

A pair whose token histories are identical all the way back (same canonical trigger, answers
that share a prefix and then differ, or differ at once) cannot be told apart by any row: one is
reported ``CONFLICTS_WITH:<fact_id of the other>`` and not compiled, the other compiles as usual.
Which one is kept is the first in ``fact_order`` (the compiler orders the later written first,
then by fact_id: a fact entered again under a new fact_id replaces the old one's answer).

Vectorised over a whole batch (NumPy): the windows of every written position are sorted once;
only the few runs that hold different targets go through Python.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

STATUS_CONFLICTS_WITH = "CONFLICTS_WITH"


def conflict_status(other_fact_id: str) -> str:
    """The status of a fact that no row can tell from ``other_fact_id`` (same user)."""
    return f"{STATUS_CONFLICTS_WITH}:{other_fact_id}"


@dataclass(frozen=True)
class ContextPlan:
    context: dict[int, tuple[int, ...]]
    """sequence index -> positions (into its input ids) whose rows are trained as context."""
    impossible: dict[int, int]
    """sequence index -> index of the earlier sequence it cannot be told apart from."""
    conflicting_positions: int
    """Written positions that share their N-gram window with another of the user's written
    positions that predicts another token."""
    conflicting_sequences: frozenset = frozenset()
    """Indices of the sequences that hold such a position (both sides of every conflict)."""


def plan_context(sequences: list[list[int]], targets: list[list[int]], users: np.ndarray,
                 canonical_ids: np.ndarray, order: int, pad_id: int,
                 fact_order: list | None = None) -> ContextPlan:
    """Find conflicting written positions and the context positions that resolve them.

    ``sequences[i]``: input ids (trigger + answer[:-1]); ``targets[i]``: the answer's ids (the
    last ``len(targets[i])`` positions of the sequence are written); ``users`` (B,): an owner
    slot per sequence (conflicts are within one owner); ``canonical_ids``: the addresser's
    token -> canonical id map; ``order``: the highest N-gram order (``EngramConfig.max_ngram``);
    ``fact_order[i]``: a sort key per sequence (comparable across sequences; the compiler's is
    (no time, -written_at, fact_id)) that decides which of an impossible pair is kept (the
    smaller); None: sequence order.
    """
    B = len(sequences)
    if B == 0:
        return ContextPlan({}, {}, 0, frozenset())
    lengths = np.fromiter((len(s) for s in sequences), np.int64, B)
    n_targets = np.fromiter((len(t) for t in targets), np.int64, B)
    T = int(lengths.max()) + order  # left pad of at least `order` so every window is inside
    canon = np.full((B, T), pad_id, np.int64)
    raw = np.full((B, T), -1, np.int64)
    row = np.repeat(np.arange(B), lengths)
    col = T - np.repeat(lengths, lengths) + (np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths))
    flat = np.fromiter(itertools.chain.from_iterable(sequences), np.int64, int(lengths.sum()))
    raw[row, col] = flat
    canon[row, col] = canonical_ids[flat]
    # Written positions: the last n_targets of each sequence.
    w_seq = np.repeat(np.arange(B), n_targets)
    w_within = np.arange(int(n_targets.sum())) - np.repeat(np.cumsum(n_targets) - n_targets, n_targets)
    w_col = T - np.repeat(n_targets, n_targets) + w_within
    w_target = np.fromiter(itertools.chain.from_iterable(targets), np.int64, len(w_seq))
    windows = np.stack([canon[w_seq, w_col - k] for k in range(order)], axis=1)  # (n, order)
    keys = np.column_stack([np.asarray(users, np.int64)[w_seq], windows])
    sort = np.lexsort(keys.T[::-1])
    keys, targets_sorted = keys[sort], w_target[sort]
    same = np.all(keys[1:] == keys[:-1], axis=1)
    starts = np.flatnonzero(np.r_[True, ~same])
    ends = np.r_[starts[1:], len(keys)]
    context: dict[int, set[int]] = {}
    impossible: dict[int, int] = {}
    conflicting = 0
    runs = []  # written positions sharing one window with other targets
    for a, b in zip(starts, ends):
        if b - a < 2 or np.all(targets_sorted[a:b] == targets_sorted[a]):
            continue
        members = sort[a:b]
        conflicting += len(members)
        runs.append(members)
        for i in range(len(members)):
            for j in range(i + 1, len(members)):
                p, q = members[i], members[j]
                if w_target[p] == w_target[q]:
                    continue
                _resolve(canon, raw, w_seq[p], w_col[p], w_seq[q], w_col[q], T - lengths, order,
                         context, impossible, fact_order)
    _same_trigger(sequences, targets, users, lengths, n_targets, impossible, fact_order)
    # Context positions as indices into each sequence's input ids (drop the impossible ones).
    out = {}
    for s, cols in context.items():
        if s in impossible:
            continue
        offset = T - int(lengths[s])
        out[s] = tuple(sorted(c - offset for c in cols))
    # In conflict: the sequences of a run that still holds other targets once the impossible
    # ones are dropped (the kept fact of an impossible pair has nothing left to tell apart).
    in_conflict: set[int] = set()
    for members in runs:
        live = [m for m in members if int(w_seq[m]) not in impossible]
        if len({int(w_target[m]) for m in live}) > 1:
            in_conflict.update(int(w_seq[m]) for m in live)
    return ContextPlan(out, impossible, conflicting, frozenset(in_conflict))


def _resolve(canon, raw, s1, c1, s2, c2, first_col, order, context, impossible, fact_order) -> None:
    """Add the context columns that tell (s1 at c1) from (s2 at c2) apart, or record the pair impossible."""
    k = order
    while True:
        a, b = c1 - k, c2 - k
        a_in, b_in = a >= first_col[s1], b >= first_col[s2]
        if not a_in and not b_in:  # both histories exhausted together: same tokens throughout
            if np.array_equal(raw[s1, c1 - k + 1:c1 + 1], raw[s2, c2 - k + 1:c2 + 1]):
                keep, drop = (s1, s2) if _before(s1, s2, fact_order) else (s2, s1)
                if s1 != s2:
                    impossible.setdefault(drop, keep)
            return  # (or equal canonically but other tokens: no row can tell them apart either)
        pad = canon[s1, 0]  # the left pad column holds the pad id
        if (canon[s1, a] if a_in else pad) != (canon[s2, b] if b_in else pad):
            break
        k += 1
    for s, c in ((s1, c1), (s2, c2)):
        low = max(int(first_col[s]), c - k)
        high = min(c - 1, c - k + order - 1)
        context.setdefault(int(s), set()).update(range(low, high + 1))


def _same_trigger(sequences, targets, users, lengths, n_targets, impossible: dict[int, int], fact_order) -> None:
    """Facts of one owner with the very same trigger ids and other answers are impossible pairs
    even where no written position shares a window with another target: an answer that is a
    prefix of the other (" Tejo" / " Tejo Segundo") writes the same first tokens, and the
    longer one's next token (the shorter has no trained end) is served after both. The one
    ``fact_order`` puts first (the later written) is kept; the others name it."""
    groups: dict[tuple, list[int]] = {}
    for i in range(len(sequences)):
        trigger = tuple(sequences[i][: int(lengths[i] - n_targets[i] + 1)])
        groups.setdefault((int(users[i]), trigger), []).append(i)
    for members in groups.values():
        if len(members) < 2 or len({tuple(targets[i]) for i in members}) < 2:
            continue
        keep = members[0]
        for i in members[1:]:
            if _before(i, keep, fact_order):
                keep = i
        for i in members:
            if tuple(targets[i]) != tuple(targets[keep]):
                impossible[i] = keep  # (a window conflict may have named another of the group)
            elif impossible.get(i) in members:  # the kept answer, dropped for a dropped one of the group
                del impossible[i]


def trigger_cuts(triggers: list[list[int]], owners: list, window: int, lead: int) -> list[int]:
    """How many head tokens of each trigger the compiler leaves out (``CompileOptions.trigger_window``).

    ``triggers[i]``: a trigger's prompt ids (``lead`` leading special tokens, then its text);
    ``owners[i]``: its user (triggers are compared within one owner). A trigger of more than
    ``window`` tokens keeps its ``lead`` special tokens and its last ``window - lead`` tokens, and
    so drops ``len - window`` (0 for others). But where two of an owner's triggers differ and
    what they keep is the same (two long notes that end alike and differ in their first words:
    "For the house in Leeds: ... the garage code is" / "For the flat in Porto: ... the garage code
    is"), both are kept whole: with the same kept tokens the pair would be one trigger with two
    answers, one of them never compiled (``CONFLICTS_WITH``); whole, the conflict plan trains the
    rows that tell them apart and each is verified on the text a user types (a tail cut just
    after the first token that differs was verified and still served the other's answer after
    the whole trigger on the tiny model: the head before the cut changes what attention reads).
    Returns one count per trigger. Raises ValueError when ``window`` is not more than ``lead``."""
    cuts = [max(0, len(t) - window) for t in triggers]
    if not any(cuts):
        return cuts
    if window <= lead:
        raise ValueError(f"CompileOptions.trigger_window must be more than the prompt's {lead} leading special "
                         f"token(s), got {window}")
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(triggers):
        groups.setdefault((owners[i], tuple(t[lead + cuts[i]:])), []).append(i)
    for members in groups.values():
        if len(members) > 1 and len({tuple(triggers[i]) for i in members}) > 1:
            for i in members:
                cuts[i] = 0
    return cuts


def _before(s1: int, s2: int, fact_order: list | None) -> bool:
    if fact_order is None:
        return s1 < s2
    return (fact_order[s1], s1) < (fact_order[s2], s2)
