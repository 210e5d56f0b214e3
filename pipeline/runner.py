"""All the Ray wiring of a night: where each stage runs, with what resources and retries.

The stages are plain functions (pipeline.ingest, pipeline.shards, pipeline.compile); the nightly
flow (jobs/nightly.py) submits them through a runner and passes handles between them, never
the data itself:

* :class:`RayRunner`: each call is a Ray task (``num_cpus=1``, spread over the cluster's nodes,
  retried after a worker dies; an exception raised by the stage itself is not retried, it fails
  the night; ``num_cpus=0`` while the compile actors hold every CPU of the cluster, so a task the
  night waits on while they live, such as the scope round's, can always be scheduled: see
  :meth:`RayRunner.task_cpus`) and the compile pool is a set of Ray
  actors that load the model once (``num_gpus=1`` each where the cluster has GPUs; a dead actor
  is restarted and its chunk run again). Handles are ObjectRefs: Ray hands a task's outputs to
  the tasks that take them, on any node, without passing them through the driver.
* :class:`LocalRunner`: everything in this process, in order (``workers: 0``); handles are the
  values themselves. Tests and small runs use it; the results are the same.

A failure of a stage names it (e.g. ``apply shard 7``) and re-raises the stage's own exception,
so the night fails before any commit with the error that caused it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

TASK_MAX_RETRIES = 3  # a task whose worker died runs again (up to this many times)
ACTOR_MAX_RESTARTS = 3
ACTOR_MAX_TASK_RETRIES = 3
CHUNKS_IN_FLIGHT_PER_ACTOR = 2  # the next chunk is already there when one finishes


def _named(error: BaseException, what: str) -> BaseException:
    if hasattr(error, "add_note"):
        error.add_note(f"(in the night's {what})")
    # INFO, not ERROR: the error is raised, and its caller says it once (the CLI's one `error:` line;
    # logged at ERROR it was a second copy of that line on stderr); -v shows where it happened
    log.info("night failed in %s: %s: %s", what, type(error).__name__, error)
    return error


def _windowed(runner, items: Sequence, submit: Callable[[Any], None], handle_of: Callable[[Any], Any],
              window: int) -> Iterator[Any]:
    """Submit ``submit(item)`` for each of ``items`` with at most ``window`` in flight, yielding
    each item as its handle (``handle_of(item)``) is ready, and submitting the next in its place
    (on Ray, the cluster then starts no more worker processes for them than ``window``). Both
    runners' ``windowed``."""
    pending = deque(items)
    in_flight: list = []
    while pending or in_flight:
        while pending and len(in_flight) < max(1, window):
            item = pending.popleft()
            submit(item)
            in_flight.append(item)
        k = next(iter(runner.completed([handle_of(item) for item in in_flight])))
        yield in_flight.pop(k)


class LocalRunner:
    """Runs every stage in this process, in submission order."""

    def submit(self, fn: Callable, *args, num_returns: int = 1, what: str = "") -> Any:
        try:
            return fn(*args)
        except Exception as err:
            raise _named(err, what or fn.__name__) from None

    def get(self, handle: Any, what: str = "") -> Any:
        return handle

    def completed(self, handles: Sequence[Any]) -> Iterator[int]:
        """Indices of ``handles`` as their results are ready (here: in order)."""
        yield from range(len(handles))

    windowed = _windowed

    def compile_pool(self, model_dir: str, options, store_uri: str, workers: int, gpus_per_worker: float | None,
                     check_users: int = 0):
        return _LocalPool(model_dir, options, store_uri, check_users)


class _LocalPool:
    """One CompileWorker in this process, loaded at the first chunk."""

    def __init__(self, model_dir: str, options, store_uri: str, check_users: int = 0):
        self.args = (model_dir, options, store_uri)
        self.check_users = check_users
        self.worker = None

    def map(self, chunks: Sequence[tuple], changes_of: Callable[[tuple], list],
            scopes=None) -> Iterator[tuple[int, Any, Any]]:
        """(chunk index, meta, output) for every chunk, as each finishes; ``scopes``: the shared
        scopes (schemas.manifest.ScopesEntry) members compile against."""
        from pipeline.compile import CompileWorker

        for i, chunk in enumerate(chunks):
            if self.worker is None:
                self.worker = CompileWorker(*self.args, check_users=self.check_users)
            try:
                meta, output = self.worker.compile(chunk, *changes_of(chunk), scopes=scopes)
            except Exception as err:
                raise _named(err, f"compile chunk {i}") from None
            yield i, meta, output

    def close(self, flush: bool = True) -> None:
        if self.worker is not None:
            self.worker.flush()  # in process: no compile can be queued behind it, so always


