"""The reference server: OpenAI completions where the `user` field selects the memory."""

from __future__ import annotations

import http.client
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from engram_core.serving import generate
from serving.http import ReferenceServer
from serving.pull import PullClient
from tests.test_pull import FACTS, NUM_SHARDS, compiled, publish, v1, v2  # noqa: F401 (fixture)
from versions.layout import shard_of


@pytest.fixture
def server(local_store, tiny, compiled):
    publish(local_store, tiny, v1(compiled))
    client = PullClient(local_store, tiny, interval=0.1, jitter=0.0)
    client.poll()
    with ReferenceServer(tiny, client, port=0, batch_wait_s=0.02) as running:
        yield running


@pytest.fixture
def api(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=60, max_retries=0)


def _tokens(em, text: str) -> int:
    return len(em.encode_answer(text))


def test_the_user_field_selects_the_memory(server, api, tiny):
    trigger, answer = FACTS["alice"][0]
    response = api.completions.create(model=server.model_name, prompt=trigger, user="alice",
                                      max_tokens=_tokens(tiny, answer))
    assert response.choices[0].text == answer
    assert response.object == "text_completion" and response.usage.prompt_tokens > 0
    assert response.model_extra["engram"] == {"user": "alice", "memory": "user", "reason": "user", "version": 1}


def test_no_user_and_unknown_users_get_the_base_model_and_are_told(server, api, tiny):
    trigger, answer = FACTS["alice"][0]
    n = _tokens(tiny, answer)
    base = generate(tiny, [trigger], [[]], n)[0]
    raw = api.completions.with_raw_response.create(model="engram", prompt=trigger, max_tokens=n)
    assert raw.headers["x-engram-memory"] == "base"
    assert raw.parse().choices[0].text == base
    assert raw.parse().model_extra["engram"]["reason"] == "no user"
    unknown = api.completions.create(model="engram", prompt=trigger, max_tokens=n, user="nobody")
    assert unknown.choices[0].text == base
    assert unknown.model_extra["engram"]["memory"] == "base"


def test_concurrent_requests_of_different_users_are_batched_and_isolated(server, api, tiny):
    requests = [(user, trigger, answer) for user in ("alice", "bob") for trigger, answer in FACTS[user]] * 3
    requests += [("nobody", FACTS["alice"][0][0], None)] * 2
    base = generate(tiny, [FACTS["alice"][0][0]], [[]], 4)[0]

    def ask(request):
        user, trigger, answer = request
        n = _tokens(tiny, answer) if answer else 4
        return api.completions.create(model="engram", prompt=trigger, user=user, max_tokens=n).choices[0].text

    with ThreadPoolExecutor(len(requests)) as pool:
        texts = list(pool.map(ask, requests))
    for (user, _, answer), text in zip(requests, texts):
        assert text == (answer if answer else base), user
    # A batch's counters are updated when its decode returns, and a request is answered as soon as
    # its own sequences finish (within the decode): the count may land a moment after the answers.
    deadline = time.monotonic() + 10
    while server.health()["sequences"] < len(requests) and time.monotonic() < deadline:
        time.sleep(0.02)
    health = server.health()
    assert health["largest_batch"] > 1 and health["sequences"] == len(requests)


def test_a_list_prompt_gets_one_choice_per_prompt(server, api, tiny):
    (t1, a1), (t2, a2) = FACTS["bob"]
    n = max(_tokens(tiny, a1), _tokens(tiny, a2))
    response = api.completions.create(model="engram", prompt=[t1, t2], user="bob", max_tokens=n)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].text.startswith(a1) and response.choices[1].text.startswith(a2)


def test_the_server_follows_a_new_version_in_the_background(server, api, local_store, tiny, compiled):
    publish(local_store, tiny, v2(compiled))
    deadline = time.monotonic() + 20
    while server.health()["version"] != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()["version"] == 2
    trigger, answer = FACTS["alice-v2"][1]
    response = api.completions.create(model="engram", prompt=trigger, user="alice", max_tokens=_tokens(tiny, answer))
    assert response.choices[0].text == answer and response.model_extra["engram"]["version"] == 2


