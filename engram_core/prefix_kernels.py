"""A Triton kernel for the compiled step's attention (CUDA): the live positions' queries attend
to the cached prefix's keys and values and to the live positions' own, in one pass.

Per sequence and key/value head, ``m`` query rows (query heads per key head x query positions,
usually 2) attend to ``p`` cached prefix keys (about 15) and ``s`` live keys, width ``d``:

    scores = q @ [K_prefix; k]^T * scaling + mask          (m, p + s), float32
    w      = softmax(scores)
    out    = w @ [V_prefix; v]                              (m, d), rounded to the input dtype

The query positions are the last ``r`` of the ``s`` live positions (``r = s`` but in a step's
last decoder layer, where only the positions that predict an answer need an output: mask rows
are those positions'). The prefix rows may be shared: with ``index`` (one int64 per sequence),
sequence ``b`` reads row ``index[b]`` of the prefix tensors, so sequences with one prefix (users
who share a trigger text) read one copy instead of one each (``CompileOptions.dedupe_prefixes``).

The prefix is constant (no gradient); the backward gives the gradients of ``q``, ``k`` and ``v``
by recomputing ``w``. Compiled by inductor, the same math became reductions that recompute the
softmax for every output element and read the prefix at about a tenth of memory bandwidth (half
of a step on an H100, see bench/RESULTS.md); here one program per (sequence, head) reads its
keys and values once, with ``tl.dot`` on tiles padded to 16.

It is a ``torch.library`` custom op with its autograd formula, so ``torch.compile`` calls it as
it is (opaque). The kernel is compiled for each tile size (powers of two of m, p + s and d) and
the model's width d, with m, r, s and p as run-time arguments, so a batch whose groups split
their triggers elsewhere (other prefix lengths) than earlier batches rarely compiles a new one
(Triton still specializes an argument equal to 1 or a multiple of 16; each compile takes about
a second, and Triton caches them on disk). Without Triton (or on a
CPU) nothing here is used: the step keeps its own attention. The compiler checks the compiled step that uses it against the uncompiled step once
per model before using it. With ``TRITON_INTERPRET=1`` it also runs on CPU tensors (the tests).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the step keeps its own attention
    triton = None


def available(t: torch.Tensor) -> bool:
    """Whether the kernel can run on ``t``'s device."""
    return triton is not None and t.is_cuda


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """``tl.dot``, exact for float32 inputs (``IEEE``) instead of TF32."""
        if IEEE:
            out = tl.dot(a, b, input_precision="ieee")
        else:
            out = tl.dot(a, b)
        return out

    @triton.jit
    def _tiles(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, index_ptr, b, heads, sqb, sqm, skb, skj, spb, spj,
               smb, sms, scaling, M, R, S, P,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
               IEEE: tl.constexpr, SHARED: tl.constexpr):
        """The program's query rows, keys, values (prefix rows then live rows) and softmax weights."""
        seq = b // heads
        if SHARED:  # the sequence's row of the shared prefix tensors
            pb = tl.load(index_ptr + seq).to(tl.int64) * heads + b % heads
        else:
            pb = b
        offs_m = tl.arange(0, BLOCK_M)
        offs_j = tl.arange(0, BLOCK_J)
        offs_d = tl.arange(0, BLOCK_D)
        in_d = offs_d[None, :] < D
        q = tl.load(q_ptr + b * sqb + offs_m[:, None] * sqm + offs_d[None, :], mask=(offs_m[:, None] < M) & in_d, other=0.0)
        prefix = (offs_j[:, None] < P) & in_d
        live = (offs_j[:, None] >= P) & (offs_j[:, None] < P + S) & in_d
        at_prefix = pb * spb + offs_j[:, None] * spj + offs_d[None, :]
        at_live = b * skb + tl.maximum(offs_j[:, None] - P, 0) * skj + offs_d[None, :]
        keys = tl.load(pk_ptr + at_prefix, mask=prefix, other=0.0) + tl.load(k_ptr + at_live, mask=live, other=0.0)
        values = tl.load(pv_ptr + at_prefix, mask=prefix, other=0.0) + tl.load(v_ptr + at_live, mask=live, other=0.0)
        scores = _dot(q, tl.trans(keys), IEEE)
        # query row m is query position m % R, live position S - R + m % R (rows are grouped by
        # query head: m = g * R + r); the mask's rows are the query positions'
        additive = tl.load(mask_ptr + seq * smb + (offs_m[:, None] % R) * sms + offs_j[None, :],
                           mask=(offs_m[:, None] < M) & (offs_j[None, :] < P + S), other=0.0).to(tl.float32)
        scores = tl.where(offs_j[None, :] < P + S, scores * scaling + additive, float("-inf"))
        top = tl.max(scores, axis=1)
        w = tl.exp(scores - top[:, None])
        w = w / tl.sum(w, axis=1)[:, None]
        return q, keys, values, w

    @triton.jit
    def _forward_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, index_ptr, out_ptr, heads,
                        sqb, sqm, skb, skj, spb, spj, smb, sms, scaling,
                        M, R, S, P, D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                        SHARED: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)  # (sequence, key/value head), flattened
        q, keys, values, w = _tiles(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, index_ptr, b, heads, sqb, sqm,
                                    skb, skj, spb, spj, smb, sms, scaling, M, R, S, P, D, BLOCK_M, BLOCK_J, BLOCK_D,
                                    IEEE, SHARED)
        out = _dot(w.to(values.dtype), values, IEEE)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(out_ptr + b * sqb + offs_m[:, None] * sqm + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_d[None, :] < D))

    @triton.jit
    def _backward_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, index_ptr, dout_ptr, dq_ptr, dk_ptr, dv_ptr,
                         heads, sqb, sqm, skb, skj, spb, spj, smb, sms, scaling,
                         M, R, S, P, D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
                         SHARED: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        q, keys, values, w = _tiles(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, index_ptr, b, heads, sqb, sqm,
                                    skb, skj, spb, spj, smb, sms, scaling, M, R, S, P, D, BLOCK_M, BLOCK_J, BLOCK_D,
                                    IEEE, SHARED)
        offs_m = tl.arange(0, BLOCK_M)
        offs_j = tl.arange(0, BLOCK_J)
        offs_d = tl.arange(0, BLOCK_D)
        rows = (offs_m[:, None] < M) & (offs_d[None, :] < D)
        dout = tl.load(dout_ptr + b * sqb + offs_m[:, None] * sqm + offs_d[None, :], mask=rows, other=0.0)
        dw = _dot(dout, tl.trans(values), IEEE)
        dscores = w * (dw - tl.sum(w * dw, axis=1)[:, None]) * scaling  # softmax backward, then the scaling
        ds = dscores.to(q.dtype)
        dq = _dot(ds, keys, IEEE)
        dk = _dot(tl.trans(ds), q, IEEE)
        dv = _dot(tl.trans(w.to(dout.dtype)), dout, IEEE)
        tl.store(dq_ptr + b * sqb + offs_m[:, None] * sqm + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=rows)
        live = (offs_j[:, None] >= P) & (offs_j[:, None] < P + S) & (offs_d[None, :] < D)
        at_live = b * skb + tl.maximum(offs_j[:, None] - P, 0) * skj + offs_d[None, :]
        tl.store(dk_ptr + at_live, dk.to(dk_ptr.dtype.element_ty), mask=live)
        tl.store(dv_ptr + at_live, dv.to(dv_ptr.dtype.element_ty), mask=live)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, H, r, c) -> (B*H, r, c), contiguous (the kernel's layout)."""
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3]).contiguous()


