"""The compile step as plain tensor code: the decoder layers from the write layer up, at the
live positions of one prefix group, for Llama-style models.

transformers' forward rebuilds per call what a compile step keeps constant for 15 steps: the
attention mask, the rotary angles, the KV cache view, the binary search of every position's
rows in the overlay, and the Engram rows of the layers above the write layer. Here all of that
is computed once per group; a step is

    e    = table rows + (trainable values at the written rows + fixed base rows)   (write layer)
    h    = lower + EngramLayer.mix(lower, e)
    h    = decoder layer l (h), l = write layer .. last (attention to the cached prefix in place)
    loss = cross_entropy(lm_head(norm(h))[answer positions], answers)

The last decoder layer runs its queries, attention output and MLP only at the last positions
that hold an answer position (:attr:`GroupInputs.tail`; all positions give it their keys and
values): a group whose sequences recompute their triggers (``prefix_groups``) has up to 16 live
positions and one answer position each. Members that share a prefix (users who share a
trigger text, ``CompileOptions.dedupe_prefixes``) read one copy of its keys and values
(:attr:`GroupInputs.prefix_index`) where the attention kernel runs.

built from the model's own modules (norms, projections, MLPs, its rotary function), so the
family's details stay theirs. Only attention is written out: eager attention's math (scores in
the model dtype, softmax in float32), with the prefix's keys and values read in place.

The step can run through ``torch.compile`` (``compiled=True``, ``CompileOptions.compiled_step``),
which fuses the elementwise work between the matmuls. There the attention runs in one Triton
kernel on CUDA (:mod:`engram_core.prefix_kernels`, ``prefix_kernel``), else as products and sums
(a sequence's few rows against a few keys, which batched matmuls run far below bandwidth). The
trainable rows' gather (and so its backward, a deterministic sorted segment sum) stays outside
the compiled graph: inside, a scatter would be an atomic add, which is not deterministic.

The compiler checks this form against the full forward once per model before using it.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
from dataclasses import dataclass

import torch
import torch._inductor.config  # noqa: F401 (its emulate_precision_casts, read above)
import torch.nn.functional as F

from . import prefix_kernels
from .layer import backbone_and_layers

log = logging.getLogger(__name__)


class FairLock:
    """A reentrant lock granted in the order it was asked for (first come, first served).

    ``threading.RLock`` is not fair: a thread that releases it and asks again at once (the steps'
    loop) takes it back before a waiting thread wakes. Measured on an H200 with the step thread
    taking ``RLock`` for each step: the next batch's prefix forward waited for all 15 steps, 43 s a
    batch under the torch profiler. Here a release hands the lock to the longest waiter."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._waiters: collections.deque[tuple[int, threading.Event]] = collections.deque()

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return
            if self._owner is None:
                self._owner, self._depth = me, 1
                return
            granted = threading.Event()
            self._waiters.append((me, granted))
        try:
            granted.wait()  # release() made this thread the owner
        except BaseException:  # interrupted (Ctrl-C, SIGTERM raised here): never leave a dead waiter behind
            with self._mutex:
                if self._owner != me:
                    self._waiters.remove((me, granted))
                    raise
            self.release()  # granted meanwhile: hand it on
            raise

    def release(self) -> None:
        with self._mutex:
            if self._owner != threading.get_ident():
                raise RuntimeError("FairLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth:
                return
            if self._waiters:
                self._owner, granted = self._waiters.popleft()
                self._depth = 1
                granted.set()
            else:
                self._owner = None

    @property
    def waiting(self) -> int:
        """Threads waiting for the lock now."""
        return len(self._waiters)

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


COMPILED_CALLS = FairLock()
"""Held around every call into a ``torch.compile``'d function of this module, around each step
(:meth:`UpperStep.backward`, compiled or not), and by the compiler while ``fused_ops`` patches
the model (``compiler._model_ops``; the patch is seen by every thread). ``torch.compile`` is not
thread-safe (dynamo and inductor keep global state while they trace; pytorch/pytorch#118260,
#136833), and with overlap the compiler calls the step on one thread while the next batch's
prefix and lower forwards run on another. Any call may compile (a new input layout, a size of
1, a patched module), and without this lock, on an H200, the step's trace raised
``SpeculationLogDivergence`` while the other thread ran the prefix forward, and the process ran
the rest of its compile with the uncompiled step (bench/RESULTS.md, 2026-12-02 tenth session).
Between calls (the host work of a batch, the optimizer's update) the other thread runs freely;
a waiting thread is served first (:class:`FairLock`)."""


@dataclass
class GroupInputs:
    """What a step of one group needs, constant across steps (all on the model's device)."""

    lower: torch.Tensor  # (B, S, d): hidden states entering the write layer at the live positions
    table_e: torch.Tensor  # (B, S, H, w): write-layer table rows (the model's dtype)
    fixed_e: torch.Tensor | None  # (B, S, H, w) float32: fixed base rows at the write layer, or None
    slot: torch.Tensor  # (B, S, H) int64: index of each written row in the trainable values (0 if none)
    hit: torch.Tensor  # (B, S, H) bool: whether the row is trainable for this sequence
    upper_e: dict[int, torch.Tensor]  # Engram layer above the write layer -> (B, S, H, w) rows as read
    cos: torch.Tensor  # rotary angles of the live positions (the model's own rotary embedding)
    sin: torch.Tensor
    mask: torch.Tensor  # (B, 1, S, P + S) additive, the model's dtype
    prefix: list[tuple[torch.Tensor, torch.Tensor] | None]  # per upper layer: cached (keys, values) (B, kvh, P, hd),
    # or (U, kvh, P, hd) with prefix_index
    target_seq: torch.Tensor  # (n,) member index of each answer position
    target_pos: torch.Tensor  # (n,) position within the live positions
    prefix_index: torch.Tensor | None = None
    """(B,) int64: member b's row of the ``prefix`` tensors, which then hold one row per distinct
    prefix (U, kvh, P, hd); None: row b is member b's."""
    tail: int = 0
    """The last ``tail`` live positions hold every answer position of the group (0: all of them):
    the last decoder layer computes its outputs there only."""

    def head(self, k: int, targets: torch.Tensor) -> tuple["GroupInputs", torch.Tensor]:
        """The first ``k`` members of the group (and their answer tokens of ``targets`` (n,)): a
        sample with the same layout (contiguous slices along the members), for checks."""
        if k >= len(self.lower):
            return self, targets
        keep = self.target_seq < k

        def first(t):
            return None if t is None else t[:k]

        shared = self.prefix_index is not None  # the prefix rows stay whole: the index is per member
        return GroupInputs(
            lower=first(self.lower), table_e=first(self.table_e), fixed_e=first(self.fixed_e), slot=first(self.slot),
            hit=first(self.hit), upper_e={i: first(e) for i, e in self.upper_e.items()}, cos=first(self.cos),
            sin=first(self.sin), mask=first(self.mask),
            prefix=[kv if kv is None or shared else (first(kv[0]), first(kv[1])) for kv in self.prefix],
            target_seq=self.target_seq[keep], target_pos=self.target_pos[keep],
            prefix_index=first(self.prefix_index), tail=self.tail), targets[keep]

    def take(self, members: torch.Tensor, answers: torch.Tensor, target_seq: torch.Tensor) -> "GroupInputs":
        """A group of some of these members: ``members`` (k,) int64, ascending indices of the
        members kept; ``answers`` (m,) int64, the indices (into ``target_seq``/``target_pos``) of
        their answer positions, in order; ``target_seq`` (m,) their member indices in the new
        group. A prefix read through ``prefix_index`` stays whole (the index is narrowed);
        one held per member is narrowed with the members (a copy). Used by the per-user stop
        (``CompileOptions.stop_per_user``), which drops the members of users that cleared the bar."""

        def rows(t):
            return None if t is None else t[members]

        if self.prefix_index is not None:
            prefix, index = self.prefix, self.prefix_index[members]
        else:
            prefix, index = [kv if kv is None else (kv[0][members], kv[1][members]) for kv in self.prefix], None
        return GroupInputs(
            lower=rows(self.lower), table_e=rows(self.table_e), fixed_e=rows(self.fixed_e), slot=rows(self.slot),
            hit=rows(self.hit), upper_e={i: rows(e) for i, e in self.upper_e.items()}, cos=rows(self.cos),
            sin=rows(self.sin), mask=rows(self.mask), prefix=prefix, target_seq=target_seq,
            target_pos=self.target_pos[answers], prefix_index=index, tail=self.tail)


def supported(model: torch.nn.Module, memory, write_layer: int) -> str | None:
    """Why the plain step cannot run this model (None: it can)."""
    if getattr(getattr(model, "config", None), "model_type", None) not in {"llama", "qwen2", "mistral", "qwen3"}:
        return "not a Llama-style model"
    backbone, layers = backbone_and_layers(model)
    if not all(hasattr(backbone, name) for name in ("rotary_emb", "norm")):
        return "backbone has no rotary_emb/norm"
    for layer in list(layers)[write_layer:]:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return "decoder layer without the Llama attention projections"
        if getattr(attn, "sliding_window", None):
            return "sliding-window attention"
    for index in memory.config.layers:
        if index >= write_layer and not memory.layer(index).conv_is_zero:
            return "a trained short conv above the write layer"
    return None


def _rotary(layer: torch.nn.Module):
    """The model family's own ``apply_rotary_pos_emb``."""
    return sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb


def _rows_times(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, h, m, D) x (B, h, n, D) -> (B, h, m, n) scores. Compiled, as products and sums: per
    sequence this is a few rows against a few keys, which batched GEMM kernels run far below
    memory bandwidth and which the compiler fuses into one pass over the keys."""
    if torch.compiler.is_compiling():
        return (q.unsqueeze(3) * k.unsqueeze(2)).sum(-1)
    return torch.matmul(q, k.transpose(2, 3))


def _weighted(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, h, m, n) weights x (B, h, n, D) values -> (B, h, m, D), as :func:`_rows_times`."""
    if torch.compiler.is_compiling():
        return (w.unsqueeze(-1) * v.unsqueeze(2)).sum(-2)
    return torch.matmul(w, v)


def inductor_options(deterministic: bool = False, emulate_precision_casts: bool = False) -> dict | None:
    """``torch.compile(options=...)`` for this module's compiled functions (Inductor config keys
    this torch has; None when there are none).

    ``deterministic``: ``torch._inductor.config.deterministic``, which skips the on-device timing
    Inductor may otherwise use to pick a kernel's configuration (block sizes, warps) where that
    choice changes numerics. Torch 2.13 already filters reduction configurations under
    ``torch.use_deterministic_algorithms`` (which the compiler sets); this also turns off the
    remaining tuning by timing. Set where ``CompileOptions.deterministic`` is (invariant 6: a rerun
    publishes the same bytes); absent from older torches (2.11), where nothing is set. On an H200
    two cold compiles with a stop gave different deltas once (bench/RESULTS.md, 2026-12-02), not
    reproduced on one machine since (2026-12-03).
    ``emulate_precision_casts``: round to the model's dtype after every op, as eager does."""
    config = torch._inductor.config
    options = {}
    if deterministic and hasattr(config, "deterministic"):
        options["deterministic"] = True
    if emulate_precision_casts and hasattr(config, "emulate_precision_casts"):
        options["emulate_precision_casts"] = True
    return options or None


class UpperStep:
    """The step function of a model from its write layer up (shared by all groups and batches)."""

    def __init__(self, em, compiled: bool = False, prefix_kernel: bool = True, margins: bool = False,
                 deterministic: bool = False, each_margin: bool = False):
        self.em = em
        self.margins = margins  # the step also gives its least answer margin (CompileOptions.stop_margin)
        self.each_margin = margins and each_margin  # ... or each answer's (CompileOptions.stop_per_user)
        self.write_layer = em.config.target_layer
        backbone, layers = backbone_and_layers(em.model)
        self.backbone = backbone
        self.layers = list(layers)[self.write_layer:]
        self.rotary = _rotary(self.layers[0])
        self.engram = {i: em.memory.layer(i) for i in em.config.layers if i >= self.write_layer}
        self.prefix_kernel = prefix_kernel  # compiled, on CUDA: attention by prefix_kernels (Triton)
        self._eager = self._loss_margin_eager if margins else self._loss_eager
        self.compile_options = inductor_options(deterministic=deterministic)
        self._compiled = torch.compile(self._eager, dynamic=True, options=self.compile_options) if compiled else None
        self._compiled_checked = False

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def reads_shared_prefix(self, like: torch.Tensor) -> bool:
        """Whether the steps read a prefix shared by several members in place (the compiled step's
        attention kernel on ``like``'s device); else a shared prefix is gathered to one row per
        member once (:class:`GroupInputs` with ``prefix_index`` still runs, gathering on every call)."""
        return self._compiled is not None and self.prefix_kernel and prefix_kernels.available(like)

    def check_compiled(self, groups: list[tuple[GroupInputs, torch.Tensor]], values: torch.Tensor,
                       tolerance: float, sample: int | None = None) -> None:
        """Once: the compiled step must give the uncompiled step's loss at ``values`` and its
        gradient at zero values (relative L2, up to ``tolerance``), on the first ``sample`` members
        of each group (None: all; the uncompiled step's logits and activations on a whole group
        are what ran four processes sharing an H200 out of memory at warm-up); a compile that
        fails or differs is dropped, with a warning. (At zero values the gate's input is the table row
        alone and the rows' gradient is well conditioned; near a trained start most answers are
        already likely, so the gradient is small and mostly the model dtype's rounding.)"""
        if self._compiled is None or self._compiled_checked:
            return
        self._compiled_checked = True
        try:
            for g, targets in groups:
                if sample is not None:
                    g, targets = g.head(sample, targets)
                loss, _, margin = self._grad(self._compiled, g, values, targets)
                want_loss, _, want_margin = self._grad(self._eager, g, values, targets)
                zero = torch.zeros_like(values)
                _, grad, _ = self._grad(self._compiled, g, zero, targets)
                _, want_grad, _ = self._grad(self._eager, g, zero, targets)
                relative = float((loss - want_loss).abs() / want_loss.abs().clamp_min(1e-6))
                grad_relative = float((grad - want_grad).norm() / want_grad.norm().clamp_min(1e-12))
                # The least answer margin (a difference of two logits, which may be ~0: relative to
                # at least 1). Not each position's (each_margin): on an H200 (d768, bf16) the two
                # forms' roundings moved single margins by 0.25-1.4 of themselves (or of 1).
                margin_off = 0.0 if margin is None else float(
                    (margin.amin() - want_margin.amin()).abs() / want_margin.amin().abs().clamp_min(1.0))
                if not (relative <= tolerance and grad_relative <= tolerance and margin_off <= tolerance):
                    raise ValueError(f"the compiled step differs from the uncompiled one: loss by {relative:.2e}, "
                                     f"gradient by {grad_relative:.2e} (relative), least margin by {margin_off:.2e}")
            log.info("compiler: the plain step runs compiled (torch.compile)")
        except Exception as error:  # a compiler error of any kind: keep the uncompiled step
            log.warning("compiler: torch.compile of the plain step not used: %s: %s", type(error).__name__,
                        str(error).splitlines()[0] if str(error) else "")
            self._compiled = None

    def backward(self, g: GroupInputs, values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """:meth:`loss` and its backward into ``values.grad`` (under :data:`COMPILED_CALLS`: the
        compiled graph's backward may compile too) -> the loss, detached. With ``margins``:
        ``(loss, margin)``: the least answer margin, a float32 scalar, or with ``each_margin`` each
        answer position's (n,) float32 (see :meth:`_loss_margin_eager`)."""
        with COMPILED_CALLS, torch.enable_grad():
            out = self.loss(g, values, targets)
            loss, margin = out if self.margins else (out, None)
            loss.backward()
        return (loss.detach(), margin.detach()) if self.margins else loss.detach()

    def _grad(self, fn, g: GroupInputs, values: torch.Tensor, targets: torch.Tensor):
        """-> (loss, gradient of ``values``, answer margin(s) or None), all detached."""
        with COMPILED_CALLS, torch.enable_grad():
            v = values.detach().clone().requires_grad_(True)
            out = self._call(fn, g, F.embedding(g.slot, v), targets)
            loss, margin = out if self.margins else (out, None)
            loss.backward()
        return loss.detach(), v.grad, None if margin is None else margin.detach()

    # -- per group, once -------------------------------------------------------------------------
    def rope(self, lower: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone.rotary_emb(lower, position_ids=positions)

    @staticmethod
    def mask(prefix_valid: torch.Tensor | None, suffix_valid: torch.Tensor, dtype: torch.dtype,
             diagonal: bool = False) -> torch.Tensor:
        """(B, 1, S, P + S) additive: a live position sees the valid prefix and the valid live
        positions up to itself (the dtype's minimum elsewhere, as transformers' eager mask);
        ``diagonal``: every position also sees itself, valid or not."""
        B, S = suffix_valid.shape
        causal = torch.ones(S, S, dtype=torch.bool, device=suffix_valid.device).tril()
        allowed = causal.unsqueeze(0) & suffix_valid.bool().unsqueeze(1)  # (B, S, S)
        if diagonal:
            allowed = allowed | torch.eye(S, dtype=torch.bool, device=suffix_valid.device)
        if prefix_valid is not None:
            allowed = torch.cat([prefix_valid.bool().unsqueeze(1).expand(B, S, -1), allowed], dim=2)
        out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return out.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)

    # -- per step ---------------------------------------------------------------------------------
    def loss(self, g: GroupInputs, values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the group's answer tokens with trainable ``values`` (K, w)."""
        picked = F.embedding(g.slot, values)  # outside the compiled graph: a deterministic backward
        if self._compiled is not None:
            try:
                with COMPILED_CALLS:
                    return self._call(self._compiled, g, picked, targets)
            except torch.OutOfMemoryError:
                raise  # the batch is too large for the device, compiled or not: not a compiler problem
            except Exception as error:  # e.g. a new shape the compiler cannot take: keep going uncompiled
                log.warning("compiler: torch.compile of the plain step failed (%s: %s); running it uncompiled",
                            type(error).__name__, str(error).splitlines()[0] if str(error) else "")
                self._compiled = None
        return self._call(self._eager, g, picked, targets)

    @staticmethod
    def _args(g: GroupInputs, picked: torch.Tensor) -> tuple:
        """The step's inputs as plain arguments (what ``torch.compile`` guards on and traces)."""
        return (picked, g.hit, g.lower, g.table_e, g.fixed_e, tuple(g.upper_e.items()), g.cos, g.sin,
                g.mask, tuple(g.prefix), g.prefix_index, g.tail, g.target_seq, g.target_pos)

    def _call(self, fn, g: GroupInputs, picked: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return fn(*self._args(g, picked), targets)

    def logits(self, g: GroupInputs, values: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden(*self._args(g, F.embedding(g.slot, values)))
        return self.em.lm_head(hidden).float()

    def _loss_eager(self, picked, hit, lower, table_e, fixed_e, upper_e, cos, sin, mask, prefix, prefix_index, tail,
                    target_seq, target_pos, targets):
        hidden = self._hidden(picked, hit, lower, table_e, fixed_e, upper_e, cos, sin, mask, prefix, prefix_index, tail,
                              target_seq, target_pos)
        logits = self.em.lm_head(hidden).float()
        return F.cross_entropy(logits, targets, reduction="sum")

    def _loss_margin_eager(self, picked, hit, lower, table_e, fixed_e, upper_e, cos, sin, mask, prefix, prefix_index,
                           tail, target_seq, target_pos, targets):
        """:meth:`_loss_eager` and the least margin over the group's answer tokens: the answer's
        logit minus the best other token's, in float32 from the same logits (the margin of
        :meth:`engram_core.compiler._Batch.check`, which verifies with the stored float16 rows and
        transformers' forward). A scalar: the batch-wide stop asks whether every answer clears a
        bar. With ``each_margin``, each answer's (n,): the per-user stop asks it per user."""
        hidden = self._hidden(picked, hit, lower, table_e, fixed_e, upper_e, cos, sin, mask, prefix, prefix_index, tail,
                              target_seq, target_pos)
        logits = self.em.lm_head(hidden).float()
        loss = F.cross_entropy(logits, targets, reduction="sum")
        with torch.no_grad():
            target_logit = logits.gather(1, targets.view(-1, 1)).squeeze(1)
            best_other = logits.scatter(1, targets.view(-1, 1), float("-inf")).amax(1)
            margin = target_logit - best_other
            if not self.each_margin:
                margin = margin.amin()  # a group has at least one answer token
        return loss, margin

    def _hidden(self, picked, hit, lower, table_e, fixed_e, upper_e, cos, sin, mask, prefix, prefix_index, tail,
                target_seq, target_pos):
        trained = picked * hit.unsqueeze(-1).to(picked.dtype)  # as Overlay.lookup: owners summed in float32
        if fixed_e is not None:
            trained = trained + fixed_e
        e = table_e + trained.to(table_e.dtype)
        h = lower + self.engram[self.write_layer].mix(lower, e, conv=False)
        upper = dict(upper_e)
        S, last = lower.shape[1], len(self.layers) - 1
        for offset, layer in enumerate(self.layers):
            index = self.write_layer + offset
            if offset and index in upper:
                h = h + self.engram[index].mix(h, upper[index], conv=False)
            h = decoder_layer(layer, self.rotary, h, cos, sin, mask, prefix[offset], self.prefix_kernel,
                              prefix_index=prefix_index, tail=tail if offset == last else 0)[0]
        h = self.backbone.norm(h)
        return h[target_seq, target_pos - (S - h.shape[1])]  # the last layer's output: its last positions


def decoder_layer(layer, rotary, h, cos, sin, mask, prefix, prefix_kernel: bool, attention_only: bool = False,
                  prefix_index: torch.Tensor | None = None, tail: int = 0):
    """One Llama-style decoder layer on ``h`` (B, S, d) whose positions attend to ``prefix``
    (cached (keys, values), (B, kvh, P, hd), or None) and causally to themselves under ``mask``
    (B, 1, S, P + S) additive. Returns ``(h, k, v)``: the layer's output and the positions' own
    keys (after the rotary embedding) and values, (B, kvh, S, hd), as transformers caches them.
    ``attention_only``: the keys and values alone (``h`` is returned unchanged).
    ``prefix_index`` (B,) int64: sequence b's row of the prefix tensors, which hold one row per
    distinct prefix (U, kvh, P, hd). ``tail`` (0 < tail < S): the output at the last ``tail``
    positions only, (B, tail, d) (their queries attend to every position's keys)."""
    attn = layer.self_attn
    B, S, _ = h.shape
    R = tail if 0 < tail < S else S  # query positions: the last R
    x = layer.input_layernorm(h)
    shape = (B, S, -1, attn.head_dim)
    q = attn.q_proj(x if R == S else x[:, S - R:]).view(B, R, -1, attn.head_dim)
    k = attn.k_proj(x).view(shape)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head norms before rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    if R == S:
        q, k = rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    else:  # the angles of the query positions for the queries
        k = rotary(k.transpose(1, 2), k.transpose(1, 2), cos, sin)[0]
        q = rotary(q.transpose(1, 2), q.transpose(1, 2), cos[:, S - R:], sin[:, S - R:])[0]
        mask = mask[:, :, S - R:]
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    if attention_only:
        return h, k, v
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[3]
    G = Hq // Hkv
    qg = q.reshape(B, Hkv, G * R, D)  # query head h reads key/value head h // G
    pk, pv = prefix if prefix is not None else (None, None)
    if prefix_kernel and torch.compiler.is_compiling() and prefix_kernels.available(h):
        # Compiled on CUDA: one Triton kernel (inductor's fusion of this attention recomputed the
        # softmax per output element and read the prefix at a tenth of memory bandwidth).
        if pk is None:  # a group that recomputes its whole trigger: no cached prefix
            pk = pv = k.new_empty(B, Hkv, 0, D)
            prefix_index = None
        out = prefix_kernels.attention(qg, k, v, pk, pv, mask, attn.scaling, prefix_index)
    else:
        if pk is not None and prefix_index is not None:  # one row per sequence (the kernel reads them in place)
            pk, pv = pk[prefix_index], pv[prefix_index]
        scores = _rows_times(qg, k).view(B, Hq, R, S)
        if pk is not None:
            scores = torch.cat([_rows_times(qg, pk).view(B, Hq, R, pk.shape[2]), scores], dim=-1)
        weights = F.softmax(scores * attn.scaling + mask, dim=-1, dtype=torch.float32).to(q.dtype)
        w = weights.view(B, Hkv, G * R, -1)
        out = _weighted(w[..., -S:], v)
        if pk is not None:
            out = _weighted(w[..., :-S], pv) + out
    out = out.view(B, Hq, R, D).transpose(1, 2).reshape(B, R, Hq * D)
    h = (h if R == S else h[:, S - R:]) + attn.o_proj(out)
    return h + layer.mlp(layer.post_attention_layernorm(h)), k, v


def lower_supported(model: torch.nn.Module, memory, write_layer: int) -> str | None:
    """Why :class:`LowerForward` cannot run this model (None: it can): besides what the plain
    step needs (:func:`supported`), every decoder layer must be Llama-style without a sliding
    window, the backbone must embed with ``embed_tokens`` alone, and no Engram layer may have a
    trained short conv (it mixes positions across the prefix and the live positions)."""
    why_not = supported(model, memory, write_layer)
    if why_not is not None:
        return why_not
    backbone, layers = backbone_and_layers(model)
    if not isinstance(getattr(backbone, "embed_tokens", None), torch.nn.Embedding):
        return "backbone has no embed_tokens"
    if getattr(getattr(model, "config", None), "model_type", None) == "gemma":  # scales its embeddings
        return "scaled embeddings"
    for layer in list(layers)[:write_layer]:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return "decoder layer without the Llama attention projections"
        if getattr(attn, "sliding_window", None):
            return "sliding-window attention"
    if not all(memory.layer(index).conv_is_zero for index in memory.config.layers):
        return "a trained short conv"
    return None


class LowerForward:
    """The compile's two forwards that do not depend on the trainable rows, as plain tensor code
    (the decoder layers of :func:`decoder_layer`, the model's own modules):

    * :meth:`prefix_cache`: the prefix (B, P) through every decoder layer, keeping each layer's
      keys and values: the KV cache that the steps and the verification read (the last layer's
      attention output and MLP are not computed: only its keys and values are read);
    * :meth:`lower`: the live positions (B, S), attending to that cache, through the layers
      below the write layer: the hidden states entering it.

    transformers' forward did the same work with its eager attention (batched matmuls of a few
    rows, far below the GPU's bandwidth) and per-call mask building (bench/RESULTS.md, 2026-12-01
    fifth session: 0.68 s of a 65,536-fact batch's 1.9 s of GPU time on an H200). Compiled with the
    step (``compiled=True``), the attention runs in :mod:`engram_core.prefix_kernels`' kernel and
    the elementwise work fuses. The compiler checks both forwards against transformers' once per
    model and dtype before using them (``_Batch``'s ``"lower"`` form)."""

    def __init__(self, em, compiled: bool = False, prefix_kernel: bool = True, deterministic: bool = False):
        self.em = em
        self.write_layer = em.config.target_layer
        backbone, layers = backbone_and_layers(em.model)
        self.backbone = backbone
        self.layers = list(layers)
        self.rotary = _rotary(self.layers[0])
        self.engram = {i: em.memory.layer(i) for i in em.config.layers}
        self.prefix_kernel = prefix_kernel
        # Rounded to the model's dtype after every op, as eager runs them (inductor keeps float32
        # between fused ops otherwise). On an H200 (d768) the states were 1.4-1.6e-2 (relative) from
        # transformers' with it, as without: most of that is the attention kernel's float32 scores.
        options = inductor_options(deterministic=deterministic, emulate_precision_casts=True)
        self.compile_options = options
        self._prefix = torch.compile(self._prefix_eager, dynamic=True, options=options) if compiled else self._prefix_eager
        self._lower = torch.compile(self._lower_eager, dynamic=True, options=options) if compiled else self._lower_eager

    @property
    def compiled(self) -> bool:
        return self._prefix is not self._prefix_eager

    def _drop_compiled(self, error: Exception) -> None:
        log.warning("compiler: torch.compile of the prefix forward failed (%s: %s); running it uncompiled",
                    type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        self._prefix, self._lower = self._prefix_eager, self._lower_eager

    def engram_rows(self, rows: dict[int, torch.Tensor], overlay, below: int) -> tuple:
        """``rows``: Engram layer -> (B, S, H) addressed rows -> ((layer, (B, S, H, w) rows as
        read: table plus ``overlay``'s fixed rows), ...) for the Engram layers below ``below``
        that add anything (as the layer hook: an all-zero table without an overlay adds nothing)."""
        out = []
        for index in sorted(self.engram):
            module = self.engram[index]
            touches = overlay is not None and overlay.touches(index)
            if index >= below or (module.table_is_zero and not touches):
                continue
            out.append((index, module.read(rows[index], overlay if touches else None, index)))
        return tuple(out)

    @torch.no_grad()
    def prefix_cache(self, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
                     rows: dict[int, torch.Tensor], overlay=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """ids, valid, positions (B, P); rows: Engram layer -> (B, P, H) -> per decoder layer the
        prefix's (keys, values), (B, kvh, P, hd), as transformers' KV cache holds them. The keys
        and values at invalid (padding) positions differ from transformers' (nothing reads them)."""
        embeds = self.backbone.embed_tokens(ids)
        cos, sin = self.backbone.rotary_emb(embeds, position_ids=positions)
        # A padding query sees itself, so no softmax row is empty (transformers gives it a uniform one).
        mask = UpperStep.mask(None, valid, embeds.dtype, diagonal=True)
        args = (embeds, self.engram_rows(rows, overlay, len(self.layers)), cos, sin, mask)
        if self.compiled:
            try:
                with COMPILED_CALLS:
                    return list(self._prefix(*args))
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # e.g. a shape the compiler cannot take: keep going uncompiled
                self._drop_compiled(error)
        return list(self._prefix_eager(*args))

    @torch.no_grad()
    def lower(self, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor, rows: dict[int, torch.Tensor],
              prefix: list | None, prefix_valid: torch.Tensor | None, overlay=None,
              prefix_index: torch.Tensor | None = None) -> torch.Tensor:
        """ids, valid, positions (B, S) of the live positions; ``prefix``: :meth:`prefix_cache`'s
        output for these sequences (None: no prefix) with its valid mask (B, P) -> (B, S, d) the
        hidden states entering the write layer (before its Engram row is added).
        ``prefix_index`` (B,): sequence b's row of ``prefix`` (one row per distinct prefix)."""
        embeds = self.backbone.embed_tokens(ids)
        cos, sin = self.backbone.rotary_emb(embeds, position_ids=positions)
        mask = UpperStep.mask(prefix_valid, valid, embeds.dtype)
        kv = tuple(prefix[: self.write_layer]) if prefix is not None else (None,) * self.write_layer
        args = (embeds, self.engram_rows(rows, overlay, self.write_layer), cos, sin, mask, kv,
                prefix_index if prefix is not None else None)
        if self.compiled:
            try:
                with COMPILED_CALLS:
                    return self._lower(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:
                self._drop_compiled(error)
        return self._lower_eager(*args)

    def _prefix_eager(self, h, engram_e, cos, sin, mask):
        e_of = dict(engram_e)
        kv = []
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            if index in e_of:
                h = h + self.engram[index].mix(h, e_of[index], conv=False)
            h, k, v = decoder_layer(layer, self.rotary, h, cos, sin, mask, None, self.prefix_kernel,
                                    attention_only=index == last)
            # Contiguous, as transformers' cache (a concatenation) holds them: the steps read them
            # 15 times, and a transposed view would be copied on every read.
            kv.append((k.contiguous(), v.contiguous()))
        return tuple(kv)

    def _lower_eager(self, h, engram_e, cos, sin, mask, kv, prefix_index):
        e_of = dict(engram_e)
        for index in range(self.write_layer):
            if index in e_of:
                h = h + self.engram[index].mix(h, e_of[index], conv=False)
            h = decoder_layer(self.layers[index], self.rotary, h, cos, sin, mask, kv[index], self.prefix_kernel,
                              prefix_index=prefix_index)[0]
        return h
