"""The compiled step's attention kernel (:mod:`engram_core.prefix_kernels`) alone, on a GPU: time
of its forward and backward at the shapes a d768 batch runs, for each number of warps per
program, and whether every choice gives the same bits as the default (4).

    python bench/prefix_kernel.py --json

Shapes (d768: 2 key/value heads of width 192, 2 query heads per key head): the usual group (one
live position after a 15-token cached prefix), a group that recomputes its 16-token trigger (no
cached prefix), and the prefix forward (15 positions, no prefix).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engram_core import prefix_kernels as pk_mod  # noqa: E402


def inputs(B: int, S: int, P: int, heads: int = 2, group: int = 2, D: int = 192, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    def r(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)
    q, k, v = r(B, heads, group * S, D), r(B, heads, S, D), r(B, heads, S, D)
    pk, pv = r(B, heads, P, D), r(B, heads, P, D)
    causal = torch.ones(S, S, dtype=torch.bool, device="cuda").tril()
    allowed = torch.cat([torch.ones(S, P, dtype=torch.bool, device="cuda"), causal], dim=1)
    mask = torch.zeros(B, 1, S, P + S, dtype=torch.bfloat16, device="cuda").masked_fill_(~allowed, torch.finfo(torch.bfloat16).min)
    return q, k, v, pk, pv, mask, r(B, heads, group * S, D)


def timed(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    shapes = {"live (S=1, P=15)": (args.batch, 1, 15), "recompute (S=16, P=0)": (args.batch // 16, 16, 0),
              "prefix forward (S=15, P=0)": (args.batch, 15, 0)}
    rows = []
    for name, (B, S, P) in shapes.items():
        q, k, v, pk, pv, mask, dout = inputs(B, S, P)
        scaling = 192 ** -0.5
        reference = None
        for w in args.warps:
            pk_mod.NUM_WARPS.update(forward=w, backward=w)
            fwd = lambda: pk_mod.attention(q, k, v, pk, pv, mask, scaling)  # noqa: E731
            bwd = lambda: pk_mod._attention_backward(q, k, v, pk, pv, mask, scaling, dout)  # noqa: E731
            outs = (fwd(), *bwd())
            if reference is None:
                pk_mod.NUM_WARPS.update(forward=4, backward=4)
                reference = (pk_mod.attention(q, k, v, pk, pv, mask, scaling),
                             *pk_mod._attention_backward(q, k, v, pk, pv, mask, scaling, dout))
                pk_mod.NUM_WARPS.update(forward=w, backward=w)
            same = all(torch.equal(a, b) for a, b in zip(outs, reference))
            read = sum(t.numel() * t.element_size() for t in (q, k, v, pk, pv, mask))
            f_ms, b_ms = timed(fwd, args.repeat), timed(bwd, args.repeat)
            rows.append({"shape": name, "B": B, "warps": w, "forward_ms": round(f_ms, 4), "backward_ms": round(b_ms, 4),
                         "forward_GBps": round(read / f_ms / 1e6, 1), "same_bits_as_4": same})
        pk_mod.NUM_WARPS.update(forward=None, backward=None)
    print(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}) if args.json else
          "\n".join(str(r) for r in rows))


if __name__ == "__main__":
    main()
