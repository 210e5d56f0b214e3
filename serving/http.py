"""The reference server: the OpenAI completions API over a pull client's served version.

:class:`ReferenceServer` speaks the OpenAI completions API (``POST /v1/completions``,
``GET /v1/models``) plus ``GET /healthz``. The standard ``user`` field of a request selects the
memory: the model sees the base table plus exactly that user's delta. Requests are batched by
:class:`~serving.batcher.CompletionBatcher`.

Requests without a user, and users with no facts in the served version, get the base model;
the response says so (``X-Engram-Memory: base`` and the ``engram`` field of the body), since a
base answer is never a privacy problem but a silent one hides a client bug. A user whose shard
this node does not own is refused (HTTP 421): that is a routing error, and serving the base
model would hide it. Malformed requests get HTTP 400 with an OpenAI-style JSON error body.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from serving.batcher import CompletionBatcher
from serving.errors import RequestError

log = logging.getLogger(__name__)

MAX_PROMPTS_PER_REQUEST = 32
MAX_TOKENS_LIMIT = 512
MAX_BODY_BYTES = 1 << 20


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