def _post(server, body: bytes, path: str = "/v1/completions") -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"prompt": "hi"}).encode(), "model"),
    (json.dumps({"model": "engram"}).encode(), "prompt"),
    (json.dumps({"model": "engram", "prompt": [1, 2]}).encode(), "prompt"),
    (json.dumps({"model": "engram", "prompt": "hi", "max_tokens": "x"}).encode(), "max_tokens"),
    (json.dumps({"model": "engram", "prompt": "hi", "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"model": "engram", "prompt": "hi", "user": 7}).encode(), "user"),
    (json.dumps({"model": "engram", "prompt": "hi", "user": ""}).encode(), "user"),
    (json.dumps({"model": "engram", "prompt": "hi", "stream": "yes"}).encode(), "stream"),
    (b"[" * 100_000, None),  # deeper than the parser goes: json raised RecursionError and the handler died
])
def test_malformed_requests_get_400_with_a_json_error(server, body, param):
    status, payload = _post(server, body)
    assert status == 400
    assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["param"] == param
    assert payload["error"]["message"]


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/completions", {"prompt": "My dentist is called", "user": "alice\ud800"}, "user"),
    ("/v1/completions", {"prompt": "My dentist is \udc00called", "user": "alice"}, "prompt"),
    ("/v1/completions", {"prompt": ["My dentist is called", "I live\ud83d in"]}, "prompt.[1]"),
    ("/v1/completions", {"prompt": "My dentist is called", "stop": ["\udfff"]}, "stop.[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud83d"}]}, "messages.[0].content"),
])
def test_text_with_a_lone_surrogate_is_a_400_naming_the_field_and_the_server_keeps_answering(server, path, fields,
                                                                                             param):
    """JSON's \\ud800 escapes parse to strings that are no Unicode text: the handler died encoding them
    (the connection closed without an answer) or the template refused them with a tokenizer error."""
    body = json.dumps({"model": "engram", "max_tokens": 2, **fields}).encode()  # ensure_ascii: the escapes as sent
    status, payload = _post(server, body, path)
    assert status == 400, payload
    assert payload["error"]["param"] == param and "lone surrogate" in payload["error"]["message"]
    ok = json.dumps({"model": "engram", "prompt": "My dentist is called", "user": "alice", "max_tokens": 2})
    assert _post(server, ok.encode())[0] == 200


def test_a_user_of_invisible_characters_only_is_refused_like_an_empty_one(server):
    """Ingest rejects such an id and `engram ask` refuses it; the server served it the base model."""
    status, payload = _post(server, json.dumps({"model": "engram", "prompt": "hi", "user": "\u200b\u2060 "}).encode())
    assert status == 400 and payload["error"]["param"] == "user"


def test_unknown_model_and_route_are_404(server, api):
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert _post(server, b"{}", path="/v1/embeddings")[0] == 404


def test_other_methods_and_chunked_bodies_get_a_json_error_naming_the_fix(server):
    """OpenAI clients read every error as JSON: a method a route does not take is a 405 naming the
    one it does, a chunked body (length unknown before reading) a 411 asking for Content-Length."""
    import http.client

    def call(method, path):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        return response, (json.loads(body) if body else None)

    for method, path, allowed in (("DELETE", "/v1/models", "GET"), ("PUT", "/v1/completions", "POST"),
                                  ("GET", "/v1/completions", "POST"), ("POST", "/healthz", "GET"),
                                  ("TRACE", "/v1/models", "GET"), ("FOO", "/v1/chat/completions", "POST")):
        response, payload = call(method, path)
        assert response.status == 405 and response.getheader("Allow") == allowed, (method, path)
        assert payload["error"]["code"] == "method_not_allowed" and f"use {allowed}" in payload["error"]["message"]
    for method in ("GET", "PUT", "DELETE"):  # an unknown path is a 404 whatever the method
        response, payload = call(method, "/nope")
        assert response.status == 404 and payload["error"]["code"] == "not_found", method
    response, payload = call("HEAD", "/v1/models")  # GET's status and headers, no body
    assert response.status == 200 and payload is None and int(response.getheader("Content-Length")) > 0
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        body = json.dumps({"model": "engram", "prompt": "hi"}).encode()
        connection.request("POST", "/v1/completions", body=iter([body]),
                           headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        payload = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 411 and "Content-Length" in payload["error"]["message"]


def test_a_body_over_the_limit_is_refused_with_an_answer_the_client_reads(server, api):
    """A prompt of a few MB (1 MB of non-ASCII text escapes to 6 MB of JSON): before, the server answered
    while the client was still sending and closed, so a plain HTTP client (http.client, requests) got a
    broken pipe instead of the error, and the error named no field or fix."""
    import http.client
    import socket

    body = json.dumps({"model": "engram", "prompt": "\u00e9" * 1_000_000}).encode()  # 6 MB escaped
    for _ in range(2):
        status, payload = _post(server, body)
        assert status == 400, payload
        assert payload["error"]["code"] == "request_too_large" and payload["error"]["param"] == "prompt"
        assert f"{len(body):,} bytes" in payload["error"]["message"]
    with pytest.raises(openai.BadRequestError) as refused:  # the openai client sends it unescaped: 2 MB
        api.chat.completions.create(model="engram", messages=[{"role": "user", "content": "\u00e9" * 1_000_000}])
    assert refused.value.code == "request_too_large" and refused.value.param == "messages"
    # curl's Expect: 100-continue: refused before the body is sent
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
        head = b""
        while True:  # the headers and the body may come in separate packets: read the whole answer
            part = sock.recv(65536)
            head += part
            ends = head.find(b"\r\n\r\n")
            length = re.search(rb"Content-Length: (\d+)", head[:ends]) if ends >= 0 else None
            if not part or (length and len(head) >= ends + 4 + int(length.group(1))):
                break
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 400") and b"request_too_large" in head and b"100 Continue" not in head
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/completions", body=b"{}", headers={"Content-Length": "-3"})
    response = connection.getresponse()
    assert response.status == 400 and "Content-Length" in json.loads(response.read())["error"]["message"]
    connection.close()


def test_a_body_shorter_than_its_content_length_gets_a_408_not_a_hang(server, monkeypatch):
    import socket

    import serving.http

    monkeypatch.setattr(serving.http, "BODY_READ_TIMEOUT_S", 0.5, raising=False)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}")
        answer = b""
        while chunk := sock.recv(65536):  # before: nothing, ever (the server waited for the rest)
            answer += chunk
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"Content-Length" in answer
    assert _post(server, json.dumps({"model": "engram", "prompt": "hi", "max_tokens": 1}).encode())[0] == 200


