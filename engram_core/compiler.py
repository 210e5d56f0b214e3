"""The fact compiler: users' facts -> per-user sparse row deltas, verified.

For each user, the rows a fact writes are the write-layer rows addressed at the trigger's last
position and at every answer position but the last (teacher forcing: each of those positions
predicts the next answer token). All of one user's facts are optimised jointly over the union
of their rows; many users are batched into one forward/backward (their rows are disjoint
parameters, so the batch is exactly many independent problems).

Per batch:
  1. UNEMBED_P start: each written position's rows start at ``pinv(W_V) @ (scale * u_y/|u_y|)``
     (u_y: output embedding of the token to predict), averaged where positions share a row.
  2. Adam on the rows to maximise log p(answer | trigger), ``steps`` times.
     Sequences are left-padded so that every position that can see a written row lies in a
     common suffix; the prefix's KV cache is computed once per batch and reused every step
     (sequences whose trigger addresses a user row earlier form a second group that
     recomputes from there: ``prefix_groups``). The suffix's hidden states entering the write
     layer are also computed once, so a step runs only the layers from the write layer up
     (``reuse_lower_layers``), attending to the cached prefix in place
     (``prefix_attention``), with the LM head at answer positions only.
  3. Values are rounded to float16 (the stored form) and verified with them: every answer
     token must be the greedy argmax at its position, with a margin. Users with a failing fact
     get more rounds (``retry_steps``, each at half the previous learning rate) up to
     ``max_rounds``; a fact that still fails is reported
     with its loss and reason, never passed off as compiled.

Base deltas (``compile_facts(..., base_deltas={user: delta})``): a user's facts may be compiled
on top of a fixed delta that serving composes with theirs (a shared scope such as
``org:acme``: ``overlay_for(em, [[scope_delta, user_delta]])``). The fixed rows ride in a
second owner slot of the same :class:`Overlay` (owners (B, 2): trainable slot, fixed slot);
their keys follow every trainable key (slots ``U + u``), so the values tensor is
``cat([trainable, fixed])`` and gradients reach only the trainable part. The prefix KV cache is
computed with the fixed rows in place, and verification sees exactly the served composition.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
import time
import weakref
from dataclasses import dataclass, field, replace
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from . import addressing, fast_step, prefix_attention
from .checkpoint import EngramModel
from .conflicts import STATUS_CONFLICTS_WITH, conflict_status, plan_context, trigger_cuts  # noqa: F401 (the status is API)
from .delta import Delta
from .fused_ops import fused_ops
from .hf_compat import cache_kwargs, output_cache
from .text import canonical_fact
from .layer import Overlay, backbone_and_layers
from .options import (  # noqa: F401 - re-exported: the compiler's API
    STATUS_LOW_MARGIN,
    STATUS_NOT_RECALLED,
    STATUS_OK,
    CompileOptions,
    Fact,
    FactResult,
    status_counts,
)
from .tokenize_pool import (  # noqa: F401 (the statuses are part of this module's API)
    STATUS_ANSWER_TOO_LONG,
    STATUS_EMPTY_ANSWER,
    STATUS_EMPTY_TRIGGER,
    STATUS_SPECIAL_TOKEN_TEXT,
    STATUS_TRIGGER_TOO_LONG,
    TokenizePool,
    TokenizePoolError,
    discard_pool,
    encode_pairs,
    shared_pool,
)

log = logging.getLogger(__name__)

@dataclass
class CompileResult:
    deltas: dict[str, Delta]
    facts: list[FactResult]
    num_facts_per_user: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase, summed over batches: tokenize (waiting for the next batch's tokens,
    which are prepared on a thread while the previous batch compiles), prepare (rows, prefix
    caches), optimize, verify, assemble (results and deltas)."""

    @property
    def ok(self) -> int:
        return sum(r.status == STATUS_OK for r in self.facts)

    @property
    def failed(self) -> int:
        """Facts not ``ok``: refused, not recalled, conflicting, and ``low_margin`` (see :attr:`low_margin`)."""
        return len(self.facts) - self.ok

    @property
    def low_margin(self) -> int:
        """Facts greedy decoding recalls with a margin under ``min_margin`` (counted apart, inside :attr:`failed`)."""
        return sum(r.status == STATUS_LOW_MARGIN for r in self.facts)

    def status_counts(self) -> dict[str, int]:
        """Facts per status (``ok``, ``low_margin``, ``not_recalled``, ``answer_too_long``,
        ``CONFLICTS_WITH:<fact_id>`` counted under ``CONFLICTS_WITH``, ...), for a night's report."""
        return status_counts(self.facts)


@dataclass(slots=True)
class _Seq:
    user: int  # slot of the user within the batch
    fact: Fact
    input_ids: list[int]  # trigger + answer[:-1]
    targets: list[int]  # answer tokens
    context: tuple[int, ...] = ()  # positions (into input_ids) whose rows are trained as context
    constraint: bool = False  # a fixed fact (recalled by the base delta): its loss counts, its rows are not trained
    text_offset: int = -1  # index in input_ids of the fact's own text's first token; -1: the model's prompt_lead
    in_conflict: bool = False  # shares a written N-gram window with another of its user's facts (conflicts.plan_context)
    cut: int = 0  # tokens of a long trigger's head not compiled (CompileOptions.trigger_window)

    @property
    def copy(self) -> bool:
        """A context copy (_add_context_copies: the only sequences with a text offset of their own):
        trained and verified, not reported."""
        return self.text_offset >= 0


def _fork_cache(cache):
    """A cheap copy of a KV cache that later updates do not write through.

    ``DynamicCache.update`` grows a layer by concatenation (a new tensor), so copying the
    containers (not the tensors) is enough to keep the prefix pristine for the next step.
    """
    fork = copy.copy(cache)
    if hasattr(cache, "layers"):
        fork.layers = [copy.copy(layer) for layer in cache.layers]
    else:  # older transformers: parallel lists of tensors
        fork.key_cache = list(cache.key_cache)
        fork.value_cache = list(cache.value_cache)
    return fork


def _validate(em: EngramModel, facts: Sequence[Fact], options: CompileOptions) -> list[tuple[_Seq | None, FactResult | None]]:
    """Tokenize all facts (one batched call, or chunks in worker processes); reject the ones the
    compiler cannot take."""
    triggers, answers = [f.trigger for f in facts], [f.answer for f in facts]
    limits = (options.max_trigger_tokens, options.max_answer_tokens)
    encoded = None
    pool = _tokenize_pool(em, len(facts), options)
    if pool is not None:
        try:
            encoded = pool.encode_pairs(triggers, answers, *limits)
        except TokenizePoolError as e:
            log.warning("compiler: tokenizing in this process instead: %s", e)
            discard_pool(pool)
    if encoded is None:
        encoded = encode_pairs(em.encode_texts, triggers, answers, *limits)
    specials = _special_pattern(em.tokenizer)
    if specials is not None:
        encoded = [_special_text_status(t, a, specials) or pair for t, a, pair in zip(triggers, answers, encoded)]
    nan = float("nan")
    lead = em.prompt_lead
    ok = [k for k, (first, _) in enumerate(encoded) if not isinstance(first, str)]
    cuts: dict[int, int] = {}
    window = options.trigger_window
    if any(len(encoded[k][0]) - len(encoded[k][1]) + 1 > window for k in ok):  # else nothing is cut (most batches)
        cuts = dict(zip(ok, trigger_cuts([encoded[k][0][:len(encoded[k][0]) - len(encoded[k][1]) + 1] for k in ok],
                                         [facts[k].user_id for k in ok], window, lead)))
    return [(None, FactResult(fact.user_id, fact.fact_id, first, nan, 0, 0, nan, second)) if isinstance(first, str)
            else (_windowed_seq(fact, first, second, cuts.get(k, 0), lead), None)
            for k, (fact, (first, second)) in enumerate(zip(facts, encoded))]


def _windowed_seq(fact: Fact, input_ids: list[int], targets: list[int], cut: int, lead: int) -> _Seq:
    """The fact's sequence: a trigger of more than :attr:`CompileOptions.trigger_window` tokens
    keeps its ``lead`` special tokens and all but ``cut`` tokens of its head
    (:func:`engram_core.conflicts.trigger_cuts`); :attr:`_Seq.cut` is how many were dropped (0
    for most triggers)."""
    if not cut:
        return _Seq(-1, fact, input_ids, targets)
    return _Seq(-1, fact, input_ids[:lead] + input_ids[lead + cut:], targets, cut=cut)


_POOL_MIN_FACTS = 8192  # automatic worker processes from this many facts per batch


def _special_pattern(tokenizer) -> "re.Pattern | None":
    """One pattern matching any text the tokenizer reads as a special token (``<|endoftext|>``,
    ``<eos>``, ...), or None if it has none: one search per text, not one per special token."""
    texts = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts.update(t.content for t in decoder.values() if getattr(t, "special", False))
    texts = sorted((t for t in texts if t and t.strip()), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def _special_text_status(trigger: str | None, answer: str | None, pattern: "re.Pattern") -> tuple[str, str] | None:
    """``(special_token_text, detail)`` when a fact's text holds a special token's text: the
    tokenizer would read it as that token (an end of text, a turn marker), so the fact would be
    "recalled" as an answer cut short or a turn ended, not as the text the user wrote."""
    for name, text in (("trigger", trigger), ("answer", answer)):
        found = pattern.search(text) if text else None
        if found is not None:
            return (STATUS_SPECIAL_TOKEN_TEXT, f"{name} contains {found.group()!r}, which the tokenizer reads as a "
                                               "special token; remove it from the fact's text")
    return None


def _plan_conflicts(em: EngramModel, by_user: dict[str, list[_Seq]]) -> list[FactResult]:
    """Give each fact whose written positions share an N-gram window with another of its user's
    written positions (with another target) the context positions that tell them apart
    (:mod:`engram_core.conflicts`); drop, with a ``CONFLICTS_WITH:<fact_id>`` result, the facts
    that no row can tell from another (identical token histories). Edits ``by_user`` in place."""
    users = list(by_user)
    seqs = [s for u in users for s in by_user[u]]
    slots = np.repeat(np.arange(len(users)), [len(by_user[u]) for u in users])
    addresser = em.memory.addresser
    # which of two facts no row can tell apart is compiled: the later written, then fact_id order
    order = [(s.fact.written_at is None, -(s.fact.written_at or 0), s.fact.fact_id) for s in seqs]
    plan = plan_context([s.input_ids for s in seqs], [s.targets for s in seqs], slots, addresser.canonical_ids,
                        em.config.max_ngram, addresser.pad_id, order)
    for i, positions in plan.context.items():
        if not seqs[i].constraint:  # a fixed fact's rows belong to its base delta: not trained here
            seqs[i].context = positions
    for i in plan.conflicting_sequences:
        seqs[i].in_conflict = True
    impossible = {i: j for i, j in plan.impossible.items() if not seqs[i].constraint}
    if not impossible:
        return []
    nan = float("nan")
    results = []
    for i, j in sorted(impossible.items()):  # the detail quotes no answer: it is kept in the stats (facts.detail)
        fact, other = seqs[i].fact, seqs[j].fact
        results.append(FactResult(fact.user_id, fact.fact_id, conflict_status(other.fact_id), nan, 0, 0, nan,
                                  f"same canonical trigger as fact {other.fact_id!r} of this user but another answer: "
                                  "no row can tell them apart; "
                                  f"{other.fact_id!r}{_later(other, fact)} is compiled"))
    dropped = {id(seqs[i]) for i in impossible}
    for u in users:
        by_user[u] = [s for s in by_user[u] if id(s) not in dropped]
    return results


DEFAULT_CONTEXT_MESSAGE = "Hello."
"""The user message of the conversation whose assistant turn the context copies continue."""
FALLBACK_CONTEXT_TEXT = "Here is what I remember:\n"
"""The context copies' text for a tokenizer without a chat template."""


def context_text(em: EngramModel, options: CompileOptions) -> str:
    """The text the context copies put before a trigger (:attr:`CompileOptions.context_text`):
    as given, else the checkpoint's chat template rendered for an assistant prefill after one
    user message (:data:`DEFAULT_CONTEXT_MESSAGE`; the README's way of getting recall in a
    chat), else :data:`FALLBACK_CONTEXT_TEXT`. Raises ValueError for a blank or non-str
    ``context_text``."""
    return _context(em, options)[0]


def _context(em: EngramModel, options: CompileOptions) -> tuple[str, bool]:
    """(:func:`context_text`, whether it is a rendered chat: encoded as the server encodes a
    chat, with no special tokens added, else as a prompt)."""
    if options.context_text is not None:
        if not isinstance(options.context_text, str) or not options.context_text.strip():
            raise ValueError(f"CompileOptions.context_text must be a non-empty string or None, got {options.context_text!r}")
        return options.context_text, False
    tokenizer = em.tokenizer
    if getattr(tokenizer, "chat_template", None):
        marker = "\u2063engram\u2063"  # content found once in the rendering: the prefill ends before it
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": DEFAULT_CONTEXT_MESSAGE}, {"role": "assistant", "content": marker}],
                tokenize=False, continue_final_message=True)
        except Exception as err:  # a template that refuses this conversation: the plain text instead
            log.warning("compiler: the chat template cannot render an assistant prefill (%s); context copies use %r",
                        err, FALLBACK_CONTEXT_TEXT)
        else:
            if isinstance(rendered, str) and rendered.count(marker) == 1:
                return rendered[:rendered.index(marker)], True
            log.warning("compiler: the chat template does not render an assistant prefill that ends where its content "
                        "starts; context copies use %r (set compile.context_text to choose the text)",
                        FALLBACK_CONTEXT_TEXT)
    return FALLBACK_CONTEXT_TEXT, False


