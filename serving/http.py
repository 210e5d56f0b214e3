"""The reference server: the OpenAI completions and chat completions APIs over a pull client's served version.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both also streamed as
server-sent events with ``"stream": true``), ``GET /v1/models``, ``GET /healthz`` (readiness, also
``GET /readyz``), ``GET /livez`` (liveness). The standard
``user`` field of a request selects the memory: the model sees the base table plus exactly that
user's delta. Requests of every kind are batched together by
:class:`~serving.batcher.CompletionBatcher`; chat messages are rendered by the checkpoint's chat
template (:mod:`serving.chat`, which also says how a chat reaches a user's facts).

Requests without a user, and users with no facts in the served version, get the base model;
the response says so (``X-Engram-Memory: base`` and the ``engram`` field of the body and of
every streamed chunk), since a base answer is never a privacy problem but a silent one hides a
client bug. A user whose shard this node does not own is refused (HTTP 421): that is a routing
error, and serving the base model would hide it. A node whose version has gone unconfirmed for
longer than ``--max-stale`` (the store does not answer) refuses every request naming a user (HTTP
503, ``memory_too_stale``) and ``/healthz`` answers 503 with ``status: "too_stale"`` and a
``reason`` naming the age and the bound, until a poll reaches the store. A node with no version
loaded yet (nothing published in its store, or its store has not answered and its cache holds no
last-good) answers ``/healthz`` 503 with ``status: "no_version"`` and a ``reason`` naming the store,
and refuses every request naming a user (HTTP 503, ``no_version``); a request with no user gets the
base model. Before its model is loaded at all (:class:`StartingNode`: the store is being read, or
it waits for the first version to name the model), ``/healthz`` answers 503 ``starting`` or
``no_version`` and every other route 503. ``/livez`` answers 200 ``{"status": "alive", ...}`` whenever
the node works: starting, waiting for a first version, or for a store that does not answer (a
restart would not make any of them ready sooner); 503 ``{"status": "wedged", "reason": ...}`` only
when its poller thread died or one poll has gone without an answer from the store far longer than
a store that never answers takes to fail it (serving.pull.PullClient.wedged), or its batcher
thread died or is stuck inside a decode (no step for ENGRAM_WEDGED_BATCH_S while it has work:
serving.batcher.CompletionBatcher.wedged): then a restart is the fix. Malformed requests get
HTTP 400 with an OpenAI-style JSON error body (``error.message``, ``type``, ``param``, ``code``);
a prompt that does not fit the model's context is ``context_length_exceeded``.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import select
import socket
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from engram_core.text import canonical_id, canonical_prompt, canonical_text
from serving.batcher import CLIENT_CHECK_S, ClientGone, CompletionBatcher, GenerationRequest
from serving.chat import ChatTemplate
from serving.decode import Sampling
from serving.errors import RequestError, seconds_from_env
from serving.openai_api import (DEFAULT_COMPLETION_TOKENS, MAX_TOKENS_LIMIT, Answer, ApiRequest, chunk, error_body,
                                parse_request, response, usage, usage_chunk)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_DISCARD_BYTES = 64 << 20  # a refused body up to this size is read and dropped before the answer (no reset)
BODY_READ_TIMEOUT_S = 30.0  # the longest a request's body may take to arrive without a byte
ROUTES = {"/v1/completions": "completions", "/v1/chat/completions": "chat.completions"}  # POST
GET_ROUTES = ("/healthz", "/readyz", "/livez", "/v1/models")
READY_ROUTES = ("/healthz", "/readyz")  # readiness: 200 only while a version is served (a load balancer's probe)
LIVE_ROUTE = "/livez"  # liveness: 200 while the node works, waiting or not (a restart would not help otherwise)
EVENT_TIMEOUT_S = 120.0  # the longest a request waits for its batch, or a stream for its next step
SHUTDOWN_POLL_WAIT_S = 2.0  # the longest shutdown waits for a poll in progress
HEADER_READ_TIMEOUT_S = 30.0
"""The longest a connection may take to send a request's line and headers (a new connection, or the
next request on a kept-alive one), ``$ENGRAM_HEADER_TIMEOUT_S`` where set: a client that opens a
connection and sends nothing, or headers a byte at a time (slowloris), held a handler thread for good."""
HEADER_READ_TIMEOUT_ENV = "ENGRAM_HEADER_TIMEOUT_S"


def header_read_seconds() -> float:
    """:data:`HEADER_READ_TIMEOUT_S`, or ``$ENGRAM_HEADER_TIMEOUT_S`` (seconds, above 0) where set;
    ValueError naming the variable for any other value."""
    return seconds_from_env(HEADER_READ_TIMEOUT_ENV, HEADER_READ_TIMEOUT_S)


IDLE_TIMEOUT_S = 75.0
"""The longest a connection may stay silent before the first byte of a request (a new connection, or
a kept-alive one between requests), ``$ENGRAM_KEEPALIVE_S`` where set; then it is closed. Above the
60 s idle timeouts of AWS load balancers and nginx's upstream keepalive, which would otherwise send a
request on a connection the node had just closed (a 502 for a POST, which they do not retry)."""
IDLE_TIMEOUT_ENV = "ENGRAM_KEEPALIVE_S"


def idle_seconds() -> float:
    """:data:`IDLE_TIMEOUT_S`, or ``$ENGRAM_KEEPALIVE_S`` (seconds, above 0) where set; ValueError
    naming the variable for any other value."""
    return seconds_from_env(IDLE_TIMEOUT_ENV, IDLE_TIMEOUT_S)


JSON_MEDIA_TYPES = "application/json (or application/*+json)"
SHUTDOWN_CHECK_S = 0.05  # how often the HTTP loop looks for a shutdown (socketserver: 0.5 s)


def context_length(em) -> int:
    """The most tokens (prompt + completion) the model attends to: its config's position limit."""
    config = em.model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"model {em.path}: its config names no context length (max_position_embeddings)")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 resets connections under a burst of clients

    def __init__(self, *args, **kwargs):
        self.header_timeout = header_read_seconds()  # a bad ENGRAM_HEADER_TIMEOUT_S: ValueError before binding
        self.idle_timeout = idle_seconds()  # a bad ENGRAM_KEEPALIVE_S too
        super().__init__(*args, **kwargs)

    def serve_forever(self, poll_interval: float = SHUTDOWN_CHECK_S) -> None:
        """As socketserver's, but looking for a shutdown every 50 ms, not 0.5 s: ``shutdown()`` (a
        node stopping, a server closing) waited up to half a second for the loop to notice."""
        super().serve_forever(poll_interval)

    def handle_error(self, request, client_address):
        """A client that resets or leaves its connection is no server fault: one DEBUG line, not a traceback
        on stderr (socketserver's default) for every client closing a kept-alive connection."""
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("client %s closed its connection: %s", client_address, sys.exc_info()[1])
        else:
            super().handle_error(request, client_address)