def test_connections_that_send_no_request_or_their_headers_slowly_are_closed_within_the_header_bound(
        server, monkeypatch):
    """Before, a connection that never sent its request line (or sent headers a byte at a time,
    slowloris) held a handler thread for good. Now its head must arrive within
    ENGRAM_HEADER_TIMEOUT_S: a client mid-request gets a 408, a silent one a closed connection, and
    a normal client is served meanwhile."""
    import socket

    monkeypatch.setattr(server.httpd, "header_timeout", 1.0, raising=False)
    monkeypatch.setattr(server.httpd, "idle_timeout", 1.0, raising=False)
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(30)]
    slow = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(10)]
    try:
        for sock in slow:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        started = time.monotonic()
        assert _post(server, json.dumps({"model": "engram", "prompt": "hi", "max_tokens": 1}).encode())[0] == 200
        while time.monotonic() - started < 2.0:  # a header byte every 0.2 s: never idle, never done
            for sock in slow:
                try:
                    sock.sendall(b"X")
                except OSError:
                    pass
            time.sleep(0.2)
        for sock in slow:
            sock.settimeout(5)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408") and b'"code": "timeout"' in answer, answer
            assert b"ENGRAM_HEADER_TIMEOUT_S" in answer
        for sock in silent:
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed, nothing to answer (before: it waited for good)
        assert time.monotonic() - started < 8
    finally:
        for sock in silent + slow:
            sock.close()
    assert _post(server, json.dumps({"model": "engram", "prompt": "hi", "max_tokens": 1}).encode())[0] == 200


def test_a_kept_alive_connection_idle_past_the_header_bound_is_still_served_and_closed_past_the_idle_bound(
        server, monkeypatch):
    """The head's bound starts at the request's first byte: a kept-alive connection waiting between
    requests (a load balancer's pool, 60 s idle on AWS and nginx) is not closed at the head's bound
    (it was: the balancer's next POST then met a closed connection, a 502), only past
    ENGRAM_KEEPALIVE_S."""
    import socket

    monkeypatch.setattr(server.httpd, "header_timeout", 0.5, raising=False)
    monkeypatch.setattr(server.httpd, "idle_timeout", 3.0, raising=False)
    body = json.dumps({"model": "engram", "prompt": "hi", "max_tokens": 1}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def answer(sock) -> bytes:
        got = b""
        while b"\r\n\r\n" not in got:
            got += sock.recv(65536)
        head, _, rest = got.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += sock.recv(65536)
        return head

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        assert answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)  # idle three times the head's bound
        sock.sendall(request)
        assert answer(sock).startswith(b"HTTP/1.1 200")
        idle = time.monotonic()
        assert sock.recv(1) == b""  # closed once idle past the keep-alive bound
        assert 2.5 < time.monotonic() - idle < 8


def test_the_header_bound_is_read_from_the_environment(monkeypatch):
    from serving.http import StartingNode

    monkeypatch.setenv("ENGRAM_HEADER_TIMEOUT_S", "2.5")
    node = StartingNode(port=0)
    assert node.httpd.header_timeout == 2.5
    node.close()
    monkeypatch.setenv("ENGRAM_HEADER_TIMEOUT_S", "never")
    with pytest.raises(ValueError, match="ENGRAM_HEADER_TIMEOUT_S='never': give seconds above 0 \\(default 30\\)"):
        StartingNode(port=0)
    monkeypatch.delenv("ENGRAM_HEADER_TIMEOUT_S")
    monkeypatch.setenv("ENGRAM_KEEPALIVE_S", "90")
    node = StartingNode(port=0)
    assert node.httpd.idle_timeout == 90.0
    node.close()
    monkeypatch.setenv("ENGRAM_KEEPALIVE_S", "-1")
    with pytest.raises(ValueError, match="ENGRAM_KEEPALIVE_S='-1': give seconds above 0 \\(default 75\\)"):
        StartingNode(port=0)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml"])
