"""The request batcher: queued requests served together, one ``generate`` call per batch.

Requests are queued and a batcher thread collects them for a few milliseconds (up to
``max_batch`` sequences: a request holds ``len(prompts) * n`` of them), then decodes them in one
``generate`` call with a per-sequence overlay (no shared mutation): each sequence sees the base
table plus exactly its own user's delta. Streamed and non-streamed requests, greedy and sampled,
long and short, share a batch: each sequence stops by its own rule (:mod:`serving.decode`); a
non-streamed request is answered as soon as its own sequences are done, and a streamed one gets
its text after every step. A batch runs to its longest sequence; requests that arrive meanwhile
wait for the next batch (no continuous batching in this reference server).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from serving.decode import CANCELLED, Sampling, SequenceState, decode_batch
from serving.errors import RequestError, seconds_from_env

log = logging.getLogger(__name__)

WEDGED_BATCH_S = 300.0
"""A batcher that has work (a batch in progress, or requests queued) and has made no progress on it
(no decode step ended, no batch taken) for this long is wedged (a CUDA or CPU hang, a deadlock inside
one decode): ``/livez`` answers 503 (serving.http). No legitimate step comes near it: every request
waiting on such a step has already failed with a 504 after serving.http.EVENT_TIMEOUT_S (120 s)."""
WEDGED_BATCH_ENV = "ENGRAM_WEDGED_BATCH_S"


def wedged_batch_seconds() -> float:
    """:data:`WEDGED_BATCH_S`, or ``$ENGRAM_WEDGED_BATCH_S`` (seconds, above 0) where set; ValueError
    naming the variable for any other value."""
    return seconds_from_env(WEDGED_BATCH_ENV, WEDGED_BATCH_S)


CLIENT_CHECK_S = 0.05
"""How often a request waiting for its answer checks that its client is still connected."""


class ClientGone(Exception):
    """The client closed its connection while its request waited or decoded; the request is cancelled."""


@dataclass(frozen=True)
class ChoiceDelta:
    """What one choice of a streamed request added in one step: new text, and its finish reason once done."""

    index: int
    text: str
    finish_reason: str | None


@dataclass
class GenerationRequest:
    """One API request: ``prompt_ids`` (token ids per prompt), ``n`` choices per prompt, for ``user``.

    Choice ``i * n + j`` is prompt i's j-th sample; a sampled choice's seed is ``seed + index``
    (so choices differ, and a request with a seed is reproducible). Filled in by the batcher:
    ``version``/``memory`` when its batch starts, ``states`` as it decodes,
    ``done`` when every choice has finished (or ``error`` is set). A streamed request also gets
    its events on ``events``: ``("delta", [ChoiceDelta, ...])`` per step, then ``("end", None)``
    or ``("error", RequestError)``.
    """

    prompt_ids: list[list[int]]
    user: str | None
    sampling: Sampling
    n: int = 1
    version: int | None = None
    memory: str = "base"
    states: list[SequenceState] = field(default_factory=list)
    error: RequestError | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    events: "queue.Queue[tuple[str, object]]" = field(default_factory=queue.Queue)
    _sent: list[int] = field(default_factory=list)  # per choice: text length already put on events
    _finished: list[bool] = field(default_factory=list)

    @property
    def num_sequences(self) -> int:
        return len(self.prompt_ids) * self.n

    @property
    def stream(self) -> bool:
        return self.sampling.stream

    def choice_sampling(self, index: int) -> Sampling:
        if self.sampling.greedy or self.sampling.seed is None:
            return self.sampling
        return replace(self.sampling, seed=self.sampling.seed + index)

    def cancel(self) -> None:
        """The client went away: its sequences stop at the next step and nothing more is sent."""
        self.cancelled.set()

    def fail(self, error: RequestError) -> None:
        if self.done.is_set():
            return
        self.error = error
        if self.stream:
            self.events.put(("error", error))
        self.done.set()

    def report(self) -> None:
        """Publish what the states hold now: stream deltas; ``done`` once every choice is finished."""
        if self.done.is_set():
            return
        if self.stream:
            deltas = []
            for index, state in enumerate(self.states):
                if self._finished[index]:
                    continue
                text = state.text[self._sent[index]:state.sent]
                if text or state.finished:
                    deltas.append(ChoiceDelta(index, text, state.finish_reason if state.finished else None))
                    self._sent[index] = state.sent
                    self._finished[index] = state.finished
            if deltas:
                self.events.put(("delta", deltas))
        if all(state.finished for state in self.states):
            if self.stream:
                self.events.put(("end", None))
            self.done.set()


class CompletionBatcher:
    """Collects requests for ``wait_s`` (up to ``max_batch`` sequences), then one ``generate`` per batch.

    ``wedged_after`` (seconds; default :func:`wedged_batch_seconds`): how long the batcher may go
    without progress while it has work before :meth:`wedged` says so."""

    def __init__(self, em, client, *, max_batch: int = 32, wait_s: float = 0.005, wedged_after: float | None = None):
        self.em, self.client = em, client
        self.max_batch, self.wait_s = max_batch, wait_s
        self.wedged_after = wedged_batch_seconds() if wedged_after is None else wedged_after
        self._progress_at = time.monotonic()  # the batcher thread's last sign of progress (a loop, a decode step)
        self._batch: tuple[int, float] | None = None  # the batch in progress: (sequences, wall-clock start)
        self.batches = 0
        self.sequences = 0
        self.largest_batch = 0
        self.streamed = 0
        self.mixed_batches = 0  # batches that held streamed and non-streamed requests together
        self.cancelled = 0  # sequences stopped early because their client went away
        self._queue: queue.Queue[GenerationRequest] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engram-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        """False once :meth:`start` ran and the batching thread has ended (it died, or :meth:`stop`)."""
        return self._thread.is_alive() or self._thread.ident is None

    def wedged(self, now: float | None = None) -> str | None:
        """None while the batcher makes progress on its work (or has none); else one line saying it
        has a batch in progress (or requests queued) and no decode step has ended (nor a batch been
        taken) for ``wedged_after`` seconds: a hang inside one decode, which only a restart ends."""
        if not self._thread.is_alive():
            return None  # not started, or ended: alive() says so
        idle = (time.monotonic() if now is None else now) - self._progress_at
        batch, queued = self._batch, self._queue.qsize()
        if idle <= self.wedged_after or (batch is None and not queued):
            return None
        from serving.pull import human_duration
        from serving.last_good import iso

        work = (f"a batch of {batch[0]} sequences started at {iso(batch[1])}" if batch is not None else
                f"{queued} request(s) queued")
        return (f"the batcher has made no progress for {human_duration(idle)} on {work} (no decode step ended; over "
                f"{WEDGED_BATCH_ENV}={self.wedged_after:g}s: a hang or deadlock inside a decode); restart the node")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def enqueue(self, request: GenerationRequest) -> GenerationRequest:
        """Queue ``request`` and return at once (a streamed request reads ``request.events``)."""
        self._queue.put(request)
        return request

    def submit(self, request: GenerationRequest, timeout: float = 120.0,
               client_gone: Callable[[], bool] | None = None) -> GenerationRequest:
        """Queue ``request`` and wait until all its choices are done; RequestError on failure or timeout.

        ``client_gone`` is asked every :data:`CLIENT_CHECK_S` while it waits: once it says the client has
        gone (closed its connection), the request is cancelled (its sequences stop at the next step, or
        it never starts) and :class:`ClientGone` is raised: a client that left frees its place in the batch."""
        self.enqueue(request)
        deadline = time.monotonic() + timeout
        while not request.done.wait(min(CLIENT_CHECK_S, max(0.0, deadline - time.monotonic()))):
            if client_gone is not None and client_gone():
                request.cancel()
                raise ClientGone()
            if time.monotonic() >= deadline:
                request.cancel()
                raise RequestError(f"no answer within {timeout:.0f}s (server overloaded)", status=504, code="timeout")
        if request.error is not None:
            raise request.error
        return request

    def _collect(self) -> list[GenerationRequest]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch, size = [first], first.num_sequences
        deadline = time.monotonic() + self.wait_s
        while size < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            batch.append(item)
            size += item.num_sequences
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            self._progress_at = time.monotonic()
            collected = self._collect()
            batch = [r for r in collected if not r.cancelled.is_set()]
            # a client that left while its request was queued: it never decodes (counted as stopped early)
            self.cancelled += sum(r.num_sequences for r in collected if r.cancelled.is_set())
            if batch:
                self._progress_at = time.monotonic()
                self._batch = (sum(r.num_sequences for r in batch), time.time())
                try:
                    self._serve(batch)
                finally:
                    self._batch = None

    def _serve(self, batch: list[GenerationRequest]) -> None:
        from engram_core.memory_index import batch_overlay

        index = self.client.index  # one version for the whole batch, even if a swap lands meanwhile
        too_stale = self.client.over_max_stale()  # past --max-stale since the requests were accepted
        if too_stale:
            refused = RequestError(too_stale, status=503, param="user", code="memory_too_stale")
            for request in batch:
                if request.user:
                    request.fail(refused)
            batch = [request for request in batch if not request.user]
            if not batch:
                return
        prompt_ids, served, states = [], [], []
        for request in batch:
            request.version = index.version if index is not None else None
            deltas = index.deltas_for(request.user) if index is not None else ()
            request.memory = "user" if deltas else "base"
            request.states = [SequenceState(request.choice_sampling(i), cancelled=request.cancelled.is_set)
                              for i in range(request.num_sequences)]
            request._sent = [0] * request.num_sequences
            request._finished = [False] * request.num_sequences
            user_delta = index.served_parts_for(request.user) if index is not None else ()  # (scope, own) for a member
            for i in range(request.num_sequences):
                prompt_ids.append(request.prompt_ids[i // request.n])
                served.append(user_delta)
            states.extend(request.states)

        def on_step() -> None:
            self._progress_at = time.monotonic()  # a decode step ended: the batcher is not wedged
            for request in batch:
                request.report()

        overlay = None
        try:
            overlay = batch_overlay(self.em, served)
            decode_batch(self.em, prompt_ids, overlay, states, on_step)
        except Exception as e:  # reported to each waiting request, never swallowed
            log.exception("batch of %d sequences failed", len(prompt_ids))
            error = RequestError(f"generation failed: {type(e).__name__}: {e}", status=500, code="server_error")
            for request in batch:
                request.fail(error)
            return
        on_step()  # the final texts (decode_batch finishes every sequence)
        self.batches += 1
        self.sequences += len(prompt_ids)
        self.streamed += sum(r.num_sequences for r in batch if r.stream)
        self.mixed_batches += len({r.stream for r in batch}) == 2
        self.largest_batch = max(self.largest_batch, len(prompt_ids))
        cancelled = sum(1 for s in states if s.finish_reason == CANCELLED)
        if cancelled:
            self.cancelled += cancelled
            log.info("batch of %d sequences: %d stopped early (client gone)", len(prompt_ids), cancelled)
        # Only now: collecting the overlay gives its pooled maps back, cleared where it wrote
        # (~0.1 ms), which the answers above need not wait for.
        del overlay