NUM_WARPS: dict[str, int | None] = {"forward": None, "backward": None}
"""Warps per program of each kernel; None: :func:`warps` (benchmarks set a number here)."""


def warps(block_m: int) -> int:
    """Warps per program for query tiles of ``block_m`` rows: 2 up to 32 rows, else Triton's
    default 4. Fixed, not autotuned: a choice made per machine could round differently, and a
    chunk compiled twice must give the same bits. Measured on an H200 (``bench/prefix_kernel.py``,
    d768 shapes, bench/RESULTS.md 2026-12-02 eleventh session), 2 warps against 4, same bits at
    every shape: the usual group (65,536 sequences, 2 query rows, 15 cached keys) forward 0.70 vs
    0.91 ms, backward 1.43 vs 1.79 ms; a prefix forward (30 query rows) 1.37 vs 1.73 ms; a group
    recomputing 16 positions (32 rows) backward 0.21 vs 0.23 ms; 8 warps slower at all three.
    Larger tiles (long recomputed triggers) were not measured and keep 4."""
    return 2 if block_m <= 32 else 4


def _launch(kernel, heads: int, q, k, v, pk, pv, mask, scaling, *extra, index=None):
    """q, k, v, pk, pv: flat (B*heads, rows, d), contiguous; mask (B, 1, r, p + s) with one row
    per query position; ``index`` (B,) int64: each sequence's row of ``pk``/``pv`` (None: its own)."""
    M, D = q.shape[1], q.shape[2]
    S, P = k.shape[1], pk.shape[1]
    R = mask.shape[-2]
    if R < 1 or R > S or M % R or mask.shape[-1] != P + S:
        raise ValueError(f"prefix_attention: mask {tuple(mask.shape)} does not fit {M} query rows, {S} live keys and "
                         f"{P} prefix keys (one row per query position, the last of the live positions)")
    if index is not None and P > 0 and index.shape != (q.shape[0] // heads,):
        raise ValueError(f"prefix_attention: index {tuple(index.shape)} is not one row per sequence "
                         f"({q.shape[0] // heads})")
    mask = mask.reshape(-1, R, P + S).contiguous()
    if q.numel() == 0:
        return
    shared = index is not None and P > 0
    H = heads
    block_m = max(triton.next_power_of_2(M), 16)
    kernel[(q.shape[0],)](
        q, k, v, pk, pv, mask, index.contiguous() if shared else mask, *extra, H,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), pk.stride(0), pk.stride(1), mask.stride(0), mask.stride(1),
        float(scaling), M=M, R=R, S=S, P=P, D=D,
        BLOCK_M=block_m, BLOCK_J=max(triton.next_power_of_2(P + S), 16),
        BLOCK_D=max(triton.next_power_of_2(D), 16), IEEE=q.dtype == torch.float32, SHARED=shared,
        num_warps=NUM_WARPS["forward" if kernel is _forward_kernel else "backward"] or warps(block_m))


