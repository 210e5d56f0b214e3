"""Per-step cost of the compile step's forms on one d768 batch (device tool), and the kernel
table of each: transformers' forward from the write layer (in-place prefix attention), the
plain step (engram_core.fast_step), and the plain step through torch.compile.

    python bench/profile_step.py --facts 32768 --json

Times with CUDA synchronisation around 15 steps (after a warm-up round of the same form).
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from compile_throughput import load_d768, make_facts  # noqa: E402
from engram_core import fast_step  # noqa: E402
from engram_core.compiler import CompileOptions, _Batch, _deterministic, _validate  # noqa: E402


def batch_of(em, facts, step):
    seqs = [seq for seq, _ in _validate(em, facts, CompileOptions())]
    users = {u: i for i, u in enumerate(sorted({f.user_id for f in facts}))}
    for seq, fact in zip(seqs, facts):
        seq.user = users[fact.user_id]
    return _Batch(em, seqs, len(users), reuse_lower=True, prefix_attention=True, prefix_groups=2, step=step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--forms", nargs="+", default=["transformers", "plain", "compiled"],
                    help="transformers | plain | compiled | compiled_matmul (compiled, prefix attention without the "
                         "Triton kernels); a form named twice runs the second time warm")
    ap.add_argument("--kernels", type=int, default=25, help="rows of each form's kernel table (0: none)")
    ap.add_argument("--attn", default="eager", help="the model's attention implementation (prefix forward)")
    ap.add_argument("--cprofile", action="store_true", help="also a cProfile of each form's batch preparation")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    em = load_d768(args.attn)
    facts = make_facts(em, args.facts, 16, 20, seed=0)
    out = {"facts": args.facts, "steps": args.steps, "device": torch.cuda.get_device_name(), "forms": {}}
    with _deterministic(True):
        steps = {}
        for k, form in enumerate(args.forms):
            kind = form
            if kind not in steps:  # a form named twice runs warm (its compiled graphs kept)
                steps[kind] = None if kind == "transformers" else fast_step.UpperStep(
                    em, compiled=kind.startswith("compiled"), prefix_kernel=kind != "compiled_matmul")
            step = steps[kind]
            torch.cuda.synchronize()
            t = time.perf_counter()
            python = cProfile.Profile() if args.cprofile else None
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                if python:
                    python.enable()
                batch = batch_of(em, facts, step)
                values = batch.initial_values(20.0)
                torch.cuda.synchronize()
                if python:
                    python.disable()
            prepare = time.perf_counter() - t
            if python:
                text = io.StringIO()
                pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(20)
                print(text.getvalue(), file=sys.stderr)
            parts = {e.key: (round(e.cpu_time_total / 1e3, 1), round(e.device_time_total / 1e3, 1))
                     for e in prof.key_averages() if e.key.startswith("engram.")}
            t = time.perf_counter()
            batch.optimize(values, args.steps, 0.1)  # warm-up: checks, compiles
            torch.cuda.synchronize()
            warm = time.perf_counter() - t
            t = time.perf_counter()
            trained = batch.optimize(values, args.steps, 0.1)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t
            ok, _, _ = batch.check(trained, 0.1)
            row = {"prepare_s": round(prepare, 3), "prepare_parts_cpu_gpu_ms": parts, "warm_up_s": round(warm, 2), "ms_per_step": round(1e3 * seconds / args.steps, 2),
                   "plain_in_use": batch.plain, "compiled_in_use": bool(step is not None and step.compiled),
                   "recall_after_one_round": float(ok.mean())}
            if args.kernels:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    batch.optimize(values, 3, 0.1)
                    torch.cuda.synchronize()
                row["kernels"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.kernels,
                                                          max_name_column_width=70)
            out["forms"][f"{k}:{form}"] = row
            print(form, {k: v for k, v in row.items() if k != "kernels"}, file=sys.stderr, flush=True)
            del batch
            torch.cuda.empty_cache()
    if args.json:
        print(json.dumps(out))
    else:
        for form, row in out["forms"].items():
            print(form, {k: v for k, v in row.items() if k != "kernels"})
            print(row.get("kernels", ""))


if __name__ == "__main__":
    main()
