"""The compiled step's Triton attention kernel (live positions to the cached prefix and to
themselves), run on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton
is imported: a subprocess). On a GPU the compiler checks the compiled step that uses it against
the uncompiled step before using it."""

import subprocess
import sys
import textwrap

CHECK = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from engram_core import prefix_kernels
    from engram_core.fast_step import UpperStep

    def reference(qg, k, v, pk, pv, mask, scaling):
        """The uncompiled step's attention (fast_step.decoder_layer), in float32."""
        B, H, M, D = qg.shape
        S, R = k.shape[2], mask.shape[2]  # live keys; query positions (the last R live positions)
        Hq = H * M // R
        P = pk.shape[2]
        scores = torch.cat([(qg @ pk.transpose(2, 3)).view(B, Hq, R, P), (qg @ k.transpose(2, 3)).view(B, Hq, R, S)], -1)
        w = F.softmax(scores * scaling + mask, dim=-1).view(B, H, M, P + S)
        return w[..., :-S] @ pv + w[..., -S:] @ v

    torch.manual_seed(0)
    for B, H, G, S, P, D in [(3, 2, 2, 1, 15, 192), (2, 2, 2, 4, 5, 64), (4, 1, 3, 3, 2, 48), (1, 1, 1, 1, 1, 16), (3, 2, 2, 5, 0, 32),
                             (0, 2, 2, 1, 15, 192)]:
        M = G * S
        q = torch.randn(B, H, M, D, requires_grad=True)
        k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(2))
        pk, pv = torch.randn(B, H, P, D), torch.randn(B, H, P, D)
        # as the step's mask: left padding (sequence b's first b positions are padding) and causal live positions
        valid = torch.ones(B, P + S, dtype=torch.bool)
        for b in range(B):
            valid[b, : min(b, P + S - 1)] = False
        prefix_valid, live_valid = valid[:, :P], valid[:, P:]
        mask = UpperStep.mask(prefix_valid, live_valid, torch.float32)
        scaling = D ** -0.5
        g_out = torch.randn(B, H, M, D)

        def run(attention):
            out = attention(q, k, v, pk, pv, mask, scaling)
            return (out, *torch.autograd.grad((out * g_out).sum(), (q, k, v)))

        got, want = run(prefix_kernels.attention), run(reference)
        for name, x, y in zip(("out", "grad q", "grad k", "grad v"), got, want):
            assert x.shape == y.shape, (name, x.shape, y.shape)
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), (name, (B, H, G, S, P, D), (x - y).abs().max())
    # 16-bit inputs, as the step runs on a GPU: float32 inside, results rounded once. (float16:
    # the interpreter gets bfloat16 arithmetic wrong; the GPU run is checked by the compiler.)
    q, k, v, pk, pv = (torch.randn(2, 2, 2, 192, dtype=torch.float16) for _ in range(5))
    k, v = k[:, :, :1], v[:, :, :1]
    mask = UpperStep.mask(torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool), torch.float16)
    got = prefix_kernels.attention(q, k, v, pk, pv, mask, 0.1)
    want = reference(*(t.float() for t in (q, k, v, pk, pv, mask)), 0.1)
    assert got.dtype == torch.float16 and (got.float() - want).abs().max() <= 2e-3 * want.abs().max()
    # Warps per program: 2 for the step's small tiles, 4 for larger (measured on an H200: same
    # bits, faster); a benchmark's explicit number is used as given.
    assert [prefix_kernels.warps(m) for m in (16, 32, 64, 128)] == [2, 2, 4, 4]
    prefix_kernels.NUM_WARPS.update(forward=4, backward=4)
    assert torch.equal(prefix_kernels.attention(q, k, v, pk, pv, mask, 0.1), got)
    prefix_kernels.NUM_WARPS.update(forward=None, backward=None)

    # Shared prefix rows (``index``: sequence b reads row index[b]) and queries of only the last R
    # live positions (a step's last layer): the same as the prefix gathered per sequence and the
    # mask's and queries' rows of those positions, bit for bit (same kernel arithmetic).
    for B, U, H, G, S, R, P, D in [(5, 2, 2, 2, 1, 1, 15, 64), (4, 3, 2, 2, 4, 1, 5, 32), (3, 1, 1, 3, 3, 2, 2, 48),
                                   (3, 2, 2, 2, 5, 5, 0, 32)]:
        index = torch.randint(0, U, (B,))
        index[:U] = torch.arange(U)
        q = torch.randn(B, H, G * R, D, requires_grad=True)
        k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(2))
        pk, pv = torch.randn(U, H, P, D), torch.randn(U, H, P, D)
        valid = torch.ones(B, P + S, dtype=torch.bool)
        for b in range(B):
            valid[b, : min(b, P + S - 1)] = False
        mask = UpperStep.mask(valid[:, :P], valid[:, P:], torch.float32)[:, :, S - R:]
        g_out = torch.randn(B, H, G * R, D)

        def grads(out):
            return (out, *torch.autograd.grad((out * g_out).sum(), (q, k, v)))

        got = grads(prefix_kernels.attention(q, k, v, pk, pv, mask, 0.125, index))
        gathered = grads(prefix_kernels.attention(q, k, v, pk[index], pv[index], mask, 0.125))
        want = grads(reference(q, k, v, pk[index], pv[index], mask, 0.125))
        for name, x, y, z in zip(("out", "grad q", "grad k", "grad v"), got, gathered, want):
            assert torch.equal(x, y), (name, (B, U, H, G, S, R, P, D))
            assert torch.allclose(x, z, rtol=1e-4, atol=1e-5), (name, (B, U, H, G, S, R, P, D), (x - z).abs().max())
    print("ok")
''')


def test_the_attention_kernel_gives_the_steps_outputs_and_gradients():
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_the_kernels_are_launched_with_the_warps_rule_or_the_number_set():
    """``_launch`` passes ``num_warps``: :func:`prefix_kernels.warps` of the query tile's rows, or
    the number a benchmark set in ``NUM_WARPS`` (Triton's interpreter ignores it, so the check
    above cannot see it; a kernel stand-in records the launch)."""
    import pytest
    import torch

    from engram_core import prefix_kernels

    if prefix_kernels.triton is None:
        pytest.skip("Triton is not installed")
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    def launch(M: int):
        q, k, v, pk, pv = (torch.zeros(3, r, 8) for r in (M, 1, 1, 4, 4))
        prefix_kernels._launch(Recorder(), 1, q, k, v, pk, pv, torch.zeros(3, 1, 1, 5), 0.5, torch.empty_like(q))
        return launches[-1]

    assert launch(2)["num_warps"] == 2 and launch(2)["BLOCK_M"] == 16
    assert launch(40)["num_warps"] == 4 and launch(40)["BLOCK_M"] == 64
    prefix_kernels.NUM_WARPS["backward"] = 8  # the stand-in is not the forward kernel
    try:
        assert launch(2)["num_warps"] == 8
    finally:
        prefix_kernels.NUM_WARPS["backward"] = None
