"""Benchmark: the size of a version's watermark (the ingest ledger) after many log files, with and
without ``max_file_age``.

A log of ``--files`` Parquet files arriving ``--per-day`` a day (every 5 minutes: 288), one night a
day. Each night runs the night's own code on the listing: ``file_horizon``, ``files_to_read`` and
``_Night._watermark`` (the JSON the manifest stores); only the reading of rows is left out. Paths and
identities are those of a local log (``/data/fact-log/day=YYYY-MM-DD/part-NNNNN-<uuid>.parquet``,
size, mtime_ns and ctime_ns). Nothing is deleted from the log (no upstream retention).

    .venv/bin/python bench/ledger_size.py --json
    .venv/bin/python bench/ledger_size.py --files 100000 --ages never 30d 7d
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.nightly import _Night  # noqa: E402
from jobs.spec import NightlySpec  # noqa: E402
from pipeline.ingest import FactFile, FileRead, file_horizon, files_to_read  # noqa: E402

SOURCE = "/data/fact-log"
DAY = timedelta(days=1)


def simulate(files: int, per_day: int, max_file_age: str) -> dict:
    spec = NightlySpec(store="/data/store", fact_log=SOURCE, model="/models/m", max_file_age=max_file_age)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    listed: list[FactFile] = []
    watermark, nights, read, encode_s, decode_s = None, 0, 0, 0.0, 0.0
    while len(listed) < files:
        day = start + nights * DAY
        for i in range(min(per_day, files - len(listed))):
            written = int((day + i * DAY / per_day).timestamp() * 1e9)
            path = f"{SOURCE}/day={day:%Y-%m-%d}/part-{i:05d}-{uuid.UUID(int=len(listed))}.parquet"
            listed.append(FactFile(path, 180_000 + i, written, written + 1_000, root=SOURCE))
        nights += 1
        now = int((day + DAY).timestamp() * 1e9)
        started = time.perf_counter()
        ledger = json.loads(watermark)["files"] if watermark else {}
        decode_s = time.perf_counter() - started
        horizon = file_horizon(listed, ledger, spec.max_file_age_ns(), SOURCE, now_ns=now)
        new, rewritten = files_to_read(listed, ledger, horizon)
        read += len(new) + len(rewritten)
        night = _Night.__new__(_Night)
        night.spec, night.applied, night.horizon = spec, {}, horizon
        night.previous = SimpleNamespace(watermark=watermark, version=nights) if watermark else None
        night.listed = {f.path: f for f in listed}
        night.reads = [FileRead(file=f, rows=1, slices={}) for f in new + rewritten]
        started = time.perf_counter()
        watermark = night._watermark()
        encode_s = time.perf_counter() - started
    entries = len(json.loads(watermark)["files"])
    return {"max_file_age": max_file_age, "files": len(listed), "nights": nights, "files_read": read,
            "ledger_entries": entries, "watermark_bytes": len(watermark.encode()),
            "bytes_per_entry": round(len(watermark.encode()) / max(entries, 1), 1),
            "last_night_decode_ms": round(decode_s * 1e3, 2), "last_night_watermark_ms": round(encode_s * 1e3, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--per-day", type=int, default=288)
    parser.add_argument("--ages", nargs="+", default=["never", "30d", "7d"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = [simulate(args.files, args.per_day, age) for age in args.ages]
    if args.json:
        print(json.dumps(results))
        return
    for r in results:
        print(f"max_file_age {r['max_file_age']:>5}: {r['files']} files over {r['nights']} nights (read {r['files_read']}): "
              f"{r['ledger_entries']} entries, {r['watermark_bytes']:,} bytes ({r['bytes_per_entry']} per entry); "
              f"last night: decode {r['last_night_decode_ms']} ms, watermark {r['last_night_watermark_ms']} ms")


if __name__ == "__main__":
    main()