def job_runtime_env() -> dict | None:
    """The job's object-store settings (``AWS_*``: endpoint, region, credentials), for its tasks.

    Tasks read and write the store themselves, so they need the settings the driver was given;
    a cluster started before they were set (or on other machines) would not have them. Workers
    whose own identity suffices (an instance role) get nothing they lack: the variables only
    name the same store the driver uses. The compiled step's cache folder
    (``ENGRAM_STEP_CACHE_DIR``, :func:`pipeline.compile.use_step_cache`) goes along when set."""
    from pipeline.compile import STEP_CACHE_ENV

    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k == STEP_CACHE_ENV}
    return {"env_vars": env} if env else None


class RayRunner:
    """Runs each stage as Ray tasks (and the compile pool as actors) on a Ray cluster."""

    def __init__(self) -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("RayRunner: call pipeline.runner.start_ray() first")
        self.ray = ray
        self.runtime_env = job_runtime_env()
        self._remote: dict[Callable, Any] = {}
        self.pools: list[_RayPool] = []  # compile pools made by this runner (their actors hold CPUs while alive)

    def task_cpus(self) -> int:
        """CPUs a task submitted now requests: 1, or 0 while live compile actors (started or still
        pending) leave less than one of the cluster's CPUs free. Each actor holds ``num_cpus=1`` until
        the pool closes, so with ``workers`` >= the cluster's CPUs (``workers: 2`` on a 2-CPU host) a
        task needing a CPU would wait for them forever, and a night waiting on such a task (the
        scope round's, between the scopes' compile and the members') would hang. Such a task runs
        beside the actors instead: they are the night's own, and it is short I/O next to them."""
        held = sum(len(pool.actors) for pool in self.pools)
        if held and self.ray.cluster_resources().get("CPU", 0) - held < 1:
            return 0
        return 1

    def submit(self, fn: Callable, *args, num_returns: int = 1, what: str = "") -> Any:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self.ray.remote(num_cpus=1, max_retries=TASK_MAX_RETRIES)(fn)
        # SPREAD: shard tasks read and write the store; spreading them over the nodes spreads that
        # I/O (and the object store memory their outputs take) rather than packing one node first.
        return remote.options(num_returns=num_returns, name=what or fn.__name__, scheduling_strategy="SPREAD",
                              num_cpus=self.task_cpus(), runtime_env=self.runtime_env).remote(*args)

    def get(self, handle: Any, what: str = "") -> Any:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as err:
            cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
            raise _named(cause, what or "task") from None

    def completed(self, handles: Sequence[Any]) -> Iterator[int]:
        index = {ref: i for i, ref in enumerate(handles)}
        pending = list(handles)
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield index[done[0]]

    windowed = _windowed

    def compile_pool(self, model_dir: str, options, store_uri: str, workers: int, gpus_per_worker: float | None,
                     check_users: int = 0, warm_up: bool | None = None):
        pool = _RayPool(self, model_dir, options, store_uri, workers, gpus_per_worker, check_users, warm_up)
        self.pools.append(pool)
        return pool


WARM_UP_POLL_S = 0.2
"""Seconds between the pool's checks that :meth:`_RayPool.map` has not yet been called, while it
waits for its actors to load (to warm up the idle ones)."""

CHECKPOINT_FLUSH_S = 120.0
"""Seconds closing the compile pool waits for its actors' chunk checkpoints to be written."""


