"""The compiled step's warm-up with a cold and a warm per-model cache (pipeline.compile.use_step_cache).

Runs ``--processes`` compile-worker processes one after another on one model, all with the same
``ENGRAM_STEP_CACHE_DIR`` (a fresh folder): the first compiles the step (cold), the later ones
should load it from the cache. Per process: seconds of its first ``compile_facts`` call (the
step's compile, its checks and a small batch), of a second call (no compile), and inductor's and
AOT autograd's cache counters.

    python bench/step_cache.py --json                                  # tiny model, CPU
    python bench/step_cache.py --preset d768 --device cuda --json      # the nightly's GPU model

No asserts on time: results go to bench/RESULTS.md by hand, with date and device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import json, sys, time
sys.path.insert(0, {bench!r})
from torch._dynamo.utils import counters
from compile_throughput import make_facts
from engram_core.compiler import _STEPS, CompileOptions, compile_facts
from pipeline.compile import CompileWorker

model_dir, device, facts_n, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
worker = CompileWorker(model_dir, CompileOptions(compiled_step=True, facts_per_batch=batch), device=device,
                       warm_up=False)  # the first compile_facts call below is the cold compile this measures
facts = make_facts(worker.model, facts_n, 16 if sys.argv[5] == "d768" else 0, 20, seed=0)
t = time.perf_counter()
result = compile_facts(worker.model, facts, worker.options)
first = time.perf_counter() - t
t = time.perf_counter()
compile_facts(worker.model, facts, worker.options)
second = time.perf_counter() - t
print(json.dumps({{"first_call_s": round(first, 2), "second_call_s": round(second, 2), "ok": result.ok,
                  "facts": len(facts), "compiled": [s.compiled for s in _STEPS[worker.model.model].values()],
                  "inductor": {{k: v for k, v in counters["inductor"].items() if "cache" in k}},
                  "aot_autograd": {{k: v for k, v in counters["aot_autograd"].items() if "cache" in k}}}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "d768"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--facts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        if args.preset == "tiny":
            from engram_core.tiny import init_tiny

            init_tiny(model)
        else:
            sys.path.insert(0, str(REPO / "bench"))
            from compile_throughput import build_d768

            model.mkdir()
            build_d768(model)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_"))}
        env["ENGRAM_STEP_CACHE_DIR"] = str(Path(tmp) / "cache")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        script = WORKER.format(bench=str(REPO / "bench"))
        for k in range(args.processes):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", script, str(model), args.device, str(args.facts), str(args.batch),
                                  args.preset], env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"process {k} failed:\n{out.stderr[-3000:]}")
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run["process_wall_s"] = round(time.perf_counter() - t, 1)
            runs.append(run)
            if not args.json:
                print(f"process {k}: {run}")
    if args.json:
        print(json.dumps({"preset": args.preset, "device": args.device, "runs": runs}))


if __name__ == "__main__":
    main()
