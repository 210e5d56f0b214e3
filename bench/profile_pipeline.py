"""Where the time of a multi-batch compile goes on a GPU (device tool): how busy the GPU is over
the wall time (the union of all kernels' intervals, and per CUDA stream), GPU time per
``engram.*`` label, the top kernels, and a cProfile of the host thread that prepares batches.

    python bench/profile_pipeline.py --batches 3 --compiled-step [--overlap] --json
    python bench/profile_pipeline.py --compiled-step --workload templated --stop-margin 12 --json

A warm-up compile of one batch runs first (checks, torch.compile), untimed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from compile_throughput import load_d768, make_facts  # noqa: E402
from engram_core.compiler import CompileOptions, compile_facts  # noqa: E402


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32768)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--compiled-step", action="store_true")
    ap.add_argument("--overlap", action="store_true", help="CompileOptions.overlap_batches")
    ap.add_argument("--steps", type=int, default=CompileOptions.steps, help="CompileOptions.steps")
    ap.add_argument("--prefix-groups", type=int, default=CompileOptions.prefix_groups, help="CompileOptions.prefix_groups")
    ap.add_argument("--no-plain-prefix", action="store_true", help="CompileOptions.plain_prefix off")
    ap.add_argument("--workload", choices=["random", "templated"], default="random",
                    help="compile_throughput.py's workloads: a random trigger per fact, or 20 trigger texts shared by all users")
    ap.add_argument("--dedupe-prefixes", choices=["on", "off"], default="on",
                    help="CompileOptions.dedupe_prefixes (default on, as the library's)")
    ap.add_argument("--stop-margin", type=float, default=None, help="CompileOptions.stop_margin (default off)")
    ap.add_argument("--kernels", type=int, default=30)
    ap.add_argument("--no-torch-profiler", action="store_true",
                    help="cProfile only (the torch profiler slows the host's launches; no GPU figures then)")
    ap.add_argument("--host-lines", type=int, default=25, help="lines of the host profile, by own and by cumulative time")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    em = load_d768("eager")
    facts = make_facts(em, args.batch * (args.batches + 1), 16, 20, seed=0, workload=args.workload)
    options = CompileOptions(facts_per_batch=args.batch, compiled_step=args.compiled_step, steps=args.steps,
                             overlap_batches=args.overlap, plain_prefix=not args.no_plain_prefix,
                             prefix_groups=args.prefix_groups, dedupe_prefixes=args.dedupe_prefixes == "on",
                             stop_margin=args.stop_margin)
    compile_facts(em, facts[: args.batch], options)  # warm-up
    timed = facts[args.batch:]
    torch.cuda.synchronize()
    python = cProfile.Profile()
    with (nullcontext() if args.no_torch_profiler else profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])) as prof:
        start = time.perf_counter()
        python.enable()
        result = compile_facts(em, timed, options)
        torch.cuda.synchronize()
        python.disable()
        wall = time.perf_counter() - start
    text = io.StringIO()
    stats = pstats.Stats(python, stream=text)
    stats.sort_stats("tottime").print_stats(args.host_lines)
    stats.sort_stats("cumulative").print_stats(args.host_lines)
    out = {"facts": len(timed), "wall_s": round(wall, 3), "facts_per_s": round(len(timed) / wall, 1),
           "recall": result.ok / len(timed), "phases_s": result.timings}
    if prof is None:
        out["host_profile"] = text.getvalue()
        _report(out, args.json)
        return
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_stream: dict[str, list] = {}
    for e in kernels:
        by_stream.setdefault(str(getattr(e, "device_resource_id", "?")), []).append((e.time_range.start, e.time_range.end))
    span = (min(e.time_range.start for e in kernels), max(e.time_range.end for e in kernels)) if kernels else (0, 0)
    labels = {e.key: {"cpu_ms": round(e.cpu_time_total / 1e3, 1), "gpu_ms": round(e.device_time_total / 1e3, 1), "calls": e.count}
              for e in prof.key_averages() if e.key.startswith("engram.")}
    out.update({
        "gpu_busy_s": round(union_us([iv for ivs in by_stream.values() for iv in ivs]) / 1e6, 3),
        "kernel_span_s": round((span[1] - span[0]) / 1e6, 3),
        "gpu_busy_by_stream_s": {k: round(union_us(v) / 1e6, 3) for k, v in by_stream.items()},
        "kernels_launched": len(kernels), "labels": labels,
        "top_kernels": prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.kernels, max_name_column_width=60),
        "host_profile": text.getvalue(),
    })
    _report(out, args.json)


def _report(out: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key}:\n{value}" if isinstance(value, str) else f"{key}: {value}")


if __name__ == "__main__":
    main()
