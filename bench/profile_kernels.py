"""Kernel-level profile of one d768 compile batch (torch.profiler), for the device tool.

    python bench/profile_kernels.py --facts 16384
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from compile_throughput import load_d768, make_facts  # noqa: E402
from engram_core.compiler import CompileOptions, compile_facts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--attn", default="eager")
    ap.add_argument("--reuse-lower", choices=["on", "off"], default="on")
    args = ap.parse_args()
    em = load_d768(args.attn)
    facts = make_facts(em, args.facts, 16, 20, seed=0)
    opts = CompileOptions(facts_per_batch=args.facts, reuse_lower_layers=args.reuse_lower == "on")
    compile_facts(em, facts, opts)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = compile_facts(em, facts, opts)
        torch.cuda.synchronize()
    print("phases (s, under the profiler):", result.timings)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
