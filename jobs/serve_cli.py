"""`engram pull`, `engram ask`, `engram serve`: the serving side, and a small reference server.

The reference server (:class:`ReferenceServer`) speaks the OpenAI completions API
(``POST /v1/completions``, ``GET /v1/models``) plus ``GET /healthz``. The standard ``user``
field of a request selects the memory: the model sees the base table plus exactly that user's
delta. Requests are queued and a batcher thread collects them for a few milliseconds, then
serves them in one ``generate`` call with a per-sequence overlay (no shared mutation).

Requests without a user, and users with no facts in the served version, get the base model;
the response says so (``X-Engram-Memory: base`` and the ``engram`` field of the body), since a
base answer is never a privacy problem but a silent one hides a client bug. A user whose shard
this node does not own is refused (HTTP 421): that is a routing error, and serving the base
model would hide it. Malformed requests get HTTP 400 with an OpenAI-style JSON error body.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import typer

from engram_core.text import canonical_id, canonical_prompt

log = logging.getLogger(__name__)

MAX_PROMPTS_PER_REQUEST = 32
MAX_TOKENS_LIMIT = 512
MAX_BODY_BYTES = 1 << 20


# ---------------------------------------------------------------- batching


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


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


# ---------------------------------------------------------------- HTTP


def parse_completion_request(body: bytes, model_names: tuple[str, ...]) -> tuple[list[str], str | None, int]:
    """Validate an OpenAI completions request body -> (prompts, user, max_tokens); RequestError if malformed."""
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"request body is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise RequestError("request body must be a JSON object")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required (a string; GET /v1/models lists the served model)", param="model")
    if model not in model_names:
        raise RequestError(f"model {model!r} is not served here (serving {model_names[0]!r})", status=404,
                           param="model", code="model_not_found")
    prompt = raw.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise RequestError("'prompt' must be a non-empty string or a non-empty list of non-empty strings "
                           "(token-id prompts are not supported)", param="prompt")
    if len(prompts) > MAX_PROMPTS_PER_REQUEST:
        raise RequestError(f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS_PER_REQUEST} per request",
                           param="prompt")
    max_tokens = raw.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise RequestError(f"'max_tokens' must be an integer in 1..{MAX_TOKENS_LIMIT}, got {max_tokens!r}",
                           param="max_tokens")
    user = raw.get("user")
    if user is not None and (not isinstance(user, str) or not user.strip()):
        raise RequestError("'user' must be a non-empty string (or left out for the base model)", param="user")
    if raw.get("stream"):
        raise RequestError("'stream' is not supported by the reference server", param="stream")
    if raw.get("n", 1) != 1 or raw.get("best_of", 1) != 1:
        raise RequestError("'n' and 'best_of' must be 1 (decoding is greedy)", param="n")
    return prompts, user, max_tokens


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 resets connections under a burst of clients


class ReferenceServer:
    """OpenAI-compatible completions over a :class:`~serving.pull.PullClient`'s served version."""

    def __init__(self, em, client, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32,
                 batch_wait_s: float = 0.005, poll: bool = True):
        self.em, self.client, self.poll = em, client, poll
        self.model_name = f"engram-{em.fingerprint[:12]}"
        self.batcher = CompletionBatcher(em, client, max_batch=max_batch, wait_s=batch_wait_s)
        self.httpd = _HTTPServer((host, port), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.httpd.server_address[0]}:{self.port}"

    def start(self) -> "ReferenceServer":
        from engram_core.row_kernels import KERNELS

        if self.em.device.type == "cpu":
            KERNELS.start()  # the kernel form once compiled (or loaded from the cache); read form until then
        self.batcher.start()
        if self.poll:
            self.client.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="engram-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.start()
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=1)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.batcher.stop()
        self.client.stop()

    def __enter__(self) -> "ReferenceServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def health(self) -> dict:
        from engram_core.row_kernels import KERNELS

        index = self.client.index
        return {
            "status": "ok" if index is not None else "loading",
            "model": self.model_name,
            "fingerprint": self.em.fingerprint,
            "version": index.version if index is not None else None,
            "users": index.num_users if index is not None else 0,
            "shards": list(index.shards) if index is not None else [],
            "last_error": self.client.last_error,
            "batches": self.batcher.batches,
            "sequences": self.batcher.sequences,
            "largest_batch": self.batcher.largest_batch,
            "row_kernels": KERNELS.status() if self.em.device.type == "cpu" else "not used (CUDA model)",
        }

    def complete(self, body: bytes) -> tuple[dict, dict[str, str]]:
        prompts, user, max_tokens = parse_completion_request(body, (self.model_name, "engram"))
        # Canonical forms (engram_core.text): the user id as ingest stores it, prompts as facts are compiled.
        user = canonical_id(user) if user is not None else None
        prompts = [canonical_prompt(p) or p for p in prompts]
        index = self.client.index
        if user is not None and index is not None and not index.owns(user):
            from versions.layout import shard_of

            shard = shard_of(user, index.num_shards)
            raise RequestError(f"user {user!r} is in shard {shard}, which this node does not serve "
                               f"(it serves {list(index.shards)}); route it to its shard's node",
                               status=421, param="user", code="wrong_shard")
        done = self.batcher.submit(prompts, user, max_tokens)
        reason = "user" if done.memory == "user" else ("no user" if user is None else "user has no memory")
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": "length"}
                   for i, text in enumerate(done.texts)]
        prompt_tokens = sum(len(self.em.encode_prompt(p)) for p in prompts)
        completion_tokens = sum(len(self.em.encode_answer(t)) for t in done.texts)
        response = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "engram": {"user": user, "memory": done.memory, "reason": reason, "version": done.version},
        }
        headers = {"X-Engram-Memory": done.memory, "X-Engram-Version": str(done.version)}
        return response, headers

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # access log through logging, not stderr prints
                log.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def _error(self, e: RequestError) -> None:
                kind = "invalid_request_error" if e.status < 500 else "server_error"
                self._send(e.status, {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}})

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    health = server.health()
                    self._send(200 if health["version"] is not None else 503, health)
                elif path == "/v1/models":
                    self._send(200, {"object": "list", "data": [
                        {"id": server.model_name, "object": "model", "created": 0, "owned_by": "engram"}]})
                else:
                    self._error(RequestError(f"no route GET {path}", status=404, code="not_found"))

            def do_POST(self):
                path = self.path.split("?", 1)[0]
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY_BYTES:
                    self._error(RequestError(f"Content-Length must be 0..{MAX_BODY_BYTES} bytes"))
                    self.close_connection = True
                    return
                body = self.rfile.read(length)
                if path != "/v1/completions":
                    self._error(RequestError(f"no route POST {path} (this server offers /v1/completions)",
                                             status=404, code="not_found"))
                    return
                try:
                    response, headers = server.complete(body)
                except RequestError as e:
                    self._error(e)
                    return
                self._send(200, response, headers)

        return Handler


