"""The compiled step's Triton kernels for the attention to the cached prefix, run on the CPU in
Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is imported: a subprocess).
On a GPU the compiler checks the compiled step that uses them against the uncompiled one."""

import subprocess
import sys
import textwrap

CHECK = textwrap.dedent('''
    import torch
    from engram_core import prefix_kernels as pk

    torch.manual_seed(0)
    for B, H, M, P, S, D in [(3, 2, 2, 15, 1, 192), (2, 2, 8, 5, 4, 64), (1, 1, 1, 1, 1, 16), (0, 2, 2, 15, 1, 192)]:
        q = torch.randn(B, H, M, D, dtype=torch.float32, requires_grad=True)
        k = torch.randn(B, H, P, D, dtype=torch.float32)
        v = torch.randn(B, H, P, D, dtype=torch.float32)
        full = torch.randn(B, H, M, P + S, dtype=torch.float32, requires_grad=True)
        w = full[..., :-S]  # as the step: the prefix's columns of the softmax weights (not contiguous)
        g_scores, g_out = torch.randn(B, H, M, P, dtype=torch.float32), torch.randn(B, H, M, D, dtype=torch.float32)

        def run(scores, mix):
            s, o = scores(q, k), mix(w, v)
            dq, dfull = torch.autograd.grad((s * g_scores).sum() + (o * g_out).sum(), (q, full))
            return s, o, dq, dfull

        got = run(pk.prefix_scores, pk.prefix_mix)
        want = run(lambda a, b: a @ b.transpose(-1, -2), lambda a, b: a @ b)
        for name, x, y in zip(("scores", "mix", "grad q", "grad w"), got, want):
            assert x.shape == y.shape, (name, x.shape, y.shape)
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-4), (name, (B, H, M, P, S, D), (x - y).abs().max())
        assert k.grad is None and v.grad is None
    # bfloat16, as the step runs: float32 accumulation, one rounding of the result
    q = torch.randn(4, 2, 2, 192, dtype=torch.bfloat16)
    k = torch.randn(4, 2, 15, 192, dtype=torch.bfloat16)
    exact = q.double() @ k.double().transpose(-1, -2)
    got = pk.prefix_scores(q, k)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, exact.to(torch.bfloat16)) or (got.double() - exact).abs().max() <= exact.abs().max() / 128
    print("ok")
''')


def test_prefix_kernels_give_the_matmuls_values_and_gradients():
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