class _RayPool:
    """The compile actors of a night (one per GPU, or CPU actors), started when the pool is made.

    ``warm_up`` (None: actors with a GPU): an actor that has loaded its model before the night has
    a chunk for it (:meth:`map` not yet called) compiles a few synthetic facts meanwhile
    (:meth:`pipeline.compile.CompileWorker.warm_up_or_warn`); one that loads after the chunks are
    known goes straight to its first chunk, which then pays the first compile's one-time costs
    itself (on the device: 1.5 s, where the warm-up takes 1.85-2.05 s)."""

    def __init__(self, runner: RayRunner, model_dir: str, options, store_uri: str, workers: int,
                 gpus_per_worker: float | None, check_users: int = 0, warm_up: bool | None = None):
        from pipeline.compile import CONCURRENT_CHUNKS, CompileWorker

        ray = runner.ray
        self.runner = runner
        gpus = gpus_per_worker
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        # max_concurrency (1 by default): with 2, a chunk's preparation and output overlap another
        # chunk's compile (CompileWorker.compile holds the model only while it uses it).
        actor_cls = ray.remote(num_cpus=1, num_gpus=gpus, max_concurrency=CONCURRENT_CHUNKS, max_restarts=ACTOR_MAX_RESTARTS,
                               max_task_retries=ACTOR_MAX_TASK_RETRIES, runtime_env=runner.runtime_env)(CompileWorker)
        self.workers = max(1, workers)
        self.warm_up = gpus > 0 if warm_up is None else warm_up
        self._start = lambda: [actor_cls.remote(model_dir, options, store_uri, None, 1 if gpus == 0 else None,
                                                check_users, False) for _ in range(self.workers)]
        self.actors: list = []
        self.warmed: list[int] = []  # actors given a warm-up (indices), for reports and tests
        self._chunks_known = threading.Event()  # map() called (or the pool closed): no more warm-ups
        self._lock = threading.Lock()
        # Start loading the model now (while the log is read) only if the actors leave a CPU for
        # the night's other tasks; on a small cluster they would hold every CPU while the log is
        # read (the tasks the night submits while they live run at num_cpus=0: RayRunner.task_cpus).
        if ray.cluster_resources().get("CPU", 0) - self.workers >= 1:
            self._launch()

    def _launch(self) -> None:
        self.actors = self._start()
        if self.warm_up and not self._chunks_known.is_set():
            ready = {actor.ready.remote(): k for k, actor in enumerate(self.actors)}
            threading.Thread(target=self._warm_idle, args=(ready,), name="compile-pool-warm-up", daemon=True).start()

    def _warm_idle(self, ready: dict) -> None:
        """Until :meth:`map` is called: each actor that finishes loading gets a warm-up."""
        ray = self.runner.ray
        while ready and not self._chunks_known.is_set():
            done, _ = ray.wait(list(ready), num_returns=len(ready), timeout=WARM_UP_POLL_S)
            for ref in done:
                k = ready.pop(ref)
                with self._lock:
                    if self._chunks_known.is_set():
                        return
                    # a failed start is reported by map(), which waits on its own ready() call
                    self.actors[k].warm_up_or_warn.remote()
                    self.warmed.append(k)

    def map(self, chunks: Sequence[tuple], changes_of: Callable[[tuple], list],
            scopes=None) -> Iterator[tuple[int, Any, Any]]:
        """(chunk index, meta, output handle) for every chunk, as each finishes (``scopes``: the
        shared scopes members compile against).

        Chunks go, in order, only to actors that have started (loaded the model, and warmed up if
        they were given a warm-up before this call: :meth:`pipeline.compile.CompileWorker.ready`), so on a night whose compile is short, an
        actor that starts seconds after another does not hold chunks the first could compile.
        Each actor holds up to CHUNKS_IN_FLIGHT_PER_ACTOR chunks (it runs
        pipeline.compile.CONCURRENT_CHUNKS of them at a time: by default one, the next waiting with
        its inputs already there) while more chunks are left than there are actors, and one at a
        time for the last ones, which then go to whichever actor is free first."""
        ray = self.runner.ray
        with self._lock:  # no warm-up is queued from here on: a chunk is waiting for each actor
            self._chunks_known.set()
        if chunks and not self.actors:
            self._launch()
        queue = deque(enumerate(chunks))
        pending: dict = {}  # meta ref -> (chunk index, output ref, actor index)
        in_flight: Counter = Counter()  # actor index -> chunks submitted and not finished
        starting = {actor.ready.remote(): k for k, actor in enumerate(self.actors)} if queue else {}

        def fill(k: int) -> None:
            while queue and in_flight[k] < (CHUNKS_IN_FLIGHT_PER_ACTOR if len(queue) > len(self.actors) else 1):
                i, chunk = queue.popleft()
                meta, output = self.actors[k].compile.options(num_returns=2).remote(chunk, *changes_of(chunk),
                                                                                   scopes=scopes)
                pending[meta] = (i, output, k)
                in_flight[k] += 1

        while pending or (queue and starting):
            (done,), _ = ray.wait([*pending, *starting], num_returns=1)
            if done in starting:
                k = starting.pop(done)
                try:
                    ray.get(done)
                except Exception as err:  # its constructor failed (after its restarts): the night fails, naming it
                    raise _named(err, f"compile actor {k} start") from None
                fill(k)
                continue
            i, output, k = pending.pop(done)
            in_flight[k] -= 1
            meta = self.runner.get(done, f"compile chunk {i}")
            fill(k)
            yield i, meta, output

    def close(self, flush: bool = True) -> None:
        """End the actors; with ``flush``, first let each finish writing its chunk checkpoint (up to
        CHECKPOINT_FLUSH_S). A night that failed closes without: a flush would wait behind the
        compiles still queued on the actors. (Killed, an actor's last task events may not reach the
        cluster's timeline; a graceful ``__ray_terminate__`` was tried and makes the raylet print a
        retry warning onto the driver's stdout, which ``--json`` readers parse.)"""
        ray = self.runner.ray
        self._chunks_known.set()
        if self.actors and flush:
            try:
                ray.get([actor.flush.remote() for actor in self.actors], timeout=CHECKPOINT_FLUSH_S)
            except Exception as err:  # noqa: BLE001 - a dead actor or a slow store costs only the resume's head start
                log.warning("compile pool: chunk checkpoints not all flushed (%s: %s)", type(err).__name__, err)
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self in self.runner.pools:
            self.runner.pools.remove(self)