class _HeadReader(io.RawIOBase):
    """The connection's bytes for a handler's ``rfile``: while a request's line and headers are read
    (``handler._head_deadline`` set), each read is given only the time left until a deadline: the
    idle bound until the request's first byte, then the head's bound from that byte, so the whole
    head is bounded however slowly its bytes come; else the socket's own timeout applies (None, or
    the body's while it is read)."""

    def __init__(self, handler: "_JsonHandler"):
        super().__init__()
        self.handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        handler, sock = self.handler, self.handler.connection
        deadline = handler._head_deadline
        if deadline is None:
            return sock.recv_into(buffer)
        if not handler._head_bytes:
            deadline = handler._idle_deadline  # waiting for a request to begin (a kept-alive connection)
        left = deadline - time.monotonic()
        if left <= 0:
            handler._head_timed_out = True
            raise TimeoutError("the request's line and headers did not arrive in time")
        previous = sock.gettimeout()
        sock.settimeout(left)
        try:
            got = sock.recv_into(buffer)
        except TimeoutError:
            handler._head_timed_out = True
            raise
        finally:
            sock.settimeout(previous)
        if got and not handler._head_bytes:  # the request began: its head has the head's bound from now
            handler._head_deadline = time.monotonic() + handler._head_timeout
        handler._head_bytes += got
        return got


