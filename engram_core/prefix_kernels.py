"""Triton kernels for the compiled step's attention to the cached prefix (CUDA).

Per sequence and key/value head, a step attends a few query rows (m: query heads per key head x
live positions, usually 2) to the prefix's few cached keys (p: about 15) of width d:

    scores[m, p] = sum_d q[m, d] * K[p, d]        (:func:`prefix_scores`)
    out[m, d]    = sum_p w[m, p] * V[p, d]        (:func:`prefix_mix`)

The prefix is constant (no gradient), so each one's backward is the other one:
``dq = prefix_mix(dscores, K)`` and ``dw = prefix_scores(dout, V)``. Batched GEMM kernels and
inductor's generated reductions run these shapes at about a tenth of memory bandwidth (half of
a step's time on an H100, see bench/RESULTS.md); here one program per (sequence, head) reads its
K or V tile once, accumulating in float32 and rounding the result to the inputs' dtype, as a
matmul does.

They are ``torch.library`` custom ops, so ``torch.compile`` calls them as they are (opaque),
with their autograd formulas. Without Triton (or on a CPU) nothing here is used: the step keeps
its matmuls. The compiler checks the compiled step, and so these kernels, against the
uncompiled step once per model before using it. With ``TRITON_INTERPRET=1`` they also run on
CPU tensors (the tests do that).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the step keeps its matmuls
    triton = None


def available(t: torch.Tensor) -> bool:
    """Whether the kernels can run on ``t``'s device."""
    return triton is not None and t.is_cuda


if triton is not None:

    @triton.jit
    def _scores_kernel(x_ptr, k_ptr, out_ptr, M: tl.constexpr, P, D,
                       sxb, sxm, skb, skp, sob, som,
                       BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        # out[b, m, p] = sum_d x[b, m, d] * k[b, p, d]   (last dims contiguous)
        b = tl.program_id(0).to(tl.int64)
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        tile = (offs_p[:, None] < P) & (offs_d[None, :] < D)
        k = tl.load(k_ptr + b * skb + offs_p[:, None] * skp + offs_d[None, :], mask=tile, other=0.0).to(tl.float32)
        for m in range(M):
            x = tl.load(x_ptr + b * sxb + m * sxm + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
            s = tl.sum(k * x[None, :], axis=1)
            tl.store(out_ptr + b * sob + m * som + offs_p, s.to(out_ptr.dtype.element_ty), mask=offs_p < P)

    @triton.jit
    def _mix_kernel(y_ptr, k_ptr, out_ptr, M: tl.constexpr, P, D,
                    syb, sym, skb, skp, sob, som,
                    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
        # out[b, m, d] = sum_p y[b, m, p] * k[b, p, d]   (last dims contiguous)
        b = tl.program_id(0).to(tl.int64)
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        tile = (offs_p[:, None] < P) & (offs_d[None, :] < D)
        k = tl.load(k_ptr + b * skb + offs_p[:, None] * skp + offs_d[None, :], mask=tile, other=0.0).to(tl.float32)
        for m in range(M):
            y = tl.load(y_ptr + b * syb + m * sym + offs_p, mask=offs_p < P, other=0.0).to(tl.float32)
            o = tl.sum(k * y[:, None], axis=0)
            tl.store(out_ptr + b * sob + m * som + offs_d, o.to(out_ptr.dtype.element_ty), mask=offs_d < D)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(..., r, c) -> (N, r, c) with a contiguous last dimension."""
    t = t.reshape(-1, t.shape[-2], t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(kernel, x: torch.Tensor, k: torch.Tensor, out_cols: int) -> torch.Tensor:
    batch, m = x.shape[:-2], x.shape[-2]
    p, d = k.shape[-2], k.shape[-1]
    xf, kf = _flat(x), _flat(k)
    out = torch.empty(xf.shape[0], m, out_cols, dtype=x.dtype, device=x.device)
    if xf.shape[0] and m:
        kernel[(xf.shape[0],)](xf, kf, out, m, p, d, xf.stride(0), xf.stride(1), kf.stride(0), kf.stride(1),
                               out.stride(0), out.stride(1),
                               BLOCK_P=max(triton.next_power_of_2(p), 2), BLOCK_D=max(triton.next_power_of_2(d), 16))
    return out.view(*batch, m, out_cols)


@torch.library.custom_op("engram::prefix_scores", mutates_args=())
def prefix_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(..., m, d) x (..., p, d) -> (..., m, p): ``q @ k.transpose(-1, -2)``; no gradient for k."""
    return _launch(_scores_kernel, q, k, k.shape[-2])


@torch.library.custom_op("engram::prefix_mix", mutates_args=())
def prefix_mix(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(..., m, p) x (..., p, d) -> (..., m, d): ``w @ v``; no gradient for v."""
    return _launch(_mix_kernel, w, v, v.shape[-1])


@prefix_scores.register_fake
def _(q, k):
    return q.new_empty(*q.shape[:-1], k.shape[-2])


@prefix_mix.register_fake
def _(w, v):
    return w.new_empty(*w.shape[:-1], v.shape[-1])


def _keep_constant(ctx, inputs, output):
    ctx.constant = inputs[1]


prefix_scores.register_autograd(lambda ctx, grad: (prefix_mix(grad.contiguous(), ctx.constant), None),
                                setup_context=_keep_constant)
prefix_mix.register_autograd(lambda ctx, grad: (prefix_scores(grad.contiguous(), ctx.constant), None),
                             setup_context=_keep_constant)
