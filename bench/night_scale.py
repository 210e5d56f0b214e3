"""Nights at scale: what a full night and an incremental night cost, stage by stage.

Night 1 compiles every user of a synthetic fact log (N users x F facts, random-word triggers,
spread over several log files); night 2 follows after a FRACTION of the users changed one fact.
Each night runs as its own driver process (``engram run nightly --json``) on one Ray cluster that
this script starts (G GPUs, one compile actor per GPU; CPU actors without GPUs), against a local
store whose every read and write is logged (``ENGRAM_STORE_ACCESS_LOG``). Per night it reports:
seconds per stage and wall, the driver's peak RSS (sampled; the driver process only, not its Ray
workers), objects and bytes written to and read from the store (models/ apart; also per key
prefix), and for night 2 how many objects of unchanged shards were read or written (the target
is none). After each night a serving node pulls every shard (``engram pull --json``, its own
process, one cache folder kept between the pulls): objects and bytes it downloaded, everything it
read from the store (CURRENT and manifest too), and its wall time. Each night's ``tasks``: its Ray
task timeline (task_timeline: per kind of task how many ran, their busy seconds, the first start
and last end after the driver started, and when each worker process first ran something);
``--timeline-dir`` also writes the raw events (Chrome trace JSON).

    python bench/night_scale.py --users 2000 --facts-per-user 10 --changed 0.05 --gpus 0 --model tiny --json
    python bench/night_scale.py --users 50000 --facts-per-user 20 --changed 0.05 --gpus 2 --model d768 --json

No asserts on time or memory: results go to bench/RESULTS.md with date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from jobs.synthetic import BASE_TIME  # noqa: E402
from schemas.facts import FACT_LOG_SCHEMA  # noqa: E402


def build_model(kind: str, directory: Path) -> list[str]:
    """Build the checkpoint; returns words of its vocabulary to draw triggers from."""
    if kind == "tiny":
        from engram_core.tiny import init_tiny

        init_tiny(directory)
    else:
        from compile_throughput import build_d768

        directory.mkdir(parents=True, exist_ok=True)
        build_d768(directory)
    return vocabulary_words(directory)


def vocabulary_words(directory: Path) -> list[str]:
    """Words (alphanumeric, 3 letters or more) of the checkpoint's vocabulary, sorted."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer", local_files_only=True)
    special = set(tokenizer.all_special_ids)
    words = [tokenizer.decode([i]).strip() for i in range(len(tokenizer)) if i not in special]
    return sorted({w for w in words if w.isalnum() and len(w) >= 3})


def write_log(directory: Path, day: int, users: np.ndarray, facts_per_user: int, words: list[str],
              trigger_words: int, files: int, seed: int, fact_offset: int = 0) -> int:
    """Random-word facts of ``users`` (one row per user and fact) in ``files`` Parquet files."""
    rng = np.random.default_rng(seed)
    vocab = np.array(words, dtype=object)
    rows = 0
    for part, part_users in enumerate(np.array_split(users, files)):
        n = len(part_users) * facts_per_user
        if n == 0:
            continue
        picks = vocab[rng.integers(0, len(vocab), size=(n, trigger_words + 1))]
        table = pa.table({
            "user_id": pa.array([f"u{u:08d}" for u in np.repeat(part_users, facts_per_user)], pa.string()),
            "fact_id": pa.array([f"f{k + fact_offset}" for k in np.tile(np.arange(facts_per_user), len(part_users))]),
            "op": pa.array(["upsert"] * n),
            "trigger": pa.array([" ".join(p[:-1]) for p in picks]),
            "answer": pa.array([" " + p[-1] for p in picks]),
            "event_time": pa.array([BASE_TIME + timedelta(days=day)] * n, FACT_LOG_SCHEMA.field("event_time").type),
            "scope": pa.nulls(n, pa.string()),
        }, schema=FACT_LOG_SCHEMA)
        path = directory / f"day={day}" / f"part-{part:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        rows += n
    return rows


def listing(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_size for p in store.rglob("*")
            if p.is_file() and not p.name.startswith(".engram-")}