class _JsonHandler(BaseHTTPRequestHandler):
    """JSON answers, OpenAI's error shape, and the route table's 404/405s (every method). A request
    whose line and headers have not all arrived within the server's ``header_timeout`` is answered
    408 (some of it came) or its connection closed (nothing came: an idle connection)."""

    protocol_version = "HTTP/1.1"
    _head_deadline: float | None = None

    def setup(self):
        super().setup()
        self.rfile = io.BufferedReader(_HeadReader(self), 1 << 16)

    def handle_one_request(self):
        timeout = getattr(self.server, "header_timeout", HEADER_READ_TIMEOUT_S)
        now = time.monotonic()
        self._head_timeout, self._idle_deadline = timeout, now + getattr(self.server, "idle_timeout", IDLE_TIMEOUT_S)
        self._head_deadline, self._head_bytes, self._head_timed_out = now + timeout, 0, False
        try:
            super().handle_one_request()  # a TimeoutError while reading closes the connection
        finally:
            self._head_deadline = None
        if self._head_timed_out:
            self.close_connection = True
            if self._head_bytes:  # a client mid-request (slowloris, a stalled proxy): it can read an answer
                body = json.dumps(error_body(RequestError(
                    f"the request's line and headers did not all arrive within {timeout:g}s "
                    f"({HEADER_READ_TIMEOUT_ENV}); send the whole request head at once", status=408,
                    code="timeout"))).encode()
                try:
                    self.wfile.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                    self.wfile.flush()
                except OSError:
                    pass
            log.debug("%s: %s; connection closed", self.client_address,
                      f"request head not received within {timeout:g}s of its first byte ({self._head_bytes} bytes came)"
                      if self._head_bytes else "idle past the keep-alive bound")

    def parse_request(self) -> bool:
        try:
            return super().parse_request()
        finally:
            self._head_deadline = None  # the head is in: the body has its own bound (BODY_READ_TIMEOUT_S)

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
        self._send(e.status, error_body(e))

    def _route_refused(self) -> bool:
        """Answer an unknown path (404) or a method its route does not take (405, with
        ``Allow``), in OpenAI's error shape, whatever the method; True if answered."""
        path = self.path.split("?", 1)[0]
        allowed = "POST" if path in ROUTES else "GET" if path in GET_ROUTES else None
        if allowed is not None and (self.command == allowed or (allowed == "GET" and self.command == "HEAD")):
            return False
        if allowed is None:
            error = RequestError(f"no route {self.command} {path} (this server offers "
                                 f"{', '.join(f'GET {r}' for r in GET_ROUTES)}, "
                                 f"{', '.join(f'POST {r}' for r in ROUTES)})", status=404, code="not_found")
            headers = {}
        else:
            error = RequestError(f"method {self.command} is not allowed on {path}; use {allowed}", status=405,
                                 code="method_not_allowed")
            headers = {"Allow": allowed}
        self.close_connection = True  # a body it may carry is not read
        if self.command == "HEAD":
            self._head(error.status, error_body(error), headers)
        else:
            self._send(error.status, error_body(error), headers)
        return True

    def _head(self, status: int, payload: dict, headers: dict | None = None) -> None:
        """GET's status and headers without its body (load balancers probe with HEAD)."""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(json.dumps(payload).encode())))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def __getattr__(self, name: str):  # PUT, DELETE, TRACE, any other method: 404 or 405
        if name.startswith("do_"):
            return self._route_refused
        raise AttributeError(name)