def _add_context_copies(em: EngramModel, by_user: dict[str, list[_Seq]], context: tuple[str, bool]) -> None:
    """Give every sequence in conflict (:attr:`_Seq.in_conflict`: its written N-gram window is
    another of its user's facts' with another answer, a shared scope's fixed facts included) a
    copy after ``context`` (:func:`_context`), trained with it (CompileOptions.context_copies).

    Such a fact is told from its neighbour by context rows (:mod:`engram_core.conflicts`) whose
    signal reaches the answer through attention; a chat's longer history dilutes it. Measured on
    the realistic corpus (tiny model, 50 users, bench/RESULTS.md, 2026-12-01 fourth session):
    after an assistant prefill 94.4% of natural prompts came back without copies, 98.4% with
    them (a user message other than the copies' own), 100% at the start of a sequence either
    way; the copies cost what their sequences cost (compile 26.4 s -> 45.6 s).

    The copy's trigger is tokenized together with the context, as the server tokenizes a
    rendered chat (no special tokens added; a plain text as a prompt): the space that ends a
    chat's prefill joins the trigger's first word in most BPE vocabularies. Its own text is the
    last as many tokens as the trigger's text has, which must be the trigger's (the first one up
    to its canonical form). A trigger that tokenizes otherwise after the context, or a one-token
    trigger (no row of its own text to train there), gets no copy."""
    text, chat = context
    lead = em.prompt_lead
    canonical = em.memory.addresser.canonical_ids
    # A long trigger compiled from its window (CompileOptions.trigger_window) gets none: its own head is
    # the text it is trained after, and a copy would be as long as the whole trigger.
    todo = [s for seqs in by_user.values() for s in seqs if s.in_conflict and not s.cut]
    if not todo:
        return
    # Same canonical text as _validate tokenized (engram_core.tokenize_pool.encode_pairs).
    joint = em.encode_texts([text + canonical_fact(s.fact.trigger, s.fact.answer)[0] for s in todo],
                            add_special_tokens=not chat)
    copies: dict[int, _Seq] = {}
    for s, ids in zip(todo, joint):
        trigger = s.input_ids[:len(s.input_ids) - len(s.targets) + 1]
        own = len(trigger) - lead
        if own < 2 or len(ids) <= own or ids[len(ids) - own + 1:] != trigger[lead + 1:] \
                or canonical[ids[len(ids) - own]] != canonical[trigger[lead]]:
            continue
        shift = len(ids) - len(trigger)  # tokens of context (and specials) more than the original has
        copies[id(s)] = _Seq(s.user, s.fact, list(ids) + s.input_ids[len(trigger):], s.targets,
                             tuple(c + shift for c in s.context), s.constraint, text_offset=len(ids) - own)
    for seqs in by_user.values():
        seqs.extend(copies[id(s)] for s in list(seqs) if id(s) in copies)


def _later(kept: Fact, dropped: Fact) -> str:
    if kept.written_at is not None and dropped.written_at is not None and kept.written_at > dropped.written_at:
        return ", written later,"
    return ""


def start_tokenize_pool(em: EngramModel, options: CompileOptions) -> bool:
    """Start the tokenize worker processes a compile of ``options.facts_per_batch`` facts per batch
    would use (shared per process, so the next compile finds them running); returns whether there
    are any (none on a CPU, for small batches, or with ``tokenize_workers: 0``)."""
    return _tokenize_pool(em, options.facts_per_batch, options) is not None


def _tokenize_pool(em: EngramModel, num_facts: int, options: CompileOptions) -> TokenizePool | None:
    workers = options.tokenize_workers
    if workers == 0 or (workers < 0 and (em.device.type != "cuda" or num_facts < _POOL_MIN_FACTS)):
        return None
    backend = em.plain_backend()
    if backend is None:
        return None  # a slow tokenizer, or one with truncation or padding: in this process
    if workers < 0:
        workers = max(1, min(8, (os.cpu_count() or 1) // 2))
    try:
        return shared_pool(backend.to_str(), workers)
    except OSError as e:
        log.warning("compiler: could not start tokenize workers (%s); tokenizing in this process", e)
        return None


def _distinct(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique, which is ~25x slower on 10^5 int64 in NumPy 2.4)."""
    a = np.sort(a, axis=None)
    return a[np.r_[True, a[1:] != a[:-1]]] if a.size else a


def _runs(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a sorted array and the index where each run starts."""
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]]) if sorted_values.size else sorted_values
    return sorted_values[starts], starts


def _prefix_buckets(prefixes: np.ndarray, width: int, max_groups: int) -> list[tuple[int, np.ndarray]]:
    """Split sequences into at most ``max_groups`` groups of contiguous prefix lengths, each
    group computing from its shortest prefix, so that the positions computed per step,
    sum(size x (width - prefix)), are fewest (dynamic programming over the distinct lengths)."""
    counts = np.bincount(prefixes, minlength=width + 1)
    lengths = np.flatnonzero(counts)  # few distinct values (<= width)
    counts = counts[lengths]
    m = len(lengths)
    suffix = (width - lengths).astype(np.int64)
    total = np.concatenate([[0], np.cumsum(counts)])
    inf = np.iinfo(np.int64).max
    # best[k][i]: least cost of the first i lengths in k groups; cut[k][i]: where its last group starts
    best = np.full((max_groups + 1, m + 1), inf, np.int64)
    cut = np.zeros((max_groups + 1, m + 1), np.int64)
    best[0][0] = 0
    for k in range(1, max_groups + 1):
        for i in range(1, m + 1):
            for j in range(i):  # last group: lengths j..i-1, computed from lengths[j]
                if best[k - 1][j] == inf:
                    continue
                cost = best[k - 1][j] + (total[i] - total[j]) * suffix[j]
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    k = int(np.argmin(best[:, m]))
    bounds, i = [], m
    while i > 0:
        j = int(cut[k][i])
        bounds.append((j, i))
        i, k = j, k - 1
    out = []
    for j, i in reversed(bounds):
        members = (prefixes >= lengths[j]) & (prefixes <= lengths[i - 1])
        out.append((int(lengths[j]), members))
    return out[::-1]  # the longest prefix (the usual group) first