@torch.library.custom_op("engram::prefix_attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
              mask: torch.Tensor, scaling: float, index: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, m, d) with m = G x r (query head g, query position r: the last r of the live
    positions); k, v (B, H, s, d): the live positions' keys and values; pk, pv (B, H, p, d): the
    prefix's, or with ``index`` (B,) int64 (U, H, p, d): sequence b reads row ``index[b]``; mask
    (B, 1, r, p + s) additive, the query positions' rows -> (B, H, m, d)."""
    B, H, M, D = q.shape
    flat = [_flat(t) for t in (q, k, v, pk, pv)]
    out = torch.empty_like(flat[0])
    _launch(_forward_kernel, H, *flat, mask, scaling, out, index=index)
    return out.view(B, H, M, D)


@torch.library.custom_op("engram::prefix_attention_backward", mutates_args=())
def _attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                        mask: torch.Tensor, scaling: float, dout: torch.Tensor,
                        index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = [_flat(t) for t in (q, k, v, pk, pv)]
    dq, dk, dv = torch.empty_like(flat[0]), torch.empty_like(flat[1]), torch.empty_like(flat[2])
    _launch(_backward_kernel, q.shape[1], *flat, mask, scaling, _flat(dout), dq, dk, dv, index=index)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


@attention.register_fake
def _(q, k, v, pk, pv, mask, scaling, index=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@_attention_backward.register_fake
def _(q, k, v, pk, pv, mask, scaling, dout, index=None):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _save(ctx, inputs, output):
    q, k, v, pk, pv, mask, scaling = inputs[:7]
    index = inputs[7] if len(inputs) > 7 else None
    ctx.save_for_backward(q, k, v, pk, pv, mask, index)
    ctx.scaling = scaling


def _backward(ctx, dout):
    q, k, v, pk, pv, mask, index = ctx.saved_tensors
    dq, dk, dv = _attention_backward(q, k, v, pk, pv, mask, ctx.scaling, dout, index)
    return dq, dk, dv, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_save)
