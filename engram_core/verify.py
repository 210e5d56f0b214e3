"""Locality and isolation checks of compiled deltas (the invariants, checked on real forwards).

* Locality: on a probe text, every position before the first position that addresses one of
  the delta's rows has logits bit-identical to the base model (a position that sees no edited
  row, and attends only to such positions, computes exactly what the base computes). A probe
  that addresses none of the rows is bit-identical at every position.
* Isolation: in one batch, a sequence served without a user's delta is bit-identical whatever
  delta another sequence of the batch carries.

:func:`check_invariants` runs both on a sample of a night's users and returns a small
:class:`InvariantReport`, which the nightly records in stats and refuses to publish on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from .checkpoint import EngramModel
from .delta import Delta
from .serving import overlay_for

DEFAULT_PROBES = (
    "The weather today is",
    "Please remind me what",
    "My favorite color is",
    "Where do I live?",
)


@dataclass(frozen=True)
class CheckReport:
    probes: int
    positions_checked: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _padded(em: EngramModel, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [em.encode_prompt(t) for t in texts]
    T = max(len(e) for e in encoded)
    pad = em.tokenizer.pad_token_id or 0
    ids = torch.full((len(encoded), T), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, T - len(e):] = torch.as_tensor(e)
        mask[b, T - len(e):] = 1
    return ids.to(em.device), mask.to(em.device)


@torch.no_grad()
def _logits(em: EngramModel, ids, mask, deltas: Sequence[Sequence[Delta]] | None) -> torch.Tensor:
    with em.memory.use(overlay_for(em, deltas) if deltas is not None else None):
        return em.model(input_ids=ids, attention_mask=mask).logits


def check_locality(em: EngramModel, delta: Delta, probes: Sequence[str] = DEFAULT_PROBES) -> CheckReport:
    problems, checked = [], 0
    touched = {layer: set(delta.row_ids[delta.layers == layer].tolist()) for layer in set(delta.layers.tolist())}
    for text in probes:
        ids = torch.as_tensor([em.encode_prompt(text)], device=em.device)
        mask = torch.ones_like(ids)
        base = _logits(em, ids, mask, None)[0]
        edited = _logits(em, ids, mask, [[delta]])[0]
        first = ids.shape[1]
        for layer, rows in touched.items():
            addressed = em.memory.addresser.rows(ids.cpu().numpy(), layer)[0]  # (T, H)
            hit = np.isin(addressed, list(rows)).any(-1)
            if hit.any():
                first = min(first, int(np.argmax(hit)))
        checked += first
        if not torch.equal(base[:first], edited[:first]):
            bad = int((base[:first] != edited[:first]).any(-1).nonzero()[0])
            problems.append(f"probe {text!r}: position {bad} changed although it addresses no edited row")
    return CheckReport(len(probes), checked, tuple(problems))


def check_isolation(em: EngramModel, delta: Delta, probes: Sequence[str] = DEFAULT_PROBES) -> CheckReport:
    """Probes served beside a sequence carrying ``delta`` are bit-identical to probes beside none."""
    texts = list(probes) + [probes[0]]
    ids, mask = _padded(em, texts)
    others = [[] for _ in probes]
    alone = _logits(em, ids, mask, others + [[]])[: len(probes)]
    beside = _logits(em, ids, mask, others + [[delta]])[: len(probes)]
    problems = []
    for b, text in enumerate(probes):
        if not torch.equal(alone[b], beside[b]):
            problems.append(f"probe {text!r} changed when another sequence of the batch carried a delta")
    return CheckReport(len(probes), int(mask[: len(probes)].sum()), tuple(problems))


@dataclass(frozen=True)
class InvariantReport:
    """Locality and isolation of a sample of a night's deltas, checked on real forwards.

    Small enough for a stats row (:meth:`to_dict`); a nightly refuses to publish when not :attr:`ok`."""

    users_checked: int
    locality_positions: int  # probe positions checked bit-identical to the base model
    isolation_positions: int  # positions of other users' requests checked bit-identical
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"users_checked": self.users_checked, "locality_positions": self.locality_positions,
                "isolation_positions": self.isolation_positions, "ok": self.ok,
                "problems": "; ".join(self.problems[:10])}


def check_invariants(em: EngramModel, deltas: Mapping[str, Delta], *, sample: int = 8, seed: int = 0,
                     probes: Sequence[str] = DEFAULT_PROBES) -> InvariantReport:
    """Check design invariant 4 on ``sample`` users of ``deltas`` (user -> delta), drawn with ``seed``.

    * Locality (:func:`check_locality`): on every probe, each position before the first one
      that addresses one of the user's rows has the base model's logits, bit for bit.
    * Isolation: the probes served with the *next* sampled user's delta (or none, for a sample
      of one) are bit-identical whether a sequence of the same batch carries this user's delta
      or carries nothing (:func:`check_isolation_between`).

    Locality runs the sampled users' probes together (:func:`_locality_batch`, up to
    :data:`_LOCALITY_SEQUENCES` sequences a batch: two forwards per batch instead of two per user
    and probe, the same positions checked); isolation takes two forwards of ``len(probes) + 1``
    short sequences per sampled user."""
    users = sorted(u for u, d in deltas.items() if d.num_rows)
    if len(users) > sample:
        users = sorted(random.Random(seed).sample(users, sample))
    problems: list[str] = []
    isolated = 0
    local = 0
    group = max(1, _LOCALITY_SEQUENCES // max(1, len(probes)))  # users per batch: bounded logits
    for start in range(0, len(users), group):
        part = users[start:start + group]
        checked, found = _locality_batch(em, [deltas[u] for u in part], probes)
        local += checked
        problems += [f"user {part[k]!r}: {p}" for k, p in found]
    for k, user in enumerate(users):
        neighbour = deltas[users[(k + 1) % len(users)]] if len(users) > 1 else None
        report = check_isolation_between(em, deltas[user], neighbour, probes)
        isolated += report.positions_checked
        problems += [f"user {user!r}: {p}" for p in report.problems]
    return InvariantReport(len(users), local, isolated, tuple(problems))


_LOCALITY_SEQUENCES = 32
"""Sequences per locality batch: its two (sequences, positions, vocabulary) float logits stay
small (32 x 16 x 151,936 x 4 bytes = 311 MB each for a Qwen-sized vocabulary)."""


def _locality_batch(em: EngramModel, deltas: Sequence[Delta], probes: Sequence[str]) -> tuple[int, list[tuple[int, str]]]:
    """:func:`check_locality` of every delta of ``deltas`` on every probe, in one batch of
    ``len(deltas) x len(probes)`` sequences served once without deltas and once each with its own
    delta. Sequences are right-padded: a causal model's valid positions never see the padding
    after them, and their n-grams and positions are the unpadded probe's, so the positions
    checked (those before the first that addresses a row of the sequence's delta) are the ones
    :func:`check_locality` checks. Returns (positions checked, [(index into ``deltas``, problem)])."""
    if not deltas:
        return 0, []
    encoded = [em.encode_prompt(t) for t in probes]
    T = max(len(e) for e in encoded)
    pad = em.tokenizer.pad_token_id or 0
    ids = np.full((len(deltas) * len(probes), T), pad, np.int64)
    mask = np.zeros_like(ids)
    for p, e in enumerate(encoded):
        ids[p::len(probes), : len(e)] = e
        mask[p::len(probes), : len(e)] = 1
    ids_t, mask_t = torch.as_tensor(ids, device=em.device), torch.as_tensor(mask, device=em.device)
    base = _logits(em, ids_t, mask_t, None)
    edited = _logits(em, ids_t, mask_t, [[d] for d in deltas for _ in probes])
    differs = (base != edited).any(-1).cpu().numpy()  # (B, T)
    checked, problems = 0, []
    for k, delta in enumerate(deltas):
        touched = {layer: delta.row_ids[delta.layers == layer] for layer in set(delta.layers.tolist())}
        for p, (text, e) in enumerate(zip(probes, encoded)):
            first = len(e)
            for layer, rows in touched.items():
                addressed = em.memory.addresser.rows(np.asarray([e]), layer)[0]  # (T, H)
                hit = np.isin(addressed, rows).any(-1)
                if hit.any():
                    first = min(first, int(np.argmax(hit)))
            checked += first
            row = differs[k * len(probes) + p, :first]
            if row.any():
                problems.append((k, f"probe {text!r}: position {int(np.argmax(row))} changed although it addresses "
                                    "no edited row"))
    return checked, problems


def check_isolation_between(em: EngramModel, delta: Delta, other: Delta | None,
                            probes: Sequence[str] = DEFAULT_PROBES) -> CheckReport:
    """Probes served with ``other``'s delta (None: the base model) are bit-identical whether the
    last sequence of the batch carries ``delta`` or nothing."""
    texts = list(probes) + [probes[0]]
    ids, mask = _padded(em, texts)
    theirs = [[other] if other is not None else [] for _ in probes]
    alone = _logits(em, ids, mask, theirs + [[]])[: len(probes)]
    beside = _logits(em, ids, mask, theirs + [[delta]])[: len(probes)]
    problems = [f"probe {text!r} of another user changed when this user's delta was in the batch"
                for b, text in enumerate(probes) if not torch.equal(alone[b], beside[b])]
    return CheckReport(len(probes), int(mask[: len(probes)].sum()), tuple(problems))