def _left_padded_index(lengths, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every element of sequences of ``lengths`` right-aligned in ``width``
    columns, in sequence order."""
    lengths = np.asarray(lengths, np.int64)
    row = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    within = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
    return row, width - np.repeat(lengths, lengths) + within


@contextmanager
def _model_ops(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """:func:`engram_core.fused_ops.fused_ops` on ``model`` (nothing if not ``enabled``), holding
    :data:`fast_step.COMPILED_CALLS` while the model is patched: the patch replaces the model's
    RMSNorm forwards and its family's rotary function for every thread, and a step running on
    the step thread meanwhile (eager, or compiled: traced or guarded on the patched modules)
    would run other ops, or recompile, depending on timing."""
    if not enabled:
        yield
        return
    with fast_step.COMPILED_CALLS, fused_ops(model):
        yield


def _form_tolerance(dtype: torch.dtype) -> float:
    """Largest relative difference a step form may have from the full forward (and the compiled
    step from the uncompiled one): float32 1e-3; bf16/fp16 5e-2 (their rounding is ~1e-2 an op)."""
    return 1e-3 if dtype == torch.float32 else 5e-2


class _Batch:
    """A left-padded batch of whole users' facts and its trainable rows."""

    def __init__(self, em: EngramModel, seqs: list[_Seq], num_users: int, base: dict[int, Delta] | None = None,
                 reuse_lower: bool = False, prefix_attention: bool = False, prefix_groups: int = 2,
                 step: "fast_step.UpperStep | None" = None, fused_ops: bool = False, dedupe: bool = False,
                 lower_forward: "fast_step.LowerForward | None" = None):
        self.em, self.seqs = em, seqs
        self.dedupe = dedupe  # each distinct prefix computed once (CompileOptions.dedupe_prefixes)
        self.fused_ops = fused_ops  # transformers' forwards with leaner ops (:mod:`engram_core.fused_ops`)
        self.prefix_attention = prefix_attention
        if _LOWER_REUSE_OK.get(em.model, {}).get(("plain", str(em.lm_head.weight.dtype))) is False:
            step = None  # checked before for this model, and it differed: prepare nothing for it
        self.step = step  # the plain step, if this model may use it (``plain_step``)
        if step is None or _LOWER_REUSE_OK.get(em.model, {}).get(("lower", str(em.lm_head.weight.dtype))) is False:
            lower_forward = None
        self.lower_forward = lower_forward  # the prefix and lower forwards as plain code (fast_step.LowerForward)
        self.plain = False  # whether the steps run it (decided by check_lower_reuse)
        layer = em.config.target_layer
        self.layer = layer
        self.num_rows = em.memory.num_rows(layer)
        device = em.device
        B = len(seqs)
        lengths = np.fromiter((len(s.input_ids) for s in seqs), np.int64, B)
        T = int(lengths.max())
        pad = em.tokenizer.pad_token_id or 0
        ids = np.full((B, T), pad, np.int64)
        valid = np.zeros((B, T), bool)
        row, col = _left_padded_index(lengths, T)
        ids[row, col] = np.fromiter(itertools.chain.from_iterable(s.input_ids for s in seqs), np.int64, len(row))
        valid[row, col] = True
        em.memory.addresser.check_range(int(ids.min()), int(ids.max()))  # here, not a sync on the device
        ids_t = torch.as_tensor(ids, device=device)
        valid_t = torch.as_tensor(valid, device=device)
        rows_t = em.memory.addresser.rows_torch(ids_t, layer, valid_t, check=False)  # (B, T, H), on the device
        # Written positions: the last len(answer) positions of each sequence, in sequence order
        # (so the positions of sequence i are the contiguous run written_start[i]:...+len).
        answer_lengths = np.fromiter((len(s.targets) for s in seqs), np.int64, B)
        self.w_seq, self.w_pos = _left_padded_index(answer_lengths, T)
        self.written_start = np.cumsum(answer_lengths) - answer_lengths
        self.num_written = int(answer_lengths.sum())
        self.num_users = num_users
        self.seq_user = np.fromiter((s.user for s in seqs), np.int64, B)
        seq_user = torch.as_tensor(self.seq_user, device=device)
        w_seq = torch.as_tensor(self.w_seq, device=device)
        w_pos = torch.as_tensor(self.w_pos, device=device)
        # Keys slot * num_rows + row, unique and sorted: slots ascend, rows sorted within a slot.
        self.w_rows_t = rows_t[w_seq, w_pos]  # (n, H): the rows each written position addresses
        # Positions of constraint sequences (fixed facts) are checked, not written.
        self.w_train = ~np.fromiter((s.constraint for s in seqs), bool, B)[self.w_seq]
        self.w_train_t = torch.as_tensor(self.w_train, device=device)
        # Only rows of N-grams inside the fact's own text are trained (addressing.own_text_heads): what comes
        # before a trigger when it is served (a chat, a sentence) is not known here.
        lead = em.prompt_lead
        text_start = T - lengths + np.fromiter((lead if s.text_offset < 0 else s.text_offset for s in seqs), np.int64, B)
        orders = addressing.head_orders(em.config)  # (H,)
        copy = np.fromiter((s.copy for s in seqs), bool, B)  # a context copy: no rows outside its text
        self.w_inside = addressing.own_text_heads(self.w_pos - text_start[self.w_seq], orders, ~copy[self.w_seq])  # (n, H)
        self.w_inside_t = torch.as_tensor(self.w_inside, device=device)
        written_keys = (seq_user[w_seq, None] * self.num_rows + self.w_rows_t)[self.w_train_t[:, None] & self.w_inside_t]
        # Context positions (engram_core.conflicts): rows trained without a target of their own.
        context_lengths = np.fromiter((len(s.context) for s in seqs), np.int64, B)
        self.c_seq = np.repeat(np.arange(B), context_lengths)
        self.c_pos = (T - np.repeat(lengths, context_lengths)
                      + np.fromiter(itertools.chain.from_iterable(s.context for s in seqs), np.int64, len(self.c_seq)))
        self.c_inside = addressing.own_text_heads(self.c_pos - text_start[self.c_seq], orders)  # (m, H)
        if len(self.c_seq):
            c_seq_t = torch.as_tensor(self.c_seq, device=device)
            self.c_rows_t = rows_t[c_seq_t, torch.as_tensor(self.c_pos, device=device)]  # (m, H)
            context_keys = (seq_user[c_seq_t, None] * self.num_rows + self.c_rows_t)[torch.as_tensor(self.c_inside, device=device)]
            written_keys = torch.cat([written_keys, context_keys])
        keys_t = torch.unique(written_keys)
        # First position of each sequence that can see one of its user's rows: all before it are
        # independent of the rows and go into the shared prefix cache.
        addressed = seq_user[:, None, None] * self.num_rows + rows_t  # (B, T, H)
        found = keys_t[torch.searchsorted(keys_t, addressed).clamp_max(keys_t.numel() - 1)]  # keys are sorted
        seen = (found == addressed).any(-1) & valid_t  # (B, T)
        first_live_t = torch.where(seen.any(1), seen.float().argmax(1), T)  # (B,)
        # To the host: the keys, the first live positions and the written positions' rows (not
        # every position's: on a GPU that copy was ~140 MB per 65,536 facts).
        keys, first_live, self.w_rows = (t.cpu().numpy() for t in (keys_t, first_live_t, self.w_rows_t))
        self.c_rows = self.c_rows_t.cpu().numpy() if len(self.c_seq) else np.zeros((0, self.w_rows.shape[1]), np.int64)
        slots, starts = _runs(keys // self.num_rows)
        self.user_rows = {int(u): part - int(u) * self.num_rows
                          for u, part in zip(slots, np.split(keys, starts[1:]))}
        self.T = T
        self.rows_t = rows_t
        self.ids = ids_t
        self.mask = valid_t.long()
        self.positions = (self.mask.cumsum(-1) - 1).clamp_min(0)
        self.keys = keys_t
        self.key_user = keys_t // self.num_rows  # (K,) each trainable row's user
        self.owners = seq_user.view(-1, 1)  # (B, 1): each sequence's one owner, its user
        self.fixed = _FixedRows(em, base, num_users, [s.user for s in seqs]) if base else None
        if self.fixed is not None:
            self.owners = torch.cat([self.owners, self.fixed.owners], dim=1)  # (B, 2)
        self.targets = torch.as_tensor(
            np.fromiter(itertools.chain.from_iterable(s.targets for s in seqs), np.int64, self.num_written), device=device)
        self.engram_rows = {}  # Engram layer -> (B, T, H) rows of every position (the plain lower forward's)
        if self.lower_forward is not None and reuse_lower:
            self.engram_rows = {index: rows_t if index == layer else
                                em.memory.addresser.rows_torch(ids_t, index, valid_t, check=False)
                                for index in em.config.layers}
        # Sequences whose earlier positions address none of their user's rows (the usual case)
        # share one split: their prefix KV cache is computed once. The few whose trigger hits a
        # user row earlier (a hash collision, ~5% at 20 facts per user) go into a few more groups
        # by how early (each recomputes its positions from its own prefix every step), so one of
        # them cannot force the whole batch to recompute its triggers every step.
        # Each sequence's own split (its first written position): a batch that holds one long
        # answer does not make every short one recompute the long one's width each step.
        prefixes = np.minimum(first_live, T - answer_lengths)
        buckets = _prefix_buckets(prefixes, T, prefix_groups)
        # The once-per-model checks of the forms (_check_forms) run on a sample of the usual
        # group (FORM_CHECK_SEQUENCES), built first: it holds transformers' states and the plain
        # forwards' side by side, and the full forward's logits. On the whole group, that doubled a
        # process's first batch on an H200 (d768, 32,768 facts a batch: 43 GiB against 23 GiB for
        # every later batch), and four processes sharing the GPU ran out of memory at warm-up.
        self.check_group = None
        verdicts, dtype = _LOWER_REUSE_OK.get(em.model, {}), str(em.lm_head.weight.dtype)
        pending = not verdicts.get(("forms", dtype)) or (lower_forward is not None and ("lower", dtype) not in verdicts)
        if reuse_lower and buckets and pending:
            prefix, bucket = buckets[0]
            self.check_group = _Group(self, np.nonzero(bucket)[0][:FORM_CHECK_SEQUENCES], prefix, reuse_lower, check=True)
        self.groups = []
        for prefix, bucket in buckets:
            self.groups.append(_Group(self, np.nonzero(bucket)[0], prefix, reuse_lower))

    @record_function("engram.prepare.initial_values")
    def initial_values(self, scale: float) -> torch.Tensor:
        """UNEMBED_P: rows that make W_V e point at the next token's output embedding."""
        em = self.em
        layer_mod = em.memory.layer(self.layer)
        pinv = _pinv(layer_mod.value_proj)  # (H*w, d)
        unembed = em.lm_head.weight.detach()[self.targets[self.w_train_t]].float()  # (n, d): gathered, then widened
        direction = unembed / unembed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        e = (scale * direction) @ pinv.T  # (n, H*w)
        H, w = em.config.heads_per_layer, em.config.row_width
        e = e.view(-1, H, w)
        device = em.device
        rows = self.w_rows_t[self.w_train_t]  # (n, H): trained positions only
        users = torch.as_tensor(self.seq_user[self.w_seq[self.w_train]], device=device)
        inside = self.w_inside_t[self.w_train_t]  # (n, H): the heads whose rows are trained
        base = layer_mod.table.detach()[rows].float()  # (n, H, w) (not the whole table widened per batch)
        flat_keys = (users.view(-1, 1) * self.num_rows + rows)[inside]
        if self.fixed is not None:  # start from the composed row: table + fixed base delta
            base = base + self.fixed.rows_of(self.layer, users.cpu(), rows.cpu()).to(device)
        slot = torch.searchsorted(self.keys, flat_keys)
        total = torch.zeros(len(self.keys), w, device=device)
        count = torch.zeros(len(self.keys), 1, device=device)
        total.index_add_(0, slot, (e - base)[inside])
        count.index_add_(0, slot, torch.ones(len(slot), 1, device=device))
        return total / count.clamp_min(1)

    def _overlay(self, values: torch.Tensor) -> Overlay:
        if self.fixed is None:
            return Overlay(self.owners, {self.layer: self.keys}, {self.layer: values})
        return self.fixed.overlay(self.owners, self.layer, self.keys, values)

    def check_lower_reuse(self, values: torch.Tensor) -> None:
        """:meth:`_check_forms`; then the groups that were checked on transformers' states take
        the plain forwards' states (:meth:`_Group.adopt_plain`), as every other batch has them."""
        try:
            self._check_forms(values)
            if self.check_group is not None:  # checked (on the sample): later batches build none
                _LOWER_REUSE_OK.setdefault(self.em.model, {})[("forms", str(self.em.lm_head.weight.dtype))] = True
        finally:
            self.check_group = None  # its states go: the groups' own are the plain forwards' (if they passed)
            for g in self.groups:
                g.adopt_plain()
        if self.plain:
            # On the states every step will read: checked on transformers' states (whose values
            # are strided differently), the compiled step would be compiled twice, a minute each
            # on an H200.
            self.step.check_compiled([(g.plain, g.targets) for g in self.groups], values,
                                     _form_tolerance(self.em.lm_head.weight.dtype), sample=FORM_CHECK_SEQUENCES)
        if not (self.plain and self.step.reads_shared_prefix(self.ids)):
            for g in self.groups:  # read per member every step: gathered once (the layers that are read)
                g.gather_prefix(below=None if g.lower is not None else 0)

    def _check_forms(self, values: torch.Tensor) -> None:
        """Choose the step's form, checking each once per model and dtype: it must give the full
        forward's logits up to the rounding of the model's dtype. Transformers' forward from the
        write layer on cached lower-layer states, with the in-place prefix attention if on, else
        without; then, for the steps, the plain step (:mod:`engram_core.fast_step`). A form that
        fails is not used; without a passing transformers form, everything runs the full forward.
        """
        self.plain = False
        groups = [g for g in self.groups if g.lower is not None]
        if not groups:
            return
        g = self.check_group if self.check_group is not None and self.check_group.lower is not None else groups[0]
        overlay = self._overlay(values)
        dtype = self.em.lm_head.weight.dtype
        tolerance = _form_tolerance(dtype)
        verdicts = _LOWER_REUSE_OK.setdefault(self.em.model, {})
        full = []
        described = {"split": " with in-place prefix attention", "reuse": "", "plain": " as the plain step"}

        def passes(form: str) -> bool:
            key = (form, str(dtype))
            if key not in verdicts:
                with torch.no_grad():
                    if not full:  # with the ops the prefix and the lower states were computed with
                        with _model_ops(self.em.model, self.fused_ops):
                            full.append(g.logits(overlay, full=True))
                    if form == "plain":
                        fast = self.step.logits(g.plain, values)
                    else:
                        self.prefix_attention = form == "split"
                        with _model_ops(self.em.model, self.fused_ops):
                            fast = g.logits(overlay)
                relative = float((fast - full[0]).abs().max() / full[0].abs().max().clamp_min(1e-6))
                verdicts[key] = relative <= tolerance
                log.info("compiler: steps from the write layer%s vs the full forward: max relative logit difference "
                         "%.2e (%s)", described[form], relative, "used" if verdicts[key] else "not used")
            return verdicts[key]

        for form in (["split"] if self.prefix_attention else []) + ["reuse"]:
            if passes(form):
                self.prefix_attention = form == "split"
                break
        else:
            log.warning("compiler: the forward from the write layer on cached states differs from the full forward "
                        "for %s; using the full forward", type(self.em.model).__name__)
            for g in groups:
                g.lower = g.plain = None
            return
        if self.step is not None and g.plain is not None and all(x.plain is not None for x in self.groups) and passes("plain"):
            self.plain = True  # the compiled step is checked after adopt_plain (check_lower_reuse)

    def optimize(self, values: torch.Tensor, steps: int, lr: float, stop_margin: float | None = None) -> torch.Tensor:
        self.check_lower_reuse(values)
        return self.run_steps(values, steps, lr, stop_margin)

    def run_steps(self, values: torch.Tensor, steps: int, lr: float, stop_margin: float | None = None,
                  per_user: bool = False) -> torch.Tensor:
        """Adam on the rows, in the form :meth:`check_lower_reuse` chose; ``steps_run`` is set
        to how many updates each user's returned rows had ((num_users,) int64).

        ``stop_margin`` (``CompileOptions``): the rows are kept at the first step at which every
        answer token of the batch has at least this margin in the step's forward. ``per_user``
        (``CompileOptions.stop_per_user``): each user's rows are kept at the first step at which
        every answer token of its own sequences has, and its sequences leave the steps; the
        steps end when every user has stopped (or after ``steps``). Users own disjoint rows and
        Adam updates each value apart, so a user's rows and step count depend on its own facts,
        not on the slowest fact of its batch. The test is read one step late (a CUDA event on a
        pinned copy: the queue is not drained), so a stopped user's sequences run one more step,
        and the rows it tested are the ones kept. With the plain step, a group is narrowed to
        its running members (:meth:`fast_step.GroupInputs.take`) once a tenth of them have
        stopped; transformers' forward keeps computing stopped users (their rows are still the
        ones kept). The plain step touches no state of the model (no hooks, no overlay in use), so it may
        run on another thread while this one prepares the next batch."""
        values = values.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([values], lr=lr)
        self.steps_run = np.full(self.num_users, steps, np.int64)
        parts = [_StepPart(g) for g in self.groups]
        stop = _UserStop(self, values) if stop_margin is not None else None
        each = per_user and (not self.plain or self.step.each_margin)  # the step's margins are each answer's
        pending: _StopTest | None = None
        with torch.enable_grad():
            for k in range(steps):
                optimizer.zero_grad(set_to_none=True)
                overlay = None if self.plain else self._overlay(values)
                least = stop.least() if each else None  # per user: (num_users,), on the device
                for part in parts:  # gradients of the groups add up: one loss, summed
                    g = part.group
                    if self.plain:
                        with record_function(g.step_label):
                            out = self.step.backward(part.inputs, values, part.targets)
                        margin = out[1] if stop is not None else None
                    else:
                        logits = g.logits(overlay)
                        F.cross_entropy(logits, g.targets, reduction="sum").backward()
                        margin = _margins(logits.detach(), g.targets) if stop is not None else None
                        if margin is not None and not each:
                            margin = margin.amin()
                    if margin is not None and each:
                        least.scatter_reduce_(0, part.answer_user, margin, "amin")
                    elif margin is not None:  # the batch's least margin (a scalar)
                        least = margin if least is None else torch.minimum(least, margin)
                test = None
                if stop is not None:  # per user, or the batch's verdict for every user
                    verdict = least >= stop_margin
                    test = _StopTest(verdict if each else verdict.expand(self.num_users), values, k)
                optimizer.step()
                if pending is not None:  # step k is queued behind it
                    stopped = stop.update(pending)
                    if stopped is not None:
                        self.steps_run[stopped] = pending.step
                        if stop.done:
                            return stop.rows(values)
                        if self.plain and each:
                            parts = [p for p in parts if p.narrow(stop.stopped)]
                pending = test
        return values.detach() if stop is None else stop.rows(values)

    @torch.no_grad()
    def check(self, values: torch.Tensor, min_margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per written position: greedy-correct-with-margin, loss, margin (with stored fp16 values).

        The LM head runs on chunks of ``_CHECK_CHUNK`` positions: (positions, vocab) float32
        logits of a whole 65,536-fact batch would be 8 GiB (and a scattered copy of them another
        8), a peak that fragments the allocator for the next batch."""
        n = self.num_written
        loss_all, margin_all = np.empty(n, np.float32), np.empty(n, np.float32)
        overlay = self._overlay(values.half().to(values.dtype))
        head = self.em.lm_head
        for g in self.groups:
            with _model_ops(self.em.model, self.fused_ops):
                hidden = g.hidden(overlay)
            loss, margin = torch.empty(len(hidden), device=hidden.device), torch.empty(len(hidden), device=hidden.device)
            for a in range(0, len(hidden), _CHECK_CHUNK):
                b = a + _CHECK_CHUNK
                logits = head(hidden[a:b]).float()
                targets = g.targets[a:b]
                loss[a:b] = F.cross_entropy(logits, targets, reduction="none")
                target_logit = logits.gather(1, targets.view(-1, 1)).squeeze(1)
                # The best other token: the top logit, or the second when the top is the target
                # (same bits as the max over the logits with the target masked out).
                top, index = logits.topk(2, dim=1)
                best_other = torch.where(index[:, 0] == targets, top[:, 1], top[:, 0])
                margin[a:b] = target_logit - best_other
            written = g.written.cpu().numpy()
            loss_all[written] = loss.cpu().numpy()
            margin_all[written] = margin.cpu().numpy()
        return margin_all >= min_margin, loss_all, margin_all


_CHECK_CHUNK = 8192  # positions per LM-head chunk in _Batch.check


def _margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(answer logit - best other logit) of each row of ``logits`` (n, vocab) -> (n,) float32."""
    logits = logits.float()
    target_logit = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    return target_logit - logits.scatter(1, targets.view(-1, 1), float("-inf")).amax(1)


class _StopTest:
    """Which users' answers all cleared ``CompileOptions.stop_margin`` at one step's rows: the
    verdict (num_users,) bool copied to the host without waiting (pinned memory and an event on
    CUDA), and those rows kept (the optimizer updates the live tensor in place)."""

    def __init__(self, verdict: torch.Tensor, values: torch.Tensor, step: int):
        self.step, self.values = step, values.detach().clone()
        self._event = None
        if verdict.is_cuda:
            self._host = torch.empty(verdict.shape, dtype=torch.bool, pin_memory=True)
            self._host.copy_(verdict, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = verdict

    def passed(self) -> np.ndarray:
        """(num_users,) bool, on the host (waits for the step that computed it, not later ones)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy().copy()


class _UserStop:
    """The per-user stop of :meth:`_Batch.run_steps`: which users have stopped, and their rows
    as they were at the step that stopped them (the rows of the others stay live)."""

    def __init__(self, batch: _Batch, values: torch.Tensor):
        self.batch = batch
        self.stopped = np.zeros(batch.num_users, bool)
        self.kept = torch.zeros_like(values, requires_grad=False)  # (K, w): stopped users' rows
        self.kept_mask = torch.zeros(len(values), 1, dtype=torch.bool, device=values.device)

    def least(self) -> torch.Tensor:
        """(num_users,) float32 +inf, to take each user's least answer margin of a step."""
        return torch.full((self.batch.num_users,), float("inf"), device=self.batch.keys.device)

    @property
    def done(self) -> bool:
        return bool(self.stopped.all())

    def update(self, test: _StopTest) -> np.ndarray | None:
        """Stop the users that ``test`` passed and had not stopped; keep their rows from it.
        -> their indices, or None."""
        newly = test.passed() & ~self.stopped
        if not newly.any():
            return None
        self.stopped |= newly
        rows = _to_device(newly, self.kept.device)[self.batch.key_user].view(-1, 1)  # (K, 1): rows of the users stopping now
        self.kept = torch.where(rows, test.values, self.kept)
        self.kept_mask |= rows
        return np.flatnonzero(newly)

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """The rows to return: each stopped user's kept rows, the others' live ``values``."""
        return torch.where(self.kept_mask, self.kept, values.detach())


STEP_NARROW_AT = 0.9
"""The per-user stop narrows a plain-step group to its running members once at most this share
of its current members still run (:class:`_StepPart`): a narrowing copies the group's inputs
at its live positions (the prefix is read through an index where the attention kernel runs),
which a step reads several times."""


class _StepPart:
    """One group's inputs to the steps of :meth:`_Batch.run_steps`: all its members at first;
    with the per-user stop and the plain step, narrowed to the members of users still running."""

    def __init__(self, group: "_Group"):
        self.group = group
        self.inputs, self.targets, self.answer_user = group.plain, group.targets, group.answer_user
        self.members = np.arange(len(group.member_user))  # the group's members in self.inputs
        self.answers = np.arange(len(group.answer_member))  # the group's answer positions in self.inputs

    def narrow(self, stopped: np.ndarray) -> bool:
        """Drop the members of ``stopped`` users once few enough run (:data:`STEP_NARROW_AT`);
        False: none runs (the part is done). Two members at least stay (a stopped one if need
        be): ``torch.compile`` specialises a size of 1, and would compile the step again."""
        group = self.group
        running = ~stopped[group.member_user[self.members]]
        count = int(running.sum())
        if count == 0:
            return False
        if count > STEP_NARROW_AT * len(self.members) or len(self.members) <= 2:
            return True
        if count < 2:
            running[np.flatnonzero(~running)[0]] = True
        members = self.members[running]
        position = np.full(len(group.member_user), -1, np.int64)  # a kept member's index in the narrowed group
        position[members] = np.arange(len(members))
        picked = np.flatnonzero(position[group.answer_member[self.answers]] >= 0)  # of the current answers
        answers = self.answers[picked]
        device = self.targets.device
        keep, picked, target_seq = (_to_device(a, device) for a in (
            np.flatnonzero(running), picked, position[group.answer_member[answers]]))
        self.inputs = self.inputs.take(keep, picked, target_seq)
        self.targets, self.answer_user = self.targets[picked], self.answer_user[picked]
        self.members, self.answers = members, answers
        return True


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array onto ``device`` without draining its queue (pinned, asynchronous on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t

FORM_CHECK_SEQUENCES = 1024
"""How many sequences of a process's first batch (of its usual group) the once-per-model checks
of the step's forms and of the plain forwards run on (``_Batch.check_group``). A sample: the
checks bound a form's rounding, which a thousand sequences show as well as the whole batch, and
the whole batch doubled the first batch's memory (bench/RESULTS.md, 2026-12-02 twelfth session)."""

PLAIN_PREFIX_TOLERANCE = 5e-2
"""Largest relative difference (to the largest value) of the plain prefix and lower forwards'
keys, values and states from transformers' in bf16/fp16 for them to be used
(``CompileOptions.plain_prefix``; 1e-3 in float32)."""


def _rows_touched(batch: _Batch) -> np.ndarray:
    """Distinct trained rows each sequence's written and context positions address (the heads
    inside the fact's text: :func:`engram_core.addressing.own_text_heads`). The heads of a
    position address disjoint row ranges, so a one-position fact touches exactly its inside
    heads' rows; only facts with several positions (multi-token answers, context) need their
    rows sorted."""
    counts = np.diff(np.r_[batch.written_start, batch.num_written])  # written positions per sequence
    counts = counts + np.bincount(batch.c_seq, minlength=len(counts))
    touched = np.bincount(batch.w_seq, weights=batch.w_inside.sum(1), minlength=len(counts)).astype(np.int64)
    multi = np.flatnonzero(counts > 1)
    if multi.size:
        seq = np.concatenate([batch.w_seq, batch.c_seq])
        rows = np.concatenate([batch.w_rows, batch.c_rows])
        inside = np.concatenate([batch.w_inside, batch.c_inside])
        pick = np.isin(seq, multi)[:, None] & inside
        keys = _distinct((seq[:, None] * batch.num_rows + rows)[pick])
        touched[multi] = np.bincount(keys // batch.num_rows, minlength=len(counts))[multi]
    return touched


def _pinv(projection: torch.nn.Linear) -> torch.Tensor:
    """Pseudo-inverse of a frozen projection's weight, computed once per weight (an SVD: about
    0.1-0.25 s on a GPU, which every batch used to pay)."""
    weight = projection.weight
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device)
    cached = _PINV.get(projection)
    if cached is None or cached[0] != key:
        cached = key, torch.linalg.pinv(weight.detach().float())
        _PINV[projection] = cached
    return cached[1]


_PINV: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


class _Group:
    """Sequences of a batch that share one prefix length (and so one prefix KV cache)."""

    def __init__(self, batch: "_Batch", members: np.ndarray, prefix: int, reuse_lower: bool = False,
                 check: bool = False):
        device = batch.em.device
        self.batch, self.prefix = batch, prefix
        # The profiler's label of this group's steps (bench/profile_pipeline.py): group 0 has the
        # longest prefix (the usual group); the others recompute more of their triggers.
        self.step_label = "engram.step.check" if check else f"engram.step.group{len(batch.groups)}"
        self.members = torch.as_tensor(members, device=device)
        position_of = np.full(len(batch.seqs), -1, np.int64)
        position_of[members] = np.arange(len(members))
        picked = np.nonzero(position_of[batch.w_seq] >= 0)[0]  # written positions of the members
        self.written = torch.as_tensor(picked, device=device, dtype=torch.long)
        # Per member and per answer position, the user (host; the per-user stop narrows groups on
        # the host, so that no step waits for the device), and each answer position's member.
        self.member_user = batch.seq_user[members]
        self.answer_member = position_of[batch.w_seq[picked]]
        self.answer_user = torch.as_tensor(batch.seq_user[batch.w_seq[picked]], device=device)
        self.target_index = (torch.as_tensor(self.answer_member, device=device),
                             torch.as_tensor(batch.w_pos[picked] - prefix, device=device))
        # The last live positions that hold every answer position (the plain step's last layer
        # computes its outputs there only): 1 for single-token answers.
        self.tail = int(batch.T - batch.w_pos[picked].min()) if len(picked) else 0
        self.ids = batch.ids[self.members]
        self.mask = batch.mask[self.members]
        self.positions = batch.positions[self.members]
        self.targets = batch.targets[self.written]
        self.cache = None
        self.cache_index = None  # while the prefix is per distinct prefix: each member's row of self.cache
        self.lower_rows = None  # each member's row of self.cache's layers below the write layer (not gathered)
        self.check = check
        self.lower = None  # (members, suffix, d): hidden states entering the write layer
        self.plain = None  # the plain step's inputs (fast_step.GroupInputs)
        # The prefix sees no trainable row, but it may see fixed (base) rows.
        prefix_overlay = batch.fixed.prefix_overlay() if batch.fixed is not None else None
        if prefix_overlay is not None:
            prefix_overlay = Overlay(prefix_overlay.owners[self.members], prefix_overlay.keys, prefix_overlay.values)
        self.prefix_overlay = prefix_overlay
        verdict = _LOWER_REUSE_OK.get(batch.em.model, {}).get(("lower", str(batch.em.lm_head.weight.dtype)))
        plain = batch.lower_forward if reuse_lower and batch.engram_rows and verdict is not False else None
        if verdict is None and not check:
            plain = None  # never used unchecked (the batch's check group checks them first)
        # Once per model and dtype the plain forwards are checked against transformers' (on this
        # group), and the step forms are checked on transformers' states (_Batch.check_lower_reuse);
        # then this group's states are computed again by the plain forwards (adopt_plain), so that
        # every batch is compiled from the same forwards and a re-run gives the same bits.
        # (Only the batch's check group, a sample: _Batch.check_group.)
        self.pending_plain = check and plain is not None and verdict is None
        if self.pending_plain:
            self._forwards(None, reuse_lower)
            checked = self.cache, self.lower
            self._forwards(plain, reuse_lower)
            self._check_plain_lower(*checked)
            self.cache, self.lower = checked
        else:
            self._forwards(plain, reuse_lower)
        if reuse_lower:
            if batch.step is not None:
                with record_function("engram.prepare.plain"):
                    self.plain = self._plain_inputs()

    def _forwards(self, plain: "fast_step.LowerForward | None", reuse_lower: bool) -> None:
        """This group's states that do not depend on the trainable rows: the prefix's KV cache
        (``self.cache``) and, with ``reuse_lower``, the live positions' hidden states entering the
        write layer (``self.lower``), by ``plain``'s forwards or (None) transformers'."""
        batch, prefix, prefix_overlay = self.batch, self.prefix, self.prefix_overlay
        self.cache = self.lower = self.cache_index = self.lower_rows = None
        # transformers' prefix and lower forwards with the fused ops; the plain ones are compiled
        # code, which fuses them itself (and the model stays unpatched while steps run).
        with _model_ops(batch.em.model, batch.fused_ops and plain is None):
            if prefix > 0:
                # Members with the same tokens before the split share one prefix forward.
                shared = _distinct_rows(self.ids[:, :prefix], self.mask[:, :prefix], prefix_overlay) if batch.dedupe else None
                pick = None if shared is None else shared[0]
                with torch.no_grad(), record_function("engram.prepare.prefix"):
                    if plain is not None:
                        self.cache = _kv_cache(plain.prefix_cache(
                            _take(self.ids[:, :prefix], pick), _take(self.mask[:, :prefix], pick),
                            _take(self.positions[:, :prefix], pick),
                            {i: _take(r[self.members, :prefix], pick) for i, r in batch.engram_rows.items()},
                            _overlay_rows(prefix_overlay, pick)))
                    else:
                        # The backbone alone: only the KV cache is needed, not (B, prefix, vocab) logits.
                        backbone, _ = backbone_and_layers(batch.em.model)
                        with batch.em.memory.use(_overlay_rows(prefix_overlay, pick)):
                            out = backbone(
                                input_ids=_take(self.ids[:, :prefix], pick),
                                attention_mask=_take(self.mask[:, :prefix], pick),
                                position_ids=_take(self.positions[:, :prefix], pick),
                                use_cache=True,
                            )
                        self.cache = output_cache(out)
                if shared is not None:  # each member's row, until the lower forward has run
                    self.cache_index = shared[1]
            if reuse_lower:
                with record_function("engram.prepare.lower"):
                    # Members with the same whole input share one forward of the lower layers.
                    shared = _distinct_rows(self.ids, self.mask, prefix_overlay) if batch.dedupe else None
                    pick = None if shared is None else shared[0]
                    if plain is not None:
                        self.lower = self._plain_lower(plain, prefix_overlay, pick)
                    else:
                        self.lower = self._lower_hidden(prefix_overlay, pick)
                    if shared is not None:
                        self.lower = self.lower[shared[1]]
        if self.cache_index is not None and not (reuse_lower and not self.check and self._steps_read_shared()):
            self.gather_prefix(below=batch.layer if reuse_lower and not self.check else 0)

    def _steps_read_shared(self) -> bool:
        """Whether the steps read a shared prefix in place (the compiled plain step's attention
        kernel, :attr:`fast_step.GroupInputs.prefix_index`): then the prefix keeps one row per
        distinct prefix; forwards through transformers (verification) gather the rows they read."""
        step = self.batch.step
        return step is not None and step.reads_shared_prefix(self.batch.ids)

    def gather_prefix(self, below: int | None = None) -> None:
        """The prefix back to one row per member (from :attr:`cache_index`), for forms that read
        it per member: transformers' forward each step, the uncompiled plain step. Only decoder
        layers from ``below`` (default: the write layer) are gathered: the layers below keep one
        row per distinct prefix (:attr:`lower_rows`) and are read only by a forward from the first
        layer (a 32,768-fact d768 batch's prefix is 9 GB in all 12 layers; 3.75 GB in the 5 from
        layer 7). The check group runs the full forward (_Batch._check_forms): every layer."""
        if self.cache_index is None:
            return
        below = self.batch.layer if below is None else below
        if self.cache_index.is_cuda:  # the shared rows may come from a side stream (overlap_batches): not
            stream = torch.cuda.current_stream(self.cache_index.device)  # reused there before the gather reads them
            for index in range(below, len(_layers_of(self.cache))):
                for t in _cached_kv(self.cache, index):
                    t.record_stream(stream)
        self.cache = _select_cache(self.cache, self.cache_index, first=below)
        self.lower_rows = self.cache_index if below else None
        self.cache_index = None
        if self.plain is not None and self.plain.prefix_index is not None:
            layers = range(self.batch.layer, self.batch.layer + len(self.plain.prefix))
            self.plain.prefix = [_cached_kv(self.cache, index) for index in layers]
            self.plain.prefix_index = None

    def _whole_cache(self) -> None:
        """The layers below the write layer one row per member too (:attr:`lower_rows`), for a
        forward from the first layer (:meth:`hidden` with ``full``, or without the lower states)."""
        if self.lower_rows is not None:
            self.cache = _select_cache(self.cache, self.lower_rows, stop=self.batch.layer)
            self.lower_rows = None

    def adopt_plain(self) -> None:
        """After the checks on transformers' states (:attr:`pending_plain`): this group's states
        by the plain forwards, as every later batch's, if they passed their check."""
        if not self.pending_plain:
            return
        self.pending_plain = False
        if not _LOWER_REUSE_OK.get(self.batch.em.model, {}).get(("lower", str(self.batch.em.lm_head.weight.dtype))):
            return  # they did not: transformers' forwards, here and in every later batch
        uses_lower, uses_plain = self.lower is not None, self.plain is not None
        self.cache = self.lower = self.plain = None  # let transformers' states go first
        self._forwards(self.batch.lower_forward, uses_lower)
        if uses_plain:
            with record_function("engram.prepare.plain"):
                self.plain = self._plain_inputs()

    def _plain_lower(self, plain: "fast_step.LowerForward", overlay: Overlay | None, pick: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_lower_hidden` by ``plain`` (on this group's cache)."""
        batch, P = self.batch, self.prefix
        kv = prefix_valid = rows = None
        if self.cache is not None:
            rows = _compose(self.cache_index, pick)  # each sequence's row of the cache (read in place)
            kv = [_cached_kv(self.cache, i) for i in range(batch.layer)]
            prefix_valid = _take(self.mask[:, :P], pick)
        return plain.lower(_take(self.ids[:, P:], pick), _take(self.mask[:, P:], pick), _take(self.positions[:, P:], pick),
                           {i: _take(r[self.members, P:], pick) for i, r in batch.engram_rows.items()},
                           kv, prefix_valid, _overlay_rows(overlay, pick), prefix_index=rows)

    def _check_plain_lower(self, cache, lower: torch.Tensor | None) -> bool:
        """Once per model and dtype: this group's states by the plain forwards (``self.cache``,
        ``self.lower``) against transformers' (``cache``, ``lower``) at the valid positions, within
        :data:`PLAIN_PREFIX_TOLERANCE` (relative to the largest value)."""
        em, P = self.batch.em, self.prefix
        dtype = em.lm_head.weight.dtype
        tolerance = 1e-3 if dtype == torch.float32 else PLAIN_PREFIX_TOLERANCE

        def relative(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
            a, b = a.float() * valid, b.float() * valid
            return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))

        worst = 0.0
        with torch.no_grad():
            if lower is not None:
                worst = relative(self.lower, lower, self.mask[:, P:].unsqueeze(-1))
            if cache is not None:
                valid = self.mask[:, :P].view(len(self.mask), 1, P, 1)
                for index in range(len(self.batch.lower_forward.layers)):
                    for a, b in zip(_cached_kv(self.cache, index), _cached_kv(cache, index)):
                        worst = max(worst, relative(a, b, valid))
        ok = worst <= tolerance
        _LOWER_REUSE_OK.setdefault(em.model, {})[("lower", str(dtype))] = ok
        log.info("compiler: the prefix and lower forwards as plain code vs transformers': max relative difference "
                 "%.2e (%s)", worst, "used" if ok else "not used")
        return ok

    def _plain_inputs(self) -> fast_step.GroupInputs:
        """Everything of this group that the plain step keeps constant across steps."""
        batch, em, P = self.batch, self.batch.em, self.prefix
        step = batch.step
        rows = batch.rows_t[self.members, P:]  # (n, S, H) write-layer rows of the live positions
        num_rows = batch.num_rows
        owner = batch.owners[self.members, 0].view(-1, 1, 1)  # trainable slot (the user)
        query = owner * num_rows + rows
        slot = torch.searchsorted(batch.keys, query).clamp_max(batch.keys.numel() - 1)
        hit = (batch.keys[slot] == query) & (owner >= 0)
        fixed = None
        if batch.fixed is not None:  # fixed rows: float32 as the training overlay sums them
            fixed = Overlay(batch.fixed.owners[self.members], batch.fixed.keys,
                            {k: v.float() for k, v in batch.fixed.values.items()})
        fixed_e = fixed.lookup(batch.layer, rows, num_rows) if fixed is not None else None
        upper_e = {}
        valid = batch.mask.bool()
        for index in em.config.layers:
            module = em.memory.layer(index)
            has_fixed = fixed is not None and fixed.touches(index)
            if index <= batch.layer or (module.table_is_zero and not has_fixed):
                continue  # as the layer hook: nothing to add there
            upper_rows = em.memory.addresser.rows_torch(batch.ids, index, valid, check=False)[self.members, P:]  # checked
            e = F.embedding(upper_rows, module.table)
            if has_fixed:
                e = e + fixed.lookup(index, upper_rows, em.memory.num_rows(index)).to(e.dtype)
            upper_e[index] = e
        prefix = [None] * len(step.layers)
        if self.cache is not None:
            prefix = [_cached_kv(self.cache, index) for index in range(batch.layer, batch.layer + len(step.layers))]
        cos, sin = step.rope(self.lower, self.positions[:, P:])
        prefix_index = self.cache_index
        if prefix_index is None and self.cache is not None and step.each_margin and step.reads_shared_prefix(batch.ids):
            # Read through an index from the first step: the per-user stop narrows the group by
            # narrowing the index (GroupInputs.take), never by copying the prefix (3.6 GiB for
            # 32,768 d768 members, which ran an H200's processes out of memory).
            prefix_index = torch.arange(len(self.members), device=self.members.device)
        return fast_step.GroupInputs(
            lower=self.lower,
            table_e=F.embedding(rows, em.memory.layer(batch.layer).table),
            fixed_e=fixed_e, slot=slot, hit=hit, upper_e=upper_e, cos=cos, sin=sin,
            mask=step.mask(self.mask[:, :P] if P else None, self.mask[:, P:], self.lower.dtype),
            prefix=prefix, target_seq=self.target_index[0], target_pos=self.target_index[1],
            prefix_index=prefix_index, tail=self.tail,
        )

    def _lower_hidden(self, overlay: Overlay | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The suffix's hidden states entering the write layer (before its Engram row is added):
        a forward that stops there. They do not depend on the trainable rows. ``rows``: of these
        members only (indices into the group's members), in that order."""
        em = self.batch.em
        _, layers = backbone_and_layers(em.model)

        def stop(module, args, kwargs):
            raise _Reached(args[0] if args else kwargs["hidden_states"])

        handle = layers[self.batch.layer].register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
        try:
            with torch.no_grad():
                self._forward(overlay, embeds=None, rows=rows)
        except _Reached as reached:
            return reached.hidden
        finally:
            handle.remove()
        raise RuntimeError("compiler: the forward did not reach the write layer")

    def _forward(self, overlay, embeds: torch.Tensor | None, rows: torch.Tensor | None = None):
        """The backbone on the live positions (after the cached prefix); ``rows``: of these
        members only (``overlay`` is the group's; its owners are taken at ``rows`` too)."""
        em = self.batch.em
        backbone, _ = backbone_and_layers(em.model)  # hidden states only: logits where needed
        ids, mask, positions, cache = self.ids, self.mask, self.positions, self.cache
        if rows is not None:
            ids, mask, positions = ids[rows], mask[rows], positions[rows]
            overlay = _overlay_rows(overlay, rows)
        cache_rows = _compose(self.cache_index, rows)
        if cache is not None and cache_rows is not None:  # from the write layer up, only its layers are read
            cache = _select_cache(cache, cache_rows, first=self.batch.layer if embeds is not None else 0)
        kwargs = {}
        split = embeds is not None and cache is not None and self.batch.prefix_attention
        if cache is not None and not split:
            kwargs.update(cache_kwargs(backbone, _fork_cache(cache)))
        history = (ids[:, : self.prefix], mask[:, : self.prefix]) if cache is not None else None
        suffix = ids[:, self.prefix:]
        if embeds is None:
            kwargs["input_ids"] = suffix
        else:
            kwargs["inputs_embeds"] = embeds
        with ExitStack() as stack:
            if split:
                kwargs.update(cache_kwargs(backbone, stack.enter_context(prefix_attention.split_prefix(em.model, cache))))
            stack.enter_context(em.memory.use(overlay, history, embeds_ids=suffix if embeds is not None else None))
            stack.enter_context(_layers_from(em.model, self.batch.layer if embeds is not None else 0))
            return backbone(
                attention_mask=mask,
                position_ids=positions[:, self.prefix:],
                use_cache=cache is not None,
                **kwargs,
            )

    def hidden(self, overlay: Overlay, full: bool = False) -> torch.Tensor:
        """Final hidden states at the positions that predict an answer token, (n_g, d) (a group
        that recomputes its trigger has many more positions than targets)."""
        group_overlay = Overlay(overlay.owners[self.members], overlay.keys, overlay.values)
        if full or self.lower is None:
            self._whole_cache()
        out = self._forward(group_overlay, embeds=None if full or self.lower is None else self.lower)
        return out.last_hidden_state[self.target_index]

    def logits(self, overlay: Overlay, full: bool = False) -> torch.Tensor:
        return self.batch.em.lm_head(self.hidden(overlay, full)).float()


def _distinct_rows(ids: torch.Tensor, mask: torch.Tensor, overlay: Overlay | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows of ``ids`` (n, L) that are the same (same tokens at the same valid positions, and
    the same fixed owners where ``overlay`` holds fixed rows): ``(pick, inverse)`` with ``pick``
    (u,) one row of each distinct kind and ``inverse`` (n,) the index into ``pick`` of every
    row, so ``f(rows[pick])[inverse] == f(rows)`` for any row-wise ``f``; None if all differ."""
    key = torch.where(mask.bool(), ids, -1)  # a pad id that is also a real token: told apart by the mask
    if overlay is not None:
        key = torch.cat([overlay.owners.to(key.device), key], dim=1)
    distinct, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    if len(distinct) == len(key):
        return None
    order = torch.argsort(inverse, stable=True)  # members grouped by kind, each kind's first member first
    pick = order[torch.cumsum(counts, 0) - counts]
    return pick, inverse


def _take(rows: torch.Tensor, pick: torch.Tensor | None) -> torch.Tensor:
    return rows if pick is None else rows[pick]


def _compose(index: torch.Tensor | None, pick: torch.Tensor | None) -> torch.Tensor | None:
    """Rows ``pick`` of a table whose row i is row ``index[i]`` of another (None: all, in order)."""
    if index is None:
        return pick
    return index if pick is None else index[pick]


def _overlay_rows(overlay: Overlay | None, rows: torch.Tensor | None) -> Overlay | None:
    """``overlay`` for the sequences ``rows`` of its batch (its keys and values are shared)."""
    if overlay is None or rows is None:
        return overlay
    return Overlay(overlay.owners[rows.to(overlay.owners.device)], overlay.keys, overlay.values)


def _select_cache(cache, rows: torch.Tensor, first: int = 0, stop: int | None = None):
    """A KV cache of the sequences ``rows`` of ``cache`` (new tensors; ``cache`` is unchanged).
    Only decoder layers ``first`` to ``stop`` (exclusive; None: the last) are gathered, the others
    are left as they are (for forwards that never read them)."""
    out = copy.copy(cache)

    def take(index: int) -> bool:
        return index >= first and (stop is None or index < stop)

    if hasattr(cache, "layers"):
        out.layers = []
        for index, layer in enumerate(cache.layers):
            if take(index):
                layer = copy.copy(layer)
                layer.keys, layer.values = layer.keys[rows], layer.values[rows]
            out.layers.append(layer)
    else:  # older transformers: parallel lists of tensors
        out.key_cache = [k[rows] if take(i) else k for i, k in enumerate(cache.key_cache)]
        out.value_cache = [v[rows] if take(i) else v for i, v in enumerate(cache.value_cache)]
    return out


def _layers_of(cache) -> list:
    """A KV cache's per-layer entries (their count is its decoder layers)."""
    return cache.layers if hasattr(cache, "layers") else cache.key_cache  # older transformers: parallel lists


def _kv_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """A transformers KV cache holding ``kv`` (per decoder layer (keys, values), (B, kvh, P, hd))
    as they are (not copied: a 65,536-fact batch's d768 prefix is 18 GB)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (k, v) in enumerate(kv):
        cache.update(k[:, :, :0], v[:, :, :0], index)  # the layer's bookkeeping (dtype, device), empty
        if hasattr(cache, "layers"):
            cache.layers[index].keys, cache.layers[index].values = k, v
        else:  # older transformers: parallel lists of tensors
            cache.key_cache[index], cache.value_cache[index] = k, v
    return cache


def _cached_kv(cache, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[index].keys, cache.layers[index].values
    return cache.key_cache[index], cache.value_cache[index]  # older transformers: parallel lists


class _Reached(Exception):
    def __init__(self, hidden: torch.Tensor):
        super().__init__("reached the write layer")
        self.hidden = hidden


# model -> {compiled: its plain step} (a compiled step keeps its compiled graphs across batches)
_STEPS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _plain_step(em: EngramModel, options: CompileOptions) -> "fast_step.UpperStep | None":
    if not (options.plain_step and options.reuse_lower_layers):
        return None
    why_not = fast_step.supported(em.model, em.memory, em.config.target_layer)
    if why_not is not None:
        log.debug("compiler: no plain step for %s: %s", type(em.model).__name__, why_not)
        return None
    margins = options.stop_margin is not None
    each = margins and options.stop_per_user
    key = options.compiled_step, options.prefix_kernel, margins, options.deterministic, each
    steps = _STEPS.setdefault(em.model, {})
    if key not in steps:
        steps[key] = fast_step.UpperStep(em, compiled=options.compiled_step, prefix_kernel=options.prefix_kernel,
                                         margins=margins, deterministic=options.deterministic, each_margin=each)
    return steps[key]


def _lower_forward(em: EngramModel, options: CompileOptions) -> "fast_step.LowerForward | None":
    """The prefix and lower forwards as plain code, compiled, where the compiled plain step runs
    (``CompileOptions.plain_prefix``)."""
    if not (options.plain_prefix and options.compiled_step) or _plain_step(em, options) is None:
        return None
    why_not = fast_step.lower_supported(em.model, em.memory, em.config.target_layer)
    if why_not is not None:
        log.debug("compiler: no plain prefix forward for %s: %s", type(em.model).__name__, why_not)
        return None
    key = "lower", options.compiled_step, options.prefix_kernel, options.deterministic
    steps = _STEPS.setdefault(em.model, {})
    if key not in steps:
        steps[key] = fast_step.LowerForward(em, compiled=options.compiled_step, prefix_kernel=options.prefix_kernel,
                                            deterministic=options.deterministic)
    return steps[key]


# model -> {(form, dtype): whether the forward from the write layer on
# cached states gives the full forward's logits}
_LOWER_REUSE_OK: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


@contextmanager
def _layers_from(model: torch.nn.Module, start: int) -> Iterator[None]:
    """Run the backbone on its decoder layers ``start:`` only (its input: inputs_embeds)."""
    if start == 0:
        yield
        return
    backbone, layers = backbone_and_layers(model)
    name = next(n for n, m in backbone.named_children() if m is layers)
    setattr(backbone, name, torch.nn.ModuleList(list(layers)[start:]))
    try:
        yield
    finally:
        setattr(backbone, name, layers)


class _FixedRows:
    """Fixed (non-trainable) base rows of a batch's users, as the second owner slot.

    Slot of user ``u``'s base rows is ``num_users + u``, so their keys sort after every
    trainable key and a layer's values are ``cat([trainable, fixed])``.
    """

    def __init__(self, em: EngramModel, base: dict[int, Delta], num_users: int, seq_users: list[int]):
        device = em.device
        dtype = next(em.memory.parameters()).dtype
        self.num_users = num_users
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.local_keys: dict[int, torch.Tensor] = {}  # slot u (not num_users + u): prefix overlay
        users = sorted(u for u, d in base.items() if d.num_rows)
        for layer in em.config.layers:
            num_rows = em.memory.num_rows(layer)
            keys, local, values = [], [], []
            for u in users:
                pick = base[u].layers == layer
                if pick.any():
                    keys.append(torch.as_tensor((num_users + u) * num_rows + base[u].row_ids[pick]))
                    local.append(torch.as_tensor(u * num_rows + base[u].row_ids[pick]))
                    values.append(torch.as_tensor(base[u].values[pick]))
            if keys:
                self.keys[layer] = torch.cat(keys).to(device)
                self.local_keys[layer] = torch.cat(local).to(device)
                self.values[layer] = torch.cat(values).to(device=device, dtype=dtype)
        has = set(users)
        self.owners = torch.as_tensor([[num_users + u if u in has else -1] for u in seq_users], device=device)
        self.local_owners = torch.as_tensor([[u if u in has else -1] for u in seq_users], device=device)
        self.num_rows = {layer: em.memory.num_rows(layer) for layer in em.config.layers}

    def overlay(self, owners: torch.Tensor, layer: int, keys: torch.Tensor, values: torch.Tensor) -> Overlay:
        all_keys = dict(self.keys)
        all_values = dict(self.values)
        if layer in self.keys:
            all_keys[layer] = torch.cat([keys, self.keys[layer]])
            all_values[layer] = torch.cat([values, self.values[layer].to(values.dtype)])
        else:
            all_keys[layer], all_values[layer] = keys, values
        return Overlay(owners, all_keys, all_values)

    def prefix_overlay(self) -> Overlay | None:
        if not self.keys:
            return None
        return Overlay(self.local_owners, self.local_keys, self.values)

    def rows_of(self, layer: int, users: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """users (n,), rows (n, H) -> (n, H, w) fixed values at those rows (zeros where none)."""
        keys = self.local_keys.get(layer)
        width = next(iter(self.values.values())).shape[1] if self.values else 1
        if keys is None:
            return torch.zeros(*rows.shape, width)
        query = (users.view(-1, 1) * self.num_rows[layer] + rows).to(keys.device)
        idx = torch.searchsorted(keys, query).clamp_max(keys.numel() - 1)
        hit = keys[idx] == query
        return (self.values[layer][idx].float() * hit.unsqueeze(-1)).cpu()


def _status(ok: bool, margin: float) -> str:
    if ok:
        return STATUS_OK
    return STATUS_LOW_MARGIN if margin > 0 else STATUS_NOT_RECALLED


def _detail(ok: bool, margin: float, min_margin: float, steps: int, in_context_failed: bool = False) -> str:
    if ok:
        return (f"recalled at the start of a sequence, not after a conversation's opening (its context copy) after "
                f"{steps} steps" if in_context_failed else "")
    if margin > 0:
        return f"recalled by greedy decoding, but with a margin of {margin:.3f} < {min_margin} after {steps} steps"
    return f"answer not reproduced greedily (margin {margin:.3f}) after {steps} steps"


def _batches(by_user: dict[str, list], facts_per_batch: int) -> Iterable[list[str]]:
    """Whole users, in user order, about ``facts_per_batch`` facts per batch."""
    batch: list[str] = []
    count = 0
    for user in sorted(by_user):
        batch.append(user)
        count += len(by_user[user])
        if count >= facts_per_batch:
            yield batch
            batch, count = [], 0
    if batch:
        yield batch


def compile_facts(
    em: EngramModel,
    facts: Sequence[Fact],
    options: CompileOptions = CompileOptions(),
    progress: Callable[[int, int], None] | None = None,
    base_deltas: dict[str, Delta] | None = None,
    fixed_facts: dict[str, Sequence[Fact]] | None = None,
) -> CompileResult:
    """Compile facts of many users into one delta per user. Deterministic for the same inputs.

    ``base_deltas`` (user -> fixed delta) are held in place under each such user's trainable
    rows during optimisation and verification, so the returned delta is exact *composed with*
    its base (serving: ``overlay_for(em, [[base, delta]])``); the base itself is not returned.
    ``fixed_facts`` (user -> facts the base delta recalls, e.g. a shared scope's) are kept recalled
    under the composition: their loss is optimised and checked with the user's, but their rows
    are not written into the user's delta (so a member's delta is no copy of its scope's). They
    get no result of their own; a user whose own rows break one gets retry rounds like any failure
    (:func:`pipeline.collisions.compile_with_scope` checks them after).
    """
    with _deterministic(options.deterministic):
        return _compile_facts(em, facts, options, progress, base_deltas, fixed_facts or {})


@contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic kernels (e.g. the scatter-add of row gradients) so a re-run is bit-identical."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


LR_REFERENCE_WIDTH = 768
"""Hidden size at and below which :func:`effective_lr` is ``CompileOptions.lr`` itself (d768's)."""
LR_WIDTH_EXPONENT = 1.25
"""Exponent of the width scaling, fitted to two H200 measurements: lr 0.3 (~ (2048/768)^1.12 x 0.1)
worked for a 2048-wide model, lr 1.0 (~ (4096/768)^1.38 x 0.1) best of 0.1/0.3/1.0 for a 4096-wide one."""


def effective_lr(em: "EngramModel", options: CompileOptions) -> float:
    """The learning rate a compile of ``em`` uses: ``options.lr``, times
    ``max(1, hidden / 768) ** 1.25`` with ``options.lr_width_scaling`` (hidden: the model config's
    ``hidden_size``, or ``n_embd``; unknown: no scaling)."""
    if not options.lr_width_scaling:
        return options.lr
    config = em.model.config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or LR_REFERENCE_WIDTH
    return options.lr * max(1.0, hidden / LR_REFERENCE_WIDTH) ** LR_WIDTH_EXPONENT


def _compile_facts(em, facts, options, progress, base_deltas, fixed_facts) -> CompileResult:
    if options.stop_margin is not None and not options.stop_margin >= options.min_margin:
        raise ValueError(f"CompileOptions.stop_margin ({options.stop_margin}) must be at least min_margin "
                         f"({options.min_margin}): steps stopped below it leave facts that verification fails")
    if options.prefix_groups < 1:
        raise ValueError(f"CompileOptions.prefix_groups must be at least 1, got {options.prefix_groups}")
    lr = effective_lr(em, options)
    if lr != options.lr:  # the rest of the compile reads options.lr (steps and retry rounds)
        options = replace(options, lr=lr, lr_width_scaling=False)
    torch.manual_seed(options.seed)
    facts_of: dict[str, list[Fact]] = {}
    for fact in facts:
        facts_of.setdefault(fact.user_id, []).append(fact)
    results: list[FactResult] = []
    deltas: dict[str, Delta] = {}
    counts: dict[str, int] = {}
    timings = dict.fromkeys(("tokenize", "prepare", "optimize", "verify", "assemble"), 0.0)
    clock = _PhaseClock(timings, em.device)

    fixed_ids = {id(f) for fs in fixed_facts.values() for f in fs}
    context = _context(em, options) if options.context_copies and options.resolve_conflicts else None

    def tokenize(users: list[str]) -> tuple[dict[str, list[_Seq]], list[FactResult]]:
        """A batch's facts -> its sequences per user (conflicts planned) and the refused facts."""
        batch_facts = [f for u in users for f in list(facts_of[u]) + list(fixed_facts.get(u, ()))]
        validated = _validate(em, batch_facts, options)
        refused: list[FactResult] = []
        by_user: dict[str, list[_Seq]] = {}
        for fact, (seq, rejected) in zip(batch_facts, validated):
            if id(fact) in fixed_ids:
                if rejected is None and fact.user_id in by_user:  # after the user's own facts
                    seq.constraint = True
                    by_user[fact.user_id].append(seq)
            elif rejected is not None:
                refused.append(rejected)
            else:
                by_user.setdefault(fact.user_id, []).append(seq)
        if options.resolve_conflicts:  # here, on the tokenize thread: off the compile's critical path
            refused.extend(_plan_conflicts(em, by_user))
        if context is not None:
            _add_context_copies(em, by_user, context)
        return by_user, refused

    def done(job: _Job) -> None:
        batch_deltas, batch_results = job.assemble()
        deltas.update(batch_deltas)
        results.extend(batch_results)
        if progress is not None:
            progress(len(job.users), sum(counts[u] for u in job.users))

    # Overlap (CUDA): batch k+1 is prepared on a side stream while batch k's steps run on the
    # main one (queued from a thread of their own), and batch k is assembled on the host while
    # batch k+1's steps run. The order of the work on each batch, and so every result, is the
    # same as without overlap. On a CPU there is no side stream or thread; the order is the same.
    side = torch.cuda.Stream(em.device) if options.overlap_batches and em.device.type == "cuda" else None
    in_flight: _Job | None = None
    # The next batch is tokenized on a thread while this one compiles (the tokenizer's Rust
    # backend runs without the GIL); "tokenize" times only the wait for it.
    batches = list(_batches(facts_of, options.facts_per_batch))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-tokenize") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-steps") as stepper:
        pending = pool.submit(tokenize, batches[0]) if batches else None
        for k, users in enumerate(batches):
            clock.restart()
            by_user, refused = pending.result()
            results.extend(refused)
            clock.tick("tokenize", wait=False)
            if k + 1 < len(batches):
                pending = pool.submit(tokenize, batches[k + 1])
            compiled = [u for u in users if u in by_user]
            counts.update({u: sum(not s.constraint and not s.copy for s in by_user[u]) for u in compiled})
            if not compiled:
                if in_flight is not None:  # rare: report batches in order
                    in_flight.verify()
                    done(in_flight)
                    in_flight = None
                if progress is not None:
                    progress(0, 0)
                continue
            with torch.cuda.stream(side) if side is not None else nullcontext():
                job = _Job(em, compiled, by_user, options, base_deltas, clock)
            if not options.overlap_batches:
                job.launch()
                job.verify()
                done(job)
                continue
            if in_flight is not None:
                in_flight.verify()
            if side is not None:
                torch.cuda.current_stream(em.device).wait_stream(side)  # its inputs are ready
            job.launch(stepper if side is not None else None)
            if in_flight is not None:
                done(in_flight)
            in_flight = job
        if in_flight is not None:
            in_flight.verify()
            done(in_flight)
    order = {u: i for i, u in enumerate(sorted(facts_of))}
    results.sort(key=lambda r: (order[r.user_id], r.fact_id))
    return CompileResult(deltas, results, counts, {k: round(v, 4) for k, v in timings.items()})


class _PhaseClock:
    """Adds the seconds since the last tick to a phase. A tick waits for the GPU work queued on
    the current stream, so kernels queued in one phase are not billed to the next; with overlap,
    the steps' time not hidden behind the next batch's preparation is billed to "optimize"."""

    def __init__(self, timings: dict[str, float], device: torch.device):
        self.timings, self.device = timings, device
        self.last = time.perf_counter()

    def restart(self) -> None:
        self.last = time.perf_counter()

    def tick(self, phase: str, wait: bool = True) -> None:
        if wait and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now


class _Job:
    """One batch of whole users through the compiler: prepared (its first round's rows, prefix
    caches and start values), its steps queued (:meth:`launch`), verified with retry rounds for
    users whose facts fail (:meth:`verify`), then assembled into deltas and results on the host
    (:meth:`assemble`). With overlap the three parts of neighbouring batches interleave; the
    GPU tensors a job prepared on the side stream stay referenced until :meth:`verify` has
    waited for the steps that read them (the caching allocator would otherwise hand their
    memory to the side stream's next batch while the main stream still reads it)."""

    def __init__(self, em: EngramModel, users: list[str], by_user: dict[str, list[_Seq]], options: CompileOptions,
                 base_deltas: dict[str, Delta] | None, clock: _PhaseClock):
        self.em, self.users, self.options, self.base_deltas, self.clock = em, users, options, base_deltas, clock
        self.seqs = []
        for slot, u in enumerate(users):  # the _Seqs are this call's own (made by _validate): slot them in place
            for s in by_user[u]:
                s.user = slot
            self.seqs.extend(by_user[u])
        self.final: dict[int, np.ndarray] = {}  # slot -> its rows
        # Per fact, in self.seqs order: recalled, summed loss, least margin, distinct rows touched
        # (the latest round that compiled it).
        n = len(self.seqs)
        self.fact_ok, self.fact_loss = np.zeros(n, bool), np.zeros(n, np.float32)
        self.fact_margin, self.fact_rows = np.zeros(n, np.float32), np.zeros(n, np.int64)
        self.seq_users = np.fromiter((s.user for s in self.seqs), np.int64, n)
        self.host_values: dict[int, np.ndarray] = {}  # slot -> float16 values, as stored
        self.steps_by_user = dict.fromkeys(range(len(users)), 0)
        self.active = list(range(len(users)))
        self.batch = self._batch(self.seqs, self.active)
        self.start = self.batch.initial_values(options.init_scale)
        self.values: torch.Tensor | None = None
        self.running: Future | None = None  # the steps, queued from the stepper thread
        clock.tick("prepare")

    def _batch(self, local: list[_Seq], active: list[int]) -> _Batch:
        em, options = self.em, self.options
        base = None
        if self.base_deltas:
            remap = {u: k for k, u in enumerate(active)}
            base = {remap[u]: self.base_deltas[self.users[u]] for u in active if self.users[u] in self.base_deltas}
        return _Batch(em, local, len(active), base or None,
                      reuse_lower=options.reuse_lower_layers and prefix_attention.llama_style(em.model),
                      prefix_attention=options.prefix_attention and prefix_attention.supported(em.model),
                      prefix_groups=options.prefix_groups, step=_plain_step(em, options),
                      fused_ops=options.fused_ops, dedupe=options.dedupe_prefixes,
                      lower_forward=_lower_forward(em, options))

    def launch(self, stepper: ThreadPoolExecutor | None = None) -> None:
        """Queue the first round's steps on the current stream. With ``stepper`` (a GPU), the
        plain step's 15 steps are queued from that thread: a step is a few hundred kernels, so
        queueing them fills the GPU's launch queue and blocks, and blocked there (torch and Triton
        launch without the GIL) it leaves this thread free to prepare the next batch."""
        batch = self.batch
        batch.check_lower_reuse(self.start)  # here, not on the thread: checks run the model's own forward
        options = self.options
        if stepper is not None and batch.plain:
            self.running = stepper.submit(batch.run_steps, self.start, options.steps, options.lr, options.stop_margin,
                                          options.stop_per_user)
        else:
            self.values = batch.run_steps(self.start, options.steps, options.lr, options.stop_margin,
                                          options.stop_per_user)
        self.clock.tick("optimize", wait=False)

    def verify(self) -> None:
        """Verify the first round; retry rounds (each prepared, run and verified in turn) for the
        users with a failing fact. Leaves only host data behind."""
        options, clock = self.options, self.clock
        if self.running is not None:
            self.values, self.running = self.running.result(), None
        clock.tick("optimize")  # the steps' time not hidden behind other work
        batch, batch_seqs, values = self.batch, self.seqs, self.values
        for k, u in enumerate(self.active):
            self.steps_by_user[u] += int(batch.steps_run[k])
        in_round = np.arange(len(self.seqs))  # positions in self.seqs of this round's facts
        values_by_user: dict[int, torch.Tensor] = {}
        for round_index in range(options.max_rounds):
            if round_index:
                # Re-slot the active users densely so keys stay small. Retry rounds restart Adam
                # from the current rows at a smaller step: what is left is usually two facts of
                # the user fighting over shared rows, a fine balance.
                remap = {u: k for k, u in enumerate(self.active)}
                in_round = np.flatnonzero(np.isin(self.seq_users, self.active))
                batch_seqs = [self.seqs[i] for i in in_round]
                local = [replace(s, user=remap[s.user]) for s in batch_seqs]
                batch = self._batch(local, self.active)
                start = torch.cat([values_by_user[u] for u in self.active])
                clock.tick("prepare")
                # No early stop here: these facts failed verification, perhaps with rows that pass
                # the steps' own margin test (verification reads float16 rows through
                # transformers' forward), and a stop would hand those rows back untouched.
                values = batch.optimize(start, options.retry_steps, options.lr * 0.5**round_index)
                for k, u in enumerate(self.active):
                    self.steps_by_user[u] += int(batch.steps_run[k])
                clock.tick("optimize")
            ok, loss, margin = batch.check(values, options.min_margin)
            clock.tick("verify")
            # Split values back per user (keys are sorted by slot, then row).
            offsets = np.cumsum([0] + [len(batch.user_rows[k]) for k in range(len(self.active))])
            values_host = values.half().cpu().numpy()  # one device-to-host copy per round
            for k, u in enumerate(self.active):
                values_by_user[u] = values[offsets[k]:offsets[k + 1]]
                self.host_values[u] = values_host[offsets[k]:offsets[k + 1]]
                self.final[u] = batch.user_rows[k]
            # Per fact (its written positions are one contiguous run): all ok, summed loss, least
            # margin, and the distinct rows its positions address.
            start = batch.written_start
            fact_ok = np.logical_and.reduceat(ok, start)
            fact_loss = np.add.reduceat(loss, start)
            fact_margin = np.minimum.reduceat(margin, start)
            self.fact_ok[in_round], self.fact_loss[in_round], self.fact_margin[in_round] = fact_ok, fact_loss, fact_margin
            self.fact_rows[in_round] = _rows_touched(batch)
            self.active = sorted({batch_seqs[i].user for i in np.nonzero(~fact_ok)[0]})
            clock.tick("verify")
            if not self.active:
                break
        # Everything on the device is done (the copies above waited for it): let it go.
        self.batch = self.start = self.values = None

    def assemble(self) -> tuple[dict[str, Delta], list[FactResult]]:
        """Deltas and per-fact results, on the host."""
        layer = self.em.config.target_layer
        deltas = {}
        for slot, user in enumerate(self.users):
            rows = self.final[slot]
            deltas[user] = Delta(np.full(len(rows), layer, np.int16), rows, self.host_values[slot])
        min_margin = self.options.min_margin
        steps_of = np.fromiter((self.steps_by_user[u] for u in range(len(self.users))), np.int64, len(self.users))
        in_context_failed = {id(s.fact) for s, ok in zip(self.seqs, self.fact_ok.tolist()) if s.copy and not ok}
        results = [
            FactResult(s.fact.user_id, s.fact.fact_id, _status(ok, margin), loss, steps, rows, margin,
                       _detail(ok, margin, min_margin, steps, id(s.fact) in in_context_failed))
            for s, ok, loss, steps, rows, margin in zip(
                self.seqs, self.fact_ok.tolist(), self.fact_loss.tolist(), steps_of[self.seq_users].tolist(),
                self.fact_rows.tolist(), self.fact_margin.tolist())
            if not s.constraint and not s.copy
        ]
        self.clock.tick("assemble", wait=False)
        return deltas, results