def run_night(spec_path: Path, env: dict, store: Path, access_log: Path, timeline: Path | None = None) -> dict:
    """One night as its own driver process; returns its report plus what it cost."""
    before = listing(store)
    access_log.write_text("")
    start = time.perf_counter()
    started_at = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", "nightly", "--spec", str(spec_path), "--json"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        process = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], process.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"night failed ({proc.returncode}):\n{err[-4000:]}")
    try:
        report = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(f"night printed no JSON report:\n{out[-2000:]}\n{err[-4000:]}") from None
    after = listing(store)
    ops = [line.split(" ", 2) for line in access_log.read_text().splitlines() if line]
    written = {k: s for k, s in after.items() if k not in before and not k.startswith("models/")}
    reads = [(int(size), key) for op, size, key in ops if op == "get" and not key.startswith("models/")]
    return {"report": report, "wall_s": round(wall, 2), "driver_peak_rss_mib": round(peak[0] / 2**20, 1),
            "objects_written": len(written), "bytes_written": sum(written.values()),
            "bytes_written_by_kind": by_prefix(written),
            "objects_read": len(reads), "bytes_read": sum(s for s, _ in reads), "read_keys": {k for _, k in reads},
            "written_keys": set(written), "tasks": _timeline_or_none(started_at, started_at + wall, timeline)}


def _timeline_or_none(start: float, end: float, dump: Path | None) -> dict | None:
    try:
        return task_timeline(start, end, dump)
    except Exception as err:  # noqa: BLE001 - the night's own figures stand without it
        print(f"night_scale: no task timeline ({type(err).__name__}: {err})", file=sys.stderr)
        return None


def task_timeline(start: float, end: float, dump: Path | None = None) -> dict:
    """Where the night's Ray work ran, from the cluster's task events (``ray.timeline()``): per kind
    of task (its name's first word: read, apply, assemble, ...; actor calls by method) how many ran,
    their summed execution seconds, and when the first started and the last ended, in seconds after
    the driver process started; and per worker process the seconds after the driver started at
    which it first ran something (``worker_first_s``: how long the night waited for workers).
    ``dump``: also write the night's events there (Chrome trace JSON, times relative to the driver's
    start), to read in chrome://tracing. A compile actor's last calls may be missing: the pool kills
    its actors at the end of the compile stage, and a killed actor's newest events never reach the
    cluster (compare ``compile`` tasks with the report's ``compile_worker_seconds["chunks"]``)."""
    import ray

    events = [e for e in ray.timeline() if e.get("ph") == "X" and start * 1e6 <= e["ts"] <= end * 1e6]
    if dump is not None:
        dump.write_text(json.dumps([{**e, "ts": e["ts"] - start * 1e6} for e in events]))
    kinds: dict[str, dict] = {}
    first: dict[str, float] = {}
    for e in events:
        at, dur = e["ts"] / 1e6 - start, e["dur"] / 1e6
        if e["tid"].startswith("worker:"):  # not the driver's submit events
            first[e["tid"]] = min(first.get(e["tid"], at), at)
        if not e["cat"].startswith("task::"):
            continue
        name = e["cat"][len("task::"):]
        kind = name.split(".")[-1] if "." in name and " " not in name else name.split(" ")[0]
        k = kinds.setdefault(kind, {"tasks": 0, "busy_s": 0.0, "first_start_s": at, "last_end_s": at + dur,
                                    "workers": set()})
        k["tasks"] += 1
        k["busy_s"] += dur
        k["first_start_s"] = min(k["first_start_s"], at)
        k["last_end_s"] = max(k["last_end_s"], at + dur)
        k["workers"].add(e["tid"])
    out = {kind: {**{n: round(v, 2) if isinstance(v, float) else v for n, v in k.items() if n != "workers"},
                  "workers": len(k["workers"])} for kind, k in sorted(kinds.items(), key=lambda kv: kv[1]["first_start_s"])}
    starts = sorted(first.values())
    return {"kinds": out, "worker_first_s": [round(v, 2) for v in starts]}


def by_prefix(sizes: dict[str, int]) -> dict[str, int]:
    """Bytes per kind of object: objects/<kind>, stats/<table>, manifests, audit, ..."""
    out: dict[str, int] = {}
    for key, size in sizes.items():
        parts = key.split("/")
        kind = "/".join(parts[:2]) if parts[0] in ("objects", "stats") else parts[0]
        out[kind] = out.get(kind, 0) + size
    return dict(sorted(out.items()))


