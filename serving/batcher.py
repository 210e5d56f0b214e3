"""The request batcher: queued requests served together in one ``generate`` call per batch.

Requests are queued and a batcher thread collects them for a few milliseconds, then serves them
in one ``generate`` call with a per-sequence overlay (no shared mutation): each sequence sees the
base table plus exactly its own user's delta.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from serving.errors import RequestError

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    prompts: list[str]
    user: str | None
    max_tokens: int
    done: threading.Event = field(default_factory=threading.Event)
    texts: list[str] | None = None
    version: int | None = None
    memory: str = "base"
    error: Exception | None = None


class CompletionBatcher:
    """Collects requests for ``wait_s`` (up to ``max_batch`` sequences), then one ``generate`` per batch."""

    def __init__(self, em, client, *, max_batch: int = 32, wait_s: float = 0.005):
        self.em, self.client = em, client
        self.max_batch, self.wait_s = max_batch, wait_s
        self.batches = 0
        self.sequences = 0
        self.largest_batch = 0
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engram-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, prompts: list[str], user: str | None, max_tokens: int, timeout: float = 120.0) -> _Pending:
        pending = _Pending(prompts, user, max_tokens)
        self._queue.put(pending)
        if not pending.done.wait(timeout):
            raise RequestError(f"no answer within {timeout:.0f}s (server overloaded)", status=504, code="timeout")
        if pending.error is not None:
            raise pending.error
        return pending

    def _collect(self) -> list[_Pending]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch, size = [first], len(first.prompts)
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
            size += len(item.prompts)
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if batch:
                self._serve(batch)

    def _serve(self, batch: list[_Pending]) -> None:
        from engram_core.memory_index import batch_overlay
        from engram_core.serving import generate_with_overlay

        index = self.client.index  # one version for the whole batch, even if a swap lands meanwhile
        for item in batch:
            item.version = index.version if index is not None else None
            deltas = index.deltas_for(item.user) if index is not None else ()
            item.memory = "user" if deltas else "base"
        by_length: dict[int, list[_Pending]] = {}
        for item in batch:
            by_length.setdefault(item.max_tokens, []).append(item)
        for max_tokens, items in by_length.items():
            prompts = [p for item in items for p in item.prompts]
            served = [index.served_for(item.user) if index is not None else None
                      for item in items for _ in item.prompts]
            overlay = None
            try:
                overlay = batch_overlay(self.em, served)
                texts = generate_with_overlay(self.em, prompts, overlay, max_tokens)
            except Exception as e:  # reported to each waiting request, never swallowed
                log.exception("batch of %d sequences failed", len(prompts))
                for item in items:
                    item.error = RequestError(f"generation failed: {type(e).__name__}: {e}", status=500,
                                              code="server_error")
                    item.done.set()
                continue
            self.batches += 1
            self.sequences += len(prompts)
            self.largest_batch = max(self.largest_batch, len(prompts))
            offset = 0
            for item in items:
                item.texts = texts[offset: offset + len(item.prompts)]
                offset += len(item.prompts)
                item.done.set()
            # Only now: collecting the overlay gives its pooled maps back, cleared where it wrote
            # (~0.1 ms), which the answers above need not wait for.
            del overlay