# ---------------------------------------------------------------- commands


_STORE = typer.Option(..., "--store", help="Store URI: a local path or s3://bucket/prefix.")
_CACHE = typer.Option(None, "--cache-dir", help="Local cache for bundles and models (default ~/.cache/engram "
                                                "or $ENGRAM_CACHE_DIR).")
_MODEL = typer.Option(None, "--model", help="Use this local checkpoint instead of fetching the manifest's "
                                            "model (refused if its fingerprint differs).")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _open(store_uri: str, model_dir: Path | None, cache_dir: Path | None):
    """(store, manifest, em, cache_dir) for a command; exits with a clear message on any problem."""
    from schemas.manifest import ManifestError
    from serving.pull import PullError, default_cache_dir, resolve_model
    from versions.catalog import read_current
    from versions.errors import PublishError
    from versions.store import StoreError, open_store

    cache_dir = cache_dir or default_cache_dir()
    try:
        store = open_store(store_uri)
        current = read_current(store)
        if current is None:
            _fail(f"{store.uri}: nothing published yet (no CURRENT)")
        manifest = current[0]
        em = resolve_model(store, manifest, model_dir=model_dir, cache_dir=cache_dir)
    except (PullError, PublishError, StoreError, ManifestError, ValueError, OSError) as e:
        _fail(str(e))
    return store, manifest, em, cache_dir


def _client(store, manifest, em, shards: str | None, cache_dir, interval: float = 30.0):
    from serving.pull import PullClient, parse_shards

    try:
        owned = parse_shards(shards, manifest.num_shards)
    except ValueError as e:
        _fail(str(e))
    return PullClient(store, em, shards=owned, cache_dir=cache_dir, interval=interval)