def run_pull(store: Path, model: Path, cache: Path, env: dict, access_log: Path) -> dict:
    """One serving node's pull of every shard, as its own process (``engram pull --json``)."""
    access_log.write_text("")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "pull", "--store", str(store), "--model", str(model),
                           "--cache-dir", str(cache), "--json"], cwd=ROOT, env=dict(env, ENGRAM_STORE_ACCESS_LOG=str(access_log)),
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"pull failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ops = [line.split(" ", 2) for line in access_log.read_text().splitlines() if line]
    reads = [int(size) for op, size, key in ops if op == "get" and not key.startswith("models/")]
    return {"wall_s": round(wall, 2), "downloaded_objects": report["downloaded_objects"],
            "downloaded_bytes": report["downloaded_bytes"], "layers_applied": report["layers_applied"],
            "evicted_objects": report["evicted_objects"], "bytes_read": sum(reads), "users": report["users"],
            "error": report["error"]}


def manifest(store: Path, version: int) -> dict:
    return json.loads((store / "manifests" / f"v{version:08d}.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--facts-per-user", type=int, default=10)
    ap.add_argument("--changed", type=float, default=0.05,
                    help="fraction of users changing one fact in each night after the first (0: night 1 only)")
    ap.add_argument("--nights", type=int, default=2, help="nights in all (each after the first: another random FRACTION)")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs of the Ray cluster (one compile actor each)")
    ap.add_argument("--workers", type=int, default=None, help="compile actors (default: GPUs, or 2 on CPU); more than --gpus: actors share the GPUs "
                         "(the spec's gpus_per_worker = GPUs / workers)")
    ap.add_argument("--model", choices=["tiny", "d768"], default="tiny")
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--files", type=int, default=None, help="log files of night 1 (default: one per 50,000 facts)")
    ap.add_argument("--apply-in-flight", type=int, default=None,
                    help="the spec's apply_in_flight: apply tasks running at once (default: by the night's rows)")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the Ray cluster (default: this machine's)")
    ap.add_argument("--facts-per-batch", type=int, default=None)
    ap.add_argument("--batches-per-chunk", type=int, default=None)
    ap.add_argument("--min-chunks", type=int, default=None,
                    help="the spec's min_chunks: a small night is cut into at least this many chunks (default: the "
                         "compile actors)")
    ap.add_argument("--trigger-words", type=int, default=None)
    ap.add_argument("--compile", action="append", default=[], metavar="KEY=VALUE",
                    help="a compile override of the job spec (CompileOptions field), e.g. compiled_step=true; "
                         "repeatable")
    ap.add_argument("--workdir", type=Path, default=None, help="keep model, log and store here")
    ap.add_argument("--timeline-dir", type=Path, default=None,
                    help="write each night's Ray task events there (timeline-night<N>.json, Chrome trace format)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    gpu = args.gpus > 0
    facts_per_batch = args.facts_per_batch or (32768 if gpu else 4096)
    batches_per_chunk = args.batches_per_chunk or (4 if gpu else 1)
    trigger_words = args.trigger_words or (16 if args.model == "d768" else 6)
    workers = args.workers or (args.gpus if gpu else 2)
    facts = args.users * args.facts_per_user
    files = args.files or max(1, facts // 50_000)

    import ray

    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    root = args.workdir or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    for old in ("model", "store", "log", "node-cache", "store-access.log", "pull-access.log"):  # a kept workdir's last run
        path = root / old
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    words = build_model(args.model, root / "model")
    users = np.arange(args.users)
    write_log(root / "log", 1, users, args.facts_per_user, words, trigger_words, files, seed=0)
    setup_s = time.perf_counter() - t0
    access_log = root / "store-access.log"
    os.environ["ENGRAM_STORE_ACCESS_LOG"] = str(access_log)  # before ray.init: the cluster's workers log too
    ray.init(num_cpus=args.cpus or os.cpu_count(), num_gpus=args.gpus, include_dashboard=False, log_to_driver=False)
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, ENGRAM_STORE_ACCESS_LOG=str(access_log),
               TOKENIZERS_PARALLELISM="false")
    spec = {"store": str(root / "store"), "fact_log": str(root / "log"), "model": str(root / "model"),
            "num_shards": args.shards, "workers": workers, "batches_per_chunk": batches_per_chunk,
            "min_chunks": args.min_chunks or workers, "apply_in_flight": args.apply_in_flight,
            "gpus_per_worker": min(1.0, args.gpus / workers) if gpu else 0,  # more workers than GPUs: actors share them
            "compile": {"facts_per_batch": facts_per_batch, **dict(_override(o) for o in args.compile)}}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    pull_log = root / "pull-access.log"

    def night() -> dict:
        dump = None
        if args.timeline_dir:
            args.timeline_dir.mkdir(parents=True, exist_ok=True)
            dump = args.timeline_dir / f"timeline-night{len(nights) + 1}.json"
        result = run_night(root / "spec.yaml", env, root / "store", access_log, dump)
        result["pull"] = run_pull(root / "store", root / "model", root / "node-cache", env, pull_log)
        return result

    nights: list[dict] = []
    nights.append(night())

    def keys_of(entries: list[dict]) -> set[str]:
        return {e[k] for e in entries for k in ("bundle_key", "state_key", "tombstones_key")} | {
            v for e in entries for v in e["stats"].values()} | {
            k for e in entries for layer in e["layers"] for k in [layer["key"], *layer["stats"].values()]} | {
            layer[k] for e in entries for layer in e["state_layers"] for k in ("state_key", "tombstones_key")}

    for day in range(2, args.nights + 1) if args.changed > 0 else ():
        rng = np.random.default_rng(day - 1)
        changed = np.sort(rng.choice(users, size=max(1, int(args.users * args.changed)), replace=False))
        # fact f0 of each changed user gets a new text
        write_log(root / "log", day, changed, 1, words, trigger_words, 1, seed=day)
        before = nights[-1]["report"]["version"]
        nights.append(night())
        old, new = manifest(root / "store", before), manifest(root / "store", nights[-1]["report"]["version"])
        unchanged = [a for a, b in zip(old["shards"], new["shards"]) if a == b]
        changed_entries = [b for a, b in zip(old["shards"], new["shards"]) if a != b]
        # objects only unchanged shards name (equal content, e.g. an empty collisions part, is one object)
        keys = keys_of(unchanged) - keys_of(changed_entries)
        nights[-1]["unchanged_shards"] = len(unchanged)
        nights[-1]["unchanged_shard_objects_read"] = len(keys & nights[-1]["read_keys"])
        nights[-1]["unchanged_shard_objects_written"] = len(keys & nights[-1]["written_keys"])
        nights[-1]["layers_per_shard"] = max(len(e["layers"]) for e in new["shards"])
        nights[-1]["manifest_bytes"] = (root / "store" / "manifests" / f"v{new['version']:08d}.json").stat().st_size
    ray.shutdown()
    for night in nights:
        night.pop("read_keys")
        night.pop("written_keys")
        report = night.pop("report")
        night.update(version=report["version"], compiled_users=report["compiled_users"], facts_ok=report["facts_ok"],
                     facts_failed=report["facts_failed"], shards_changed=report["shards_changed"],
                     layers_written=report.get("layers_written"), compacted_shards=report.get("compacted_shards"),
                     seconds=report["seconds"], compile_worker_seconds=report.get("compile_worker_seconds"),
                     facts_per_s=round(report["facts_ok"] / night["wall_s"], 1))
        compile_s = report["seconds"].get("compile")
        if compile_s:
            night["compile_facts_per_s"] = round(report["facts_ok"] / compile_s, 1)
    first = nights[0]
    for later in nights[1:]:
        later["wall_share_of_night_1"] = round(later["wall_s"] / first["wall_s"], 3)
        later["bytes_written_share_of_night_1"] = round(later["bytes_written"] / first["bytes_written"], 3)
        later["pull_downloaded_share_of_night_1"] = _share(later["pull"]["downloaded_bytes"],
                                                           first["pull"]["downloaded_bytes"])
        later["pull_read_share_of_night_1"] = _share(later["pull"]["bytes_read"], first["pull"]["bytes_read"])
    out = {"model": args.model, "users": args.users, "facts_per_user": args.facts_per_user, "facts": facts,
           "files": files, "shards": args.shards, "gpus": args.gpus, "workers": workers, "changed": args.changed,
           "facts_per_batch": facts_per_batch, "batches_per_chunk": batches_per_chunk, "min_chunks": spec["min_chunks"],
           "apply_in_flight": args.apply_in_flight,
           "setup_s": round(setup_s, 1),
           "compile": spec["compile"],
           "device": _device(), "nights": nights}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    if tmp is not None:
        tmp.cleanup()


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 3) if whole else None


def _override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--compile``, the value read as YAML (true, 4, 0.1, text)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--compile {text!r}: expected KEY=VALUE, e.g. compiled_step=true")
    return key.strip(), yaml.safe_load(value)


def _device() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    except Exception:  # noqa: BLE001 - a label only
        return "unknown"


if __name__ == "__main__":
    main()