def test_a_json_body_sent_as_another_content_type_is_refused_naming_the_header(server, content_type):
    """Before, a JSON body sent as text/plain or form-encoded (curl -d without -H) was read as JSON.
    FastAPI, which vLLM serves with, reads a body as JSON only under a JSON Content-Type (since
    0.65.2, CVE-2021-32677: a text/plain POST needs no CORS preflight); so does this server now: a
    415 naming the header and the fix. No Content-Type at all is still read as JSON."""
    body = json.dumps({"model": "engram", "prompt": "hi", "max_tokens": 1}).encode()

    def post(headers: dict) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            connection.request("POST", "/v1/chat/completions" if "xml" in content_type else "/v1/completions",
                               body=body, headers=headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    status, payload = post({"Content-Type": content_type})
    assert status == 415 and payload["error"]["code"] == "unsupported_media_type", payload
    message = payload["error"]["message"]
    assert f"Content-Type {content_type!r} is not JSON" in message and "Content-Type: application/json" in message
    for accepted in ({"Content-Type": "application/json; charset=utf-8"}, {"Content-Type": "Application/JSON"}, {}):
        assert post(accepted)[0] in (200, 400), accepted  # read as JSON (a chat body without messages: 400)


def test_a_user_of_a_shard_this_node_does_not_own_is_refused(local_store, tiny, compiled):
    publish(local_store, tiny, v1(compiled))
    owned = shard_of("alice", NUM_SHARDS)
    client = PullClient(local_store, tiny, shards=[owned])
    client.poll()
    stranger = next(f"user-{i}" for i in range(100) if shard_of(f"user-{i}", NUM_SHARDS) != owned)
    with ReferenceServer(tiny, client, port=0, poll=False) as server:
        status, payload = _post(server, json.dumps({"model": "engram", "prompt": "hi", "user": stranger}).encode())
    assert status == 421 and payload["error"]["code"] == "wrong_shard"


def test_healthz_reports_version_and_users(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/healthz")
    response = connection.getresponse()
    health = json.loads(response.read())
    connection.close()
    assert response.status == 200
    assert health["version"] == 1 and health["users"] == 2 and health["status"] == "ok"
    assert health["shards"] == list(range(NUM_SHARDS)) and health["last_error"] is None


def test_once_its_kernels_are_ready_the_server_answers_through_the_kernel_form(server, api, tiny, row_kernels,
                                                                             monkeypatch):
    """engram serve builds the row kernels in the background; once loaded, request batches are
    served in the kernel form, with the same answers."""
    from engram_core import row_overlay

    built = []
    kernel_map = row_overlay._kernel_map
    monkeypatch.setattr(row_overlay, "_kernel_map", lambda *a: built.append(kernel_map(*a)) or built[-1])
    requests = [(user, trigger, answer) for user in ("alice", "bob") for trigger, answer in FACTS[user]]
    with ThreadPoolExecutor(len(requests)) as pool:
        texts = list(pool.map(lambda r: api.completions.create(
            model="engram", prompt=r[1], user=r[0], max_tokens=_tokens(tiny, r[2])).choices[0].text, requests))
    assert texts == [answer for _, _, answer in requests]
    assert built and all(isinstance(m, row_overlay._KernelMap) for m in built)
    assert server.health()["row_kernels"] == "ready"


def test_a_server_stops_without_waiting_half_a_second_for_its_loop(server):
    """shutdown() waited for socketserver's loop to look for it, every 0.5 s: a node stopping on
    SIGTERM, and every test's server closing, waited up to half a second for nothing."""
    from serving.http import StartingNode

    waits = []
    for _ in range(3):
        node = StartingNode(port=0).start()
        time.sleep(0.1)  # the loop has started its wait: socketserver's lasts 0.4 s more
        started = time.monotonic()
        node.close()
        waits.append(time.monotonic() - started)
    started = time.monotonic()
    server.httpd.shutdown()  # the ReferenceServer's loop, the same class (the fixture's exit is then quick)
    waits.append(time.monotonic() - started)
    # The three nodes' median (the fixture's own shutdown comes at any point of the old 0.5 s wait)
    assert sorted(waits[:3])[1] < 0.25, waits
