"""The nightly job on GPU workers: Ray actor pool (num_gpus=1 each), d768 model, one night.

Builds the d768 checkpoint of bench/compile_throughput.py, writes a fact log of random-word
facts (16-token triggers, one-token answers, 20 per user), and runs ``run_nightly`` with one
Ray actor per GPU into a local store. Reports the job's stage times and facts/s.

    python bench/gpu_nightly.py --facts 65536 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from compile_throughput import build_d768, make_facts  # noqa: E402
from engram_core.checkpoint import load_checkpoint  # noqa: E402
from jobs.nightly import run_nightly  # noqa: E402
from jobs.spec import NightlySpec  # noqa: E402
from jobs.synthetic import BASE_TIME, write_fact_log  # noqa: E402
from pipeline.runner import start_ray  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=65536)
    ap.add_argument("--facts-per-batch", type=int, default=32768)
    ap.add_argument("--batches-per-chunk", type=int, default=4, help="NightlySpec.batches_per_chunk")
    ap.add_argument("--compiled-step", action="store_true", help="CompileOptions.compiled_step")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    gpus = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "model").mkdir()
        build_d768(root / "model")
        em = load_checkpoint(root / "model")  # CPU, only to draw words from its tokenizer
        facts = make_facts(em, args.facts, 16, 20, seed=0)
        rows = [{"user_id": f.user_id, "fact_id": f.fact_id, "op": "upsert", "trigger": f.trigger,
                 "answer": f.answer, "event_time": BASE_TIME, "scope": None} for f in facts]
        write_fact_log(rows, root / "log" / "day=1" / "part-0.parquet")
        del em
        start_ray(num_cpus=max(2, gpus * 2))
        spec = NightlySpec(store=str(root / "store"), fact_log=str(root / "log"), model=str(root / "model"),
                           num_shards=16, workers=max(1, gpus), batches_per_chunk=args.batches_per_chunk,
                           compile={"facts_per_batch": args.facts_per_batch, "compiled_step": args.compiled_step})
        start = time.perf_counter()
        report = run_nightly(spec)
        wall = time.perf_counter() - start
    out = {"gpus": gpus, "batches_per_chunk": args.batches_per_chunk, "compiled_step": args.compiled_step, "device": torch.cuda.get_device_name() if gpus else "cpu", "facts": report.facts,
           "facts_ok": report.facts_ok, "facts_failed": report.facts_failed, "wall_s": round(wall, 1),
           "compile_facts_per_s": round(report.facts / report.seconds["compile"], 1),
           "night_facts_per_s": round(report.facts / wall, 1), "seconds": report.seconds}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