class RayUnreachable(ConnectionError):
    """The Ray cluster a night was given (``ray_address``, or ``RAY_ADDRESS``) cannot be reached: a
    bad argument (exit 2), named with the fix."""


_PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "GRPC_PROXY", "HTTPS_PROXY", "HTTP_PROXY")


def _ray_unreachable(given: str, why: str) -> RayUnreachable:
    return RayUnreachable(
        f"{given}: cannot reach the Ray cluster ({why}); check the address (ray://HEAD:10001 for Ray Client, "
        "HEAD:6379 or auto on a node of the cluster), that its head node runs and that the port is reachable from "
        "here, or leave ray_address out (no --ray-address) to start a local cluster")


def _check_ray_address(address: str, given: str) -> None:
    """RayUnreachable at once where ``address`` names a host and port that takes no connection
    (Ray Client would retry for 30 s, a GCS address for minutes, before failing without naming it).
    Skipped behind a proxy (the connection goes through it) and for ``auto`` / ``local``."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return
    target = address if "://" in address else f"gcs://{address}"
    try:
        parts = urlsplit(target)
        host, port = parts.hostname, parts.port
    except ValueError as err:  # a port that is no number
        raise _ray_unreachable(given, f"not an address: {err}") from None
    if address.startswith("ray://") and host and port is None:
        port = 10001  # Ray Client's default port
    if not host or port is None:
        if address.startswith("ray://"):
            raise _ray_unreachable(given, "no host after ray://")
        if host and "://" not in address and address.strip().lower() not in ("auto", "local"):
            # a host without its port (Ray said "ValueError: Invalid address format", exit 1)
            raise _ray_unreachable(given, f"no port: a cluster's address is {host}:6379 (its head node's GCS port)")
        return  # auto, local, or a form Ray resolves itself
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as err:
        raise _ray_unreachable(given, getattr(err, "strerror", None) or str(err) or type(err).__name__) from None


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a Ray cluster by address, or start a local one (no dashboard: nothing to reach).
    Raises RayUnreachable naming the address and the fix where the cluster cannot be reached."""
    import ray

    if ray.is_initialized():
        return
    import signal
    import threading

    kwargs = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
    main = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main else None
    if address or os.environ.get("RAY_ADDRESS"):  # a given cluster, or the one running this job
        given = f"ray_address {address}" if address else f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
        _check_ray_address(address or os.environ["RAY_ADDRESS"], given)
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as err:
            raise _ray_unreachable(given, str(err)) from err
    else:  # "local": a new cluster of this process's own, never one another job started on this host
        ray.init(address="local", num_cpus=num_cpus or max(2, os.cpu_count() or 2), **kwargs)
    if callable(on_sigterm):  # ray.init sets its own (sys.exit); a handler of the caller's (the CLI's) stays
        signal.signal(signal.SIGTERM, on_sigterm)


def make_runner(workers: int, ray_address: str | None) -> LocalRunner | RayRunner:
    """``workers: 0`` runs the night in this process; otherwise on Ray (started here if needed)."""
    if workers == 0:
        return LocalRunner()
    start_ray(ray_address)
    return RayRunner()