class StartingNode:
    """The port of a node whose model is not loaded yet, answering while it starts (the store is
    read, the model fetched; or nothing is published yet and the first version will name the model):
    ``GET /healthz`` (and ``/readyz``) 503 ``{"status": "starting" | "no_version", "reason": ...,
    "version": null, ...}`` as :meth:`set` last said, ``GET /livez`` 200 ``{"status": "alive", "phase":
    status, "reason": ...}``, every POST route 503 ``no_version`` with that reason, ``/v1/models``
    503 too (which model is not known yet), unknown routes 404/405. A :class:`ReferenceServer` given
    it as ``listener`` takes its socket over, so the port answers throughout. Binding raises OSError
    (a port in use, a host not this machine's), as ReferenceServer does."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8000, *, reason: str = "starting"):
        self._state = ("starting", reason)  # (status, reason): one reference, read by request threads
        self.httpd = _HTTPServer((host, port), self._handler_class())
        self.thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self.httpd.server_address[0]

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def serving(self) -> bool:
        return self.thread is not None

    def set(self, status: str, reason: str) -> None:
        """What ``/healthz`` says now: ``status`` "starting" (reading the store, loading the model) or
        "no_version" (the store has nothing this node can serve yet), and why (one line)."""
        self._state = (status, reason)

    def health(self) -> dict:
        status, reason = self._state
        return {"status": status, "reason": reason, "model": None, "fingerprint": None, "version": None, "users": 0,
                "shards": [], "last_error": reason if status == "no_version" else None, "stale": None}

    def start(self) -> "StartingNode":
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="engram-http", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        """Stop answering and free the port (a node that exits before a ReferenceServer took it over)."""
        if self.thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()

    def _handler_class(self):
        node = self

        class Handler(_JsonHandler):
            def end_headers(self):
                # Every answer ends its connection: the server picks a handler per connection, so a
                # kept-alive one (a load balancer's health check) would stay with this node's 503s
                # after a ReferenceServer took the port over.
                self.send_header("Connection", "close")
                super().end_headers()

            def _refusal(self) -> tuple[int, dict]:
                health = node.health()
                path = self.path.split("?", 1)[0]
                if path == LIVE_ROUTE:  # starting or waiting is alive: a restart would only start again
                    return 200, {"status": "alive", "phase": health["status"], "reason": health["reason"]}
                if path in READY_ROUTES:
                    return 503, health
                error = RequestError(f"this node serves nothing yet ({health['status']}): {health['reason']}; retry "
                                     "once /healthz answers 200", status=503, code="no_version")
                return 503, error_body(error)

            def do_GET(self):
                if not self._route_refused():
                    self._send(*self._refusal())

            def do_HEAD(self):
                if not self._route_refused():
                    self._head(*self._refusal())

            def do_POST(self):
                if not self._route_refused():
                    self.close_connection = True  # its body is not read
                    self._send(*self._refusal())

        return Handler


class ReferenceServer:
    """OpenAI-compatible completions and chat completions over a :class:`~serving.pull.PullClient`'s served version.

    ``chat_template``: a Jinja chat template file to render chats with instead of the
    checkpoint's own (needed for a checkpoint without one); a file that cannot be used (a syntax
    error, not UTF-8) raises serving.chat.ChatTemplateError (a ValueError) here. ``stop_at_memory_end``:
    the node's default for requests that leave out the body field of that name (serving.decode.Sampling).
    ``listener``: a :class:`StartingNode` whose socket (bound, perhaps already answering) this server
    takes over from the next request on, so the port answers throughout a node's start (``host`` and
    ``port`` are then not used). ``wedged_batch_after``: seconds without progress on its work after
    which the batcher is wedged for ``/livez`` (default: serving.batcher.wedged_batch_seconds()).
    """

    def __init__(self, em, client, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32,
                 batch_wait_s: float = 0.005, poll: bool = True, chat_template: str | Path | None = None,
                 stop_at_memory_end: bool = False, listener: "StartingNode | None" = None,
                 wedged_batch_after: float | None = None):
        self.em, self.client, self.poll = em, client, poll
        self.stop_at_memory_end = stop_at_memory_end
        self.model_name = f"engram-{em.fingerprint[:12]}"
        self.chat = ChatTemplate(em.tokenizer, chat_template)
        self.context_length = context_length(em)
        self.batcher = CompletionBatcher(em, client, max_batch=max_batch, wait_s=batch_wait_s,
                                         wedged_after=wedged_batch_after)
        self._listener = listener
        if listener is None:
            self.httpd = _HTTPServer((host, port), self._handler_class())
        else:  # requests from now on get this server's handler (one attribute, read per request)
            self.httpd = listener.httpd
            self.httpd.RequestHandlerClass = self._handler_class()
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
        if self._listener is not None and self._listener.serving:
            self._thread = self._listener.thread  # already answering: it goes on with this server's handler
        else:
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
        # not the 30 s of a poll hung on a store that does not answer: Kubernetes' grace period after
        # SIGTERM is 30 s, then SIGKILL
        self.client.stop(timeout=SHUTDOWN_POLL_WAIT_S)

    def __enter__(self) -> "ReferenceServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def health(self) -> dict:
        from engram_core.row_kernels import KERNELS

        index = self.client.index
        stale = self.client.stale()  # the served version is not confirmed CURRENT: which, since when, the error
        too_stale = self.client.over_max_stale()  # and for longer than --max-stale: no user is served
        reason = self.no_version() if index is None else too_stale
        return {
            "status": "no_version" if index is None else "too_stale" if too_stale else "stale" if stale is not None else "ok",
            "reason": reason,
            "model": self.model_name,
            "fingerprint": self.em.fingerprint,
            "version": index.version if index is not None else None,
            "users": index.num_users if index is not None else 0,
            "shards": list(index.shards) if index is not None else [],
            "scopes": len(index.scopes.deltas) if index is not None else 0,  # shared scopes composed under members
            "last_error": self.client.last_error,
            "stale": stale,
            "batches": self.batcher.batches,
            "sequences": self.batcher.sequences,
            "streamed_sequences": self.batcher.streamed,
            "mixed_batches": self.batcher.mixed_batches,
            "cancelled_sequences": self.batcher.cancelled,
            "largest_batch": self.batcher.largest_batch,
            "chat_template": self.chat.source,
            "context_length": self.context_length,
            "stop_at_memory_end": self.stop_at_memory_end,  # the default for requests that do not say
            "row_kernels": KERNELS.status() if self.em.device.type == "cpu" else "not used (CUDA model)",
        }

    def liveness(self) -> tuple[int, dict]:
        """``/livez``: (200, ``{"status": "alive", "ready": bool}``) while the node works, ready or
        not (waiting for a first version, for a store that does not answer); (503, ``{"status":
        "wedged", "reason": ...}``) when its batcher thread died or has made no progress on its work
        for ENGRAM_WEDGED_BATCH_S (serving.batcher.CompletionBatcher.wedged), or its poller is wedged
        (serving.pull.PullClient.wedged: its thread died, or a poll has not come back for far longer
        than ENGRAM_HUNG_POLL_S)."""
        wedged = None
        if not self.batcher.alive():
            wedged = "the batcher thread has died; restart the node"
        else:
            wedged = self.batcher.wedged()  # alive, and stuck inside one decode (a hang, a deadlock)
        if wedged is None and self.poll:
            wedged = self.client.wedged()
        if wedged is not None:
            return 503, {"status": "wedged", "reason": wedged}
        health = self.health()
        return 200, {"status": "alive", "ready": health["version"] is not None and not health["reason"],
                     "phase": health["status"]}

    def no_version(self) -> str:
        """Why no version is served (while the client has none): its last poll's error (or that
        the poll in progress has had no answer for longer than ENGRAM_HUNG_POLL_S), or that the
        first pull is under way."""
        error = self.client.error()
        return (f"no version of {self.client.store.uri} is loaded yet: "
                + (f"{error}; polling every {self.client.interval:g}s" if error else "the first pull is under way"))

    # -- requests ---------------------------------------------------------------------------

    def prepare(self, endpoint: str, body: bytes) -> tuple[ApiRequest, GenerationRequest]:
        """Validate, route-check and tokenize a request body for ``endpoint``; RequestError if refused."""
        api = parse_request(body, endpoint, (self.model_name, "engram"))
        # Canonical forms (engram_core.text): the user id as ingest stores it, prompts as facts are
        # compiled, so what a user types (NFD, a trailing space, an invisible character) reaches them.
        if api.user is not None:
            api = replace(api, user=canonical_id(api.user) or api.user)
            too_stale = self.client.over_max_stale()
            if too_stale:  # the memory it would get may be long outdated (a forget, a correction it missed)
                raise RequestError(too_stale, status=503, param="user", code="memory_too_stale")
            if self.client.index is None:  # the base model would hide that the user's memory is missing
                raise RequestError(self.no_version() + "; retry once /healthz answers 200", status=503, param="user",
                                   code="no_version")
        self._check_owner(api.user)
        if api.is_chat:
            messages = [dict(m, content=canonical_text(m["content"])) for m in api.messages]
            continued = api.continue_final_message
            if continued is None:  # serving.chat's default: an assistant prefill is continued
                continued = messages[-1]["role"] == "assistant" and not api.add_generation_prompt
            if continued:  # the continued text ends where a trigger ends: as compiled
                messages[-1]["content"] = canonical_prompt(messages[-1]["content"]) or messages[-1]["content"]
            rendered = self.chat.render(messages, add_generation_prompt=api.add_generation_prompt,
                                        continue_final_message=api.continue_final_message)
            prompt_ids = [rendered.prompt_ids]
        else:
            prompt_ids = self.em.encode_prompts([canonical_prompt(p) or p for p in api.prompts])
        sampling = Sampling(max_tokens=self._max_tokens(api, prompt_ids), temperature=api.temperature,
                            top_p=api.top_p, seed=api.seed, stop=api.stop, stream=api.stream,
                            stop_at_memory_end=(self.stop_at_memory_end if api.stop_at_memory_end is None
                                                else api.stop_at_memory_end))
        return api, GenerationRequest(prompt_ids, api.user, sampling, n=api.n)

    def _check_owner(self, user: str | None) -> None:
        index = self.client.index
        if user is not None and index is not None and not index.owns(user):
            from versions.layout import shard_of

            shard = shard_of(user, index.num_shards)
            raise RequestError(f"user {user!r} is in shard {shard}, which this node does not serve "
                               f"(it serves {list(index.shards)}); route it to its shard's node",
                               status=421, param="user", code="wrong_shard")

    def _max_tokens(self, api: ApiRequest, prompt_ids: list[list[int]]) -> int:
        """The request's max_tokens (or its endpoint's default), refused if the context cannot hold it."""
        param = "messages" if api.is_chat else "prompt"
        longest = max(len(p) for p in prompt_ids)
        if longest == 0:
            raise RequestError(f"the {param} render to no tokens; nothing to continue", param=param)
        room = self.context_length - longest
        wanted = api.max_tokens
        if wanted is None:
            wanted = min(MAX_TOKENS_LIMIT, max(room, 1)) if api.is_chat else DEFAULT_COMPLETION_TOKENS
        if longest + wanted > self.context_length:
            raise RequestError(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{longest + wanted} tokens ({longest} in the {param}, {wanted} for the completion). Please reduce "
                f"the length of the {param} or of max_tokens.", param=param, code="context_length_exceeded")
        return wanted

    def answer_for(self, api: ApiRequest, request: GenerationRequest) -> Answer:
        reason = "user" if request.memory == "user" else ("no user" if api.user is None else "user has no memory")
        engram = {"user": api.user, "memory": request.memory, "reason": reason, "version": request.version}
        return Answer.start(api, self.model_name, engram)

    @staticmethod
    def usage_of(request: GenerationRequest) -> dict:
        """Tokens as the model saw them: each prompt once (n choices share it), every generated id."""
        return usage(sum(len(p) for p in request.prompt_ids), sum(len(s.token_ids) for s in request.states))

    @staticmethod
    def engram_headers(request: GenerationRequest) -> dict[str, str]:
        headers = {"X-Engram-Memory": request.memory}
        if request.version is not None:  # None: no version loaded yet (a request with no user, the base model)
            headers["X-Engram-Version"] = str(request.version)
        return headers

    def answer(self, api: ApiRequest, request: GenerationRequest,
               client_gone=None) -> tuple[dict, dict[str, str]]:
        """A non-streamed request, decoded -> (response body, headers); RequestError on failure,
        serving.batcher.ClientGone (the request cancelled) once ``client_gone()`` says its client left."""
        self.batcher.submit(request, timeout=EVENT_TIMEOUT_S, client_gone=client_gone)
        answer = self.answer_for(api, request)
        body = response(answer, [s.text for s in request.states], [s.finish_reason for s in request.states],
                        self.usage_of(request))
        return body, self.engram_headers(request)

    def _handler_class(self):
        server = self

        class Handler(_JsonHandler):
            def _chunked(self) -> bool:
                """HTTP/1.1 clients get a stream chunked; an HTTP/1.0 one (nginx's proxy_pass by default, curl
                --http1.0) knows no chunks: its body is the events as they are, ended by closing the connection."""
                return self.request_version != "HTTP/1.0"

            def _write_chunk(self, data: bytes) -> None:
                """One piece of a chunked (HTTP/1.1) body; ``b""`` ends the body."""
                if not self._chunked():
                    if data:
                        self.wfile.write(data)
                    return
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

            def _events(self, payloads: list[dict], *, done: bool = False) -> None:
                data = b"".join(b"data: " + json.dumps(p).encode() + b"\n\n" for p in payloads)
                self._write_chunk(data + (b"data: [DONE]\n\n" if done else b""))

            def _client_gone(self) -> bool:
                """True once the client has closed its connection (or it broke): it waits for no answer.
                A connection with bytes to read (a pipelined next request) is a client still there."""
                try:
                    readable, _, _ = select.select([self.connection], [], [], 0)
                    return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
                except (OSError, ValueError):  # reset, or already closed
                    return True

            def _next_event(self, request: GenerationRequest) -> tuple[str, object]:
                """The request's next event; ("gone", None) once its client left (the request is cancelled)."""
                deadline = time.monotonic() + EVENT_TIMEOUT_S
                while True:
                    try:
                        return request.events.get(timeout=CLIENT_CHECK_S)
                    except queue.Empty:
                        pass
                    if self._client_gone():
                        request.cancel()
                        return "gone", None
                    if time.monotonic() >= deadline:
                        request.cancel()
                        return "error", RequestError(f"no progress within {EVENT_TIMEOUT_S:.0f}s (server overloaded)",
                                                     status=504, code="timeout")

            def _stream(self, api: ApiRequest, request: GenerationRequest) -> None:
                """Server-sent events: one chunk per choice per step, then (usage and) ``data: [DONE]``.

                Headers go out with the first step's tokens, so a batch that fails before it is an
                ordinary JSON error; a failure later is an ``error`` event and no ``[DONE]``."""
                server.batcher.enqueue(request)
                kind, payload = self._next_event(request)
                if kind == "gone":  # left before the first step: nothing to send
                    self.close_connection = True
                    return
                if kind == "error":
                    self._error(payload)
                    return
                answer = server.answer_for(api, request)
                self.send_response(200)
                framing = {"Transfer-Encoding": "chunked"} if self._chunked() else {"Connection": "close"}
                for name, value in {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                    **framing, **server.engram_headers(request)}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.close_connection = self.close_connection or not self._chunked()
                try:
                    if api.is_chat:  # OpenAI's first chunk of a choice names the role
                        self._events([chunk(answer, i, "", None, first=True, include_usage=api.include_usage)
                                      for i in range(request.num_sequences)])
                    while kind == "delta":
                        self._events([chunk(answer, d.index, d.text, d.finish_reason, include_usage=api.include_usage)
                                      for d in payload])
                        kind, payload = self._next_event(request)
                    if kind == "gone":
                        self.close_connection = True
                        return
                    if kind == "end":
                        self._events([usage_chunk(answer, server.usage_of(request))] if api.include_usage else [],
                                     done=True)
                    else:
                        self._events([error_body(payload)])
                    self._write_chunk(b"")
                except (BrokenPipeError, ConnectionResetError):  # the client left: stop its sequences
                    request.cancel()
                    self.close_connection = True

            def _get(self) -> tuple[int, dict]:
                path = self.path.split("?", 1)[0]
                if path == LIVE_ROUTE:
                    return server.liveness()
                if path in READY_ROUTES:
                    health = server.health()
                    return (200 if health["version"] is not None and not health["reason"] else 503), health
                return 200, {"object": "list", "data": [
                    {"id": server.model_name, "object": "model", "created": 0, "owned_by": "engram"}]}

            def do_GET(self):
                if not self._route_refused():
                    self._send(*self._get())

            def do_HEAD(self):
                if not self._route_refused():
                    self._head(*self._get())

            def _body_refusal(self) -> RequestError | None:
                """Why this POST's body is not read (chunked, no usable Content-Length, over MAX_BODY_BYTES), or None."""
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    # the body's length must be known before it is read (MAX_BODY_BYTES)
                    return RequestError("a chunked request body (Transfer-Encoding: chunked) is not accepted; "
                                        "send the body with a Content-Length header", status=411, code="length_required")
                text = (self.headers.get("Content-Length") or "0").strip()
                if not text.isdigit():
                    return RequestError(f"Content-Length {text!r} is not a number of bytes; send the body's length")
                length = int(text)
                if length > MAX_BODY_BYTES:
                    param = "messages" if self.path.split("?", 1)[0] == "/v1/chat/completions" else "prompt"
                    return RequestError(
                        f"the request body is {length:,} bytes, over this server's limit of {MAX_BODY_BYTES:,} "
                        f"(1 MiB); shorten the {param} (the model's context holds {server.context_length} tokens)",
                        param=param, code="request_too_large")
                declared = self.headers.get("Content-Type")
                media = (declared or "").split(";", 1)[0].strip().lower()
                if declared is not None and media != "application/json" and not (
                        media.startswith("application/") and media.endswith("+json")):
                    # FastAPI (vLLM's server) parses a body as JSON only under a JSON Content-Type; a
                    # form-encoded one is what curl -d sends without -H
                    return RequestError(
                        f"Content-Type {declared!r} is not JSON: this API reads the body as JSON only when the "
                        f"Content-Type header says {JSON_MEDIA_TYPES}; send the header Content-Type: "
                        "application/json (curl: -H 'Content-Type: application/json')", status=415,
                        code="unsupported_media_type")
                return None

            def handle_expect_100(self) -> bool:
                """``Expect: 100-continue`` (curl's, for bodies over 1 KiB): a body that would be refused
                is refused before the client sends it."""
                if self.command == "POST" and self.path.split("?", 1)[0] in ROUTES:
                    refusal = self._body_refusal()
                    if refusal is not None:
                        self.close_connection = True
                        self._error(refusal)
                        return False
                return super().handle_expect_100()

            def _read_body(self, length: int) -> bytes | None:
                """The body's ``length`` bytes; None (answered, or the client gone) if it does not all arrive
                within BODY_READ_TIMEOUT_S (a Content-Length larger than what the client sends)."""
                self.connection.settimeout(BODY_READ_TIMEOUT_S)
                try:
                    body = self.rfile.read(length)
                except (TimeoutError, OSError):
                    body = None
                finally:
                    self.connection.settimeout(None)
                if body is None:
                    self.close_connection = True
                    self._error(RequestError(f"the request body did not all arrive: Content-Length says {length:,} bytes "
                                             f"and they stopped coming (no byte for {BODY_READ_TIMEOUT_S:g}s); send exactly Content-Length "
                                             "bytes", status=408, code="timeout"))
                    return None
                if len(body) < length:  # the client closed its side before sending it all: nobody to answer
                    self.close_connection = True
                    return None
                return body

            def _discard_body(self, length: int) -> None:
                """Read and drop a refused body (up to MAX_DISCARD_BYTES), so that the client, still sending it,
                reads the refusal instead of a reset connection."""
                self.connection.settimeout(BODY_READ_TIMEOUT_S)
                try:
                    while length > 0 and self.rfile.read(min(length, 1 << 16)):
                        length -= 1 << 16
                except OSError:
                    pass
                finally:
                    self.connection.settimeout(None)

            def do_POST(self):
                path = self.path.split("?", 1)[0]
                if self._route_refused():
                    return
                refusal = self._body_refusal()
                if refusal is not None:
                    length = (self.headers.get("Content-Length") or "").strip()
                    if length.isdigit() and refusal.status != 411 and int(length) <= MAX_DISCARD_BYTES:
                        self._discard_body(int(length))  # the client still sending it reads the refusal
                    self._error(refusal)
                    self.close_connection = True
                    return
                body = self._read_body(int((self.headers.get("Content-Length") or "0").strip()))
                if body is None:
                    return
                endpoint = ROUTES[path]
                try:
                    api, request = server.prepare(endpoint, body)
                    if api.stream:
                        self._stream(api, request)
                        return
                    response_body, headers = server.answer(api, request, client_gone=self._client_gone)
                except RequestError as e:
                    self._error(e)
                    return
                except ClientGone:  # it closed the connection: its sequences stopped, nothing to answer
                    self.close_connection = True
                    return
                self._send(200, response_body, headers)

        return Handler
