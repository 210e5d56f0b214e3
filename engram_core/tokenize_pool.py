"""Facts' texts to the compiler's token ids, in this process or in worker processes.

On a GPU the compiler is bound by its host thread. Tokenizing a batch of 65,536 facts is fast in
the Rust tokenizer but then holds the GIL about 1.5 s (on an H100 host) to build 131,072 Python
id lists; on a thread it competes with the thread that feeds the GPU, and the first batch of a
compile waits for all of it. :class:`TokenizePool` splits a batch over worker processes
(``python -m engram_core.tokenize_pool``), which tokenize their chunks in parallel without the
compiling process's GIL. A worker runs the same ``tokenizers`` backend (sent to it as JSON) with
the same calls, so its ids are the in-process ones, and both paths run :func:`encode_pairs`.

This module imports only the standard library, ``tokenizers`` and :mod:`engram_core.text` (not torch): a worker starts in
a fraction of a second.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, Sequence

from .text import canonical_fact

log = logging.getLogger(__name__)

STATUS_EMPTY_TRIGGER = "empty_trigger"
STATUS_EMPTY_ANSWER = "empty_answer"
STATUS_TRIGGER_TOO_LONG = "trigger_too_long"
STATUS_ANSWER_TOO_LONG = "answer_too_long"
STATUS_SPECIAL_TOKEN_TEXT = "special_token_text"

Encode = Callable[[list[str], bool], list[list[int]]]  # (texts, add_special_tokens) -> ids per text


def encode_pairs(encode: Encode, triggers: Sequence[str], answers: Sequence[str], max_trigger: int,
                 max_answer: int) -> list[tuple]:
    """Per fact, ``(input_ids, targets)`` (input: trigger + answer[:-1]; targets: the answer's
    tokens) or, for a fact the compiler cannot take, ``(status, detail)`` (``status`` a str).

    Texts are tokenized in their canonical form (:func:`engram_core.text.canonical_fact`: NFC,
    no invisible characters, the boundary space on the answer), the form serving gives prompts,
    so a fact is compiled for the prompt a user types. Facts from ingest already have it."""
    pairs = [canonical_fact(t, a) if t is not None and a is not None else (t, a) for t, a in zip(triggers, answers)]
    triggers, answers = [t for t, _ in pairs], [a for _, a in pairs]
    texts_ok = [bool(t and t.strip() and a and a.strip()) for t, a in zip(triggers, answers)]
    kept = [k for k, ok in enumerate(texts_ok) if ok]
    trigger_ids = _encode_distinct(encode, [triggers[k] for k in kept], True)
    answer_ids = _encode_distinct(encode, [answers[k] for k in kept], False)
    out, j = [], 0
    for trigger, answer, ok in zip(triggers, answers, texts_ok):
        if not ok:
            empty_trigger = not trigger or not trigger.strip()
            out.append((STATUS_EMPTY_TRIGGER, "trigger is empty") if empty_trigger
                       else (STATUS_EMPTY_ANSWER, "answer is empty"))
            continue
        t, a = trigger_ids[j], answer_ids[j]
        j += 1
        if len(t) > max_trigger:
            out.append((STATUS_TRIGGER_TOO_LONG, f"trigger has {len(t)} tokens (limit {max_trigger})"))
        elif len(a) > max_answer:
            out.append((STATUS_ANSWER_TOO_LONG, f"answer has {len(a)} tokens (limit {max_answer})"))
        else:
            out.append((t + a[:-1], a))
    return out


def _encode_distinct(encode: Encode, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """``encode(texts)``, each distinct text tokenized once: real fact logs share trigger texts
    across users ("My dentist is"), and a text's ids do not depend on the other texts of the call.
    Facts of one text get the same list object: :func:`encode_pairs` builds each input as a new
    list, but a fact's targets are its answer's list, shared (nothing edits them in place)."""
    if not texts:
        return []
    index: dict[str, int] = {}
    which = [index.setdefault(text, len(index)) for text in texts]
    if len(index) == len(texts):
        return encode(texts, add_special_tokens)
    ids = encode(list(index), add_special_tokens)
    return [ids[k] for k in which]


def backend_encoder(backend) -> Encode:
    """``encode`` for a ``tokenizers.Tokenizer`` (the Rust backend of a fast tokenizer)."""
    def encode(texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
    return encode


# Messages: an 8-byte little-endian length, then a pickle.
def _send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream):
    head = stream.read(8)
    if len(head) < 8:
        return None  # the other side closed
    (size,) = struct.unpack("<Q", head)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


class TokenizePoolError(RuntimeError):
    pass


def _exit_code(proc: subprocess.Popen) -> int | None:
    try:
        return proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        return None  # its pipe broke, but it still runs


class TokenizePool:
    """Worker processes that tokenize facts' texts with one ``tokenizers`` backend."""

    def __init__(self, tokenizer_json: str, workers: int):
        if workers < 1:
            raise ValueError(f"TokenizePool: workers must be at least 1, got {workers}")
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        # Each worker tokenizes its own chunk: a few Rust threads each, not all cores each.
        env["RAYON_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
        env["TOKENIZERS_PARALLELISM"] = "true"
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen] = []
        try:
            for _ in range(workers):
                self._procs.append(subprocess.Popen([sys.executable, "-m", "engram_core.tokenize_pool"],
                                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env))
            for proc in self._procs:
                _send(proc.stdin, ("tokenizer", tokenizer_json))
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> int:
        return len(self._procs)

    def encode_pairs(self, triggers: Sequence[str], answers: Sequence[str], max_trigger: int,
                     max_answer: int) -> list[tuple]:
        """:func:`encode_pairs` over the workers (contiguous chunks, results in order)."""
        n = len(triggers)
        bounds = [n * k // self.workers for k in range(self.workers + 1)]
        with self._lock:
            try:
                used = []
                for proc, a, b in zip(self._procs, bounds, bounds[1:]):
                    if b > a:
                        try:
                            _send(proc.stdin, ("encode", (list(triggers[a:b]), list(answers[a:b]), max_trigger, max_answer)))
                        except OSError as e:
                            raise TokenizePoolError(f"tokenize worker {proc.pid} exited (code {_exit_code(proc)}): {e}") from e
                        used.append(proc)
                out: list[tuple] = []
                for proc in used:
                    reply = _receive(proc.stdout)
                    if reply is None:
                        raise TokenizePoolError(f"tokenize worker {proc.pid} exited (code {_exit_code(proc)})")
                    kind, payload = reply
                    if kind != "ok":
                        raise TokenizePoolError(f"tokenize worker {proc.pid} failed:\n{payload}")
                    out.extend(payload)
                return out
            except (OSError, EOFError, pickle.UnpicklingError) as e:
                raise TokenizePoolError(f"tokenize workers: {e}") from e

    def close(self) -> None:
        for proc in self._procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        self._procs = []


_POOLS: dict[tuple[str, int], TokenizePool] = {}
_POOLS_LOCK = threading.Lock()
_POOLS_PID = [os.getpid()]


def shared_pool(tokenizer_json: str, workers: int) -> TokenizePool:
    """One pool per (tokenizer, worker count) per process, started on first use (its workers
    stay up for the next compile) and closed at exit."""
    key = (hashlib.sha256(tokenizer_json.encode()).hexdigest(), workers)
    with _POOLS_LOCK:
        if _POOLS_PID[0] != os.getpid():  # a forked child: its parent's workers are not its own to use
            _POOLS.clear()
            _POOLS_PID[0] = os.getpid()
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = TokenizePool(tokenizer_json, workers)
        return pool


def discard_pool(pool: TokenizePool) -> None:
    """Close a pool that failed; the next :func:`shared_pool` starts a new one."""
    with _POOLS_LOCK:
        for key, value in list(_POOLS.items()):
            if value is pool:
                del _POOLS[key]
    pool.close()


@atexit.register
def _close_pools() -> None:
    with _POOLS_LOCK:
        pools = list(_POOLS.values()) if _POOLS_PID[0] == os.getpid() else []
        _POOLS.clear()
    for pool in pools:
        pool.close()


def _worker() -> None:
    from tokenizers import Tokenizer

    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints cannot corrupt the replies
    encode, load_error = None, "no tokenizer was sent"
    while True:
        message = _receive(requests)
        if message is None:
            return
        kind, payload = message
        if kind == "tokenizer":
            try:
                encode, load_error = backend_encoder(Tokenizer.from_str(payload)), None
            except Exception:  # reported with the next request
                encode, load_error = None, traceback.format_exc()
            continue
        try:
            if encode is None:
                raise RuntimeError(f"the tokenizer sent to this worker did not load:\n{load_error}")
            _send(replies, ("ok", encode_pairs(encode, *payload)))
        except Exception:
            _send(replies, ("error", traceback.format_exc()))


if __name__ == "__main__":
    _worker()