def pull(
    store: str = _STORE,
    shards: Optional[str] = typer.Option(None, "--shards", help="Shards this node owns, e.g. 0-15 or 0-3,8 (default: all)."),
    watch: bool = typer.Option(False, "--watch", help="Keep polling CURRENT and hot-swapping new versions."),
    interval: float = typer.Option(30.0, "--interval", help="Seconds between polls with --watch (±10% jitter)."),
    polls: int = typer.Option(0, "--polls", help="With --watch: stop after this many polls (0 = forever)."),
    cache_dir: Optional[Path] = _CACHE,
    model: Optional[Path] = _MODEL,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per poll."),
) -> None:
    """Fetch and verify the current version's shards into the local cache.

    Example: engram pull --store s3://bucket/engram --shards 0-15 --watch --interval 30
    """
    store_obj, manifest, em, cache = _open(store, model, cache_dir)
    client = _client(store_obj, manifest, em, shards, cache, interval)
    count = 0
    while True:
        result = client.poll()
        count += 1
        index = client.index
        report = {"store": store_obj.uri, "version": result.version, "changed": result.changed,
                  "fetched_shards": list(result.fetched_shards), "users": index.num_users if index else 0,
                  "shards": list(index.shards) if index else [], "delta_bytes": index.nbytes if index else 0,
                  "error": result.error}
        if as_json:
            typer.echo(json.dumps(report))
        elif result.error:
            typer.echo(f"error: {result.error} (still serving {result.version or 'nothing'})", err=True)
        else:
            what = f"loaded shards {list(result.fetched_shards)}" if result.fetched_shards else "unchanged"
            typer.echo(f"v{result.version}: {report['users']} users in {len(report['shards'])} shards ({what})")
        if not watch or (polls and count >= polls):
            break
        time.sleep(client.next_delay())
    if client.index is None:
        raise typer.Exit(1)


def ask(
    prompt: str = typer.Argument(..., help="Prompt to continue, e.g. \"My dentist is Dr.\""),
    store: str = _STORE,
    user: str = typer.Option(..., "--user", help="User whose memory the model uses."),
    compare: bool = typer.Option(False, "--compare", help="Also print the base model's continuation."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1, max=MAX_TOKENS_LIMIT, help="Tokens to generate."),
    cache_dir: Optional[Path] = _CACHE,
    model: Optional[Path] = _MODEL,
    as_json: bool = typer.Option(False, "--json", help="Print {user_id, version, text[, base_text]}."),
) -> None:
    """Continue a prompt with one user's memory (pulls only that user's shard).

    Example: engram ask --store s3://bucket/engram --user u42 --compare "My dentist is Dr."
    """
    from engram_core.serving import generate
    from versions.layout import shard_of

    user, prompt = canonical_id(user), canonical_prompt(prompt) or prompt  # as ingest stores them (engram_core.text)
    store_obj, manifest, em, cache = _open(store, model, cache_dir)
    client = _client(store_obj, manifest, em, str(shard_of(user, manifest.num_shards)), cache)
    result = client.poll()
    if client.index is None:
        _fail(result.error or "no version loaded")
    deltas = list(client.deltas_for(user))
    prompts, per_prompt = [prompt], [deltas]
    if compare:
        prompts, per_prompt = [prompt, prompt], [deltas, []]
    texts = generate(em, prompts, per_prompt, max_new_tokens=max_new_tokens)
    if not deltas:
        typer.echo(f"note: user {user!r} has no memory in v{client.index.version}; this is the base model", err=True)
    if as_json:
        out = {"user_id": user, "version": client.index.version, "text": texts[0]}
        if compare:
            out["base_text"] = texts[1]
        typer.echo(json.dumps(out))
    elif compare:
        typer.echo(f"with memory: {prompt}{texts[0]}\nbase model:  {prompt}{texts[1]}")
    else:
        typer.echo(f"{prompt}{texts[0]}")


def serve(
    store: str = _STORE,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Shards this node owns (default: all)."),
    interval: float = typer.Option(30.0, "--interval", help="Seconds between polls of CURRENT (±10% jitter)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most sequences in one forward batch."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", min=0, help="How long to collect a batch."),
    cache_dir: Optional[Path] = _CACHE,
    model: Optional[Path] = _MODEL,
) -> None:
    """Serve OpenAI-style /v1/completions; the request's `user` field selects the memory.

    Example: engram serve --store s3://bucket/engram --shards 0-15 --port 8000
    """
    store_obj, manifest, em, cache = _open(store, model, cache_dir)
    client = _client(store_obj, manifest, em, shards, cache, interval)
    result = client.poll()
    if client.index is None:
        _fail(result.error or "no version loaded")
    server = ReferenceServer(em, client, host=host, port=port, max_batch=max_batch, batch_wait_s=batch_wait_ms / 1000)
    typer.echo(f"serving v{client.index.version} ({client.index.num_users} users) as {server.model_name} "
               f"on {server.url}/v1/completions", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    # The docstrings are the help: first line in `engram --help`, the example in `engram CMD --help`.
    app.command("pull")(pull)
    app.command("ask")(ask)
    app.command("serve")(serve)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(typer.run(serve))
