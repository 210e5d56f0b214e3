"""The night scales out: shard tasks on every node of a real multi-node Ray cluster, a killed
shard task loses and duplicates nothing, and a shard that fails fails the night before any commit."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import timedelta

import psutil
import pytest

from jobs.nightly import run_nightly
from jobs.spec import NightlySpec
from jobs.synthetic import BASE_TIME, fact_log_rows, write_fact_log
from schemas.bundle import bundle_deltas
from versions.catalog import list_versions, load_shard_bundle, read_current
from versions.errors import IntegrityError
from versions.layout import shard_of
from versions.store import LocalStore

pytestmark = pytest.mark.slow


class TaskWatcher:
    """Records, for each Ray task process seen (titled ``ray::<task name>``), the raylet (node) it
    ran under; optionally SIGKILLs the first one whose title starts with ``kill_prefix``. Only this
    test process's descendants are looked at, so other Ray clusters on the machine are safe."""

    def __init__(self, kill_prefix: str | None = None):
        self.kill_prefix = kill_prefix
        self.seen: dict[str, set[int]] = {}
        self.killed: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TaskWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        me = psutil.Process(os.getpid())
        while not self._stop.is_set():
            for proc in me.children(recursive=True):
                try:
                    title = " ".join(proc.cmdline())
                    if not title.startswith("ray::"):
                        continue
                    name = title[len("ray::"):].strip()
                    self.seen.setdefault(name, set()).add(proc.parent().pid)
                    if self.kill_prefix and not self.killed and name.startswith(self.kill_prefix):
                        os.kill(proc.pid, signal.SIGKILL)
                        self.killed.append(proc.pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
                    continue
            time.sleep(0.01)

    def nodes(self, prefix: str) -> set[int]:
        return {raylet for name, raylets in self.seen.items() if name.startswith(prefix) for raylet in raylets}


def published_users(store) -> list[str]:
    manifest, _ = read_current(store)
    return [u for e in manifest.shards for u in load_shard_bundle(store, e).column("user_id").to_pylist()]


@pytest.fixture
def two_node_cluster():
    """A real Ray cluster of two nodes (two raylets, each with its own object store) on this machine."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_night_on_a_two_node_cluster_runs_shard_tasks_on_both_nodes_against_s3(two_node_cluster, s3_store,
                                                                                  tmp_path, tiny_dir):
    rows = fact_log_rows(16, 2)
    for part in range(4):  # four files: four read tasks
        write_fact_log(rows[part::4], tmp_path / "log" / "day=1" / f"part-{part}.parquet")
    spec = NightlySpec(store=s3_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=8,
                       workers=1, compile={"facts_per_batch": 8})
    with TaskWatcher() as watcher:
        first = run_nightly(spec)
    assert first.published and first.facts_ok == 32 and first.users == 16
    assert sorted(published_users(s3_store)) == sorted({r["user_id"] for r in rows})
    assert len(watcher.nodes("apply shard") | watcher.nodes("assemble shard") | watcher.nodes("read ")) == 2, watcher.seen

    # Night two on the same cluster: one user changes; only that user's shard is assembled again.
    changed = dict(rows[0], answer=" Juniper", event_time=BASE_TIME + timedelta(days=1))
    write_fact_log([changed], tmp_path / "log" / "day=2" / "part-0.parquet")
    before, _ = read_current(s3_store)
    second = run_nightly(spec)
    after, _ = read_current(s3_store)
    shard = shard_of(changed["user_id"], 8)
    assert second.compiled_users == 1 and second.shards_changed == 1
    assert [e.shard for e, b in zip(after.shards, before.shards) if e != b] == [shard]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from pipeline.runner import start_ray

    start_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_a_shard_task_killed_mid_night_loses_and_duplicates_nothing(ray_cluster, tmp_path, tiny_dir):
    rows = fact_log_rows(12, 2)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=str(tmp_path / "store"), fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=4,
                       workers=1)
    with TaskWatcher(kill_prefix="apply shard") as watcher:
        report = run_nightly(spec)
    assert watcher.killed, "no shard task was caught running"
    store = LocalStore(tmp_path / "store")
    assert report.published and report.facts_ok == len(rows)
    assert sorted(published_users(store)) == sorted({r["user_id"] for r in rows})  # each user exactly once
    # What the retried task wrote is what an undisturbed night writes.
    clean = NightlySpec(**{**spec.to_dict(), "store": str(tmp_path / "clean")})
    run_nightly(clean)
    assert read_current(store)[0].shards == read_current(LocalStore(tmp_path / "clean"))[0].shards


def test_a_shard_that_fails_fails_the_night_naming_it_before_anything_is_committed(ray_cluster, tmp_path, tiny_dir):
    rows = fact_log_rows(6, 1)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=str(tmp_path / "store"), fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=1)
    run_nightly(spec)
    store = LocalStore(tmp_path / "store")
    manifest, _ = read_current(store)
    victim = rows[0]["user_id"]
    entry = manifest.shard(shard_of(victim, 2))
    damaged = bytearray(store.get(entry.state_key))
    damaged[len(damaged) // 2] ^= 0xFF
    (store.root / entry.state_key).write_bytes(bytes(damaged))  # bit rot at rest, same size
    write_fact_log([dict(rows[0], answer=" Juniper", event_time=BASE_TIME + timedelta(days=1))],
                   tmp_path / "log" / "day=2" / "part-0.parquet")
    with pytest.raises(IntegrityError, match=entry.state_key) as failure:
        run_nightly(spec)
    assert any(f"apply shard {entry.shard}" in note for note in getattr(failure.value, "__notes__", []))
    assert [v.version for v in list_versions(store)] == [manifest.version]
    assert read_current(store)[0] == manifest
    assert store.list("manifests/") == [manifest.key]  # nothing half-published
    users = bundle_deltas(load_shard_bundle(store, manifest.shard(1 - entry.shard)))
    assert users  # the other shard still reads


def _spans(paths) -> list[tuple[float, float]]:
    return sorted(tuple(map(float, p.read_text().split())) for p in paths)


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    return max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)


def test_windowed_submission_keeps_at_most_the_window_in_flight(ray_cluster, tmp_path):
    from pipeline.runner import RayRunner

    def span(path: str, pause: float) -> str:  # a Ray task that records when it ran
        start = time.time()
        time.sleep(pause)
        with open(path, "w") as f:
            f.write(f"{start} {time.time()}")
        return path

    runner = RayRunner()
    most = {}
    for window in (1, 2):
        handles: dict[int, object] = {}
        paths = [tmp_path / f"w{window}-{i}" for i in range(8)]
        done = list(runner.windowed(range(8), lambda i: handles.__setitem__(i, runner.submit(span, str(paths[i]), 0.5)),
                                    lambda i: handles[i], window))
        assert sorted(done) == list(range(8))  # every item once
        assert [runner.get(handles[i]) for i in range(8)] == [str(p) for p in paths]
        most[window] = _most_at_once(_spans(paths))
    assert most[1] == 1  # never two at once
    assert most[2] == 2  # the cluster's 2 CPUs ran two at once: the window, not the cluster, held the first run


def test_a_night_with_one_apply_task_in_flight_publishes_what_the_default_does(ray_cluster, tmp_path, tiny_dir):
    rows = fact_log_rows(12, 2)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    specs = {name: NightlySpec(store=str(tmp_path / name), fact_log=str(tmp_path / "log"), model=str(tiny_dir),
                               num_shards=6, workers=1, apply_in_flight=window)
             for name, window in (("one", 1), ("default", None))}
    reports = {name: run_nightly(spec) for name, spec in specs.items()}
    assert reports["one"].published and reports["one"].facts_ok == len(rows)
    assert read_current(LocalStore(tmp_path / "one"))[0].shards == read_current(LocalStore(tmp_path / "default"))[0].shards
