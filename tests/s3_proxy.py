"""A loopback HTTP proxy in front of the test's S3 server that mishandles conditional writes the
way some S3-compatible servers and gateways do.

- ``ignore``: PUTs lose their ``If-None-Match`` / ``If-Match`` headers on the way, and are
  re-signed (SigV4, with botocore's signer and the test credentials) so that the server accepts
  them: the client believes its conditions were sent, the server never sees them.
- ``501``: a PUT carrying either header is answered ``501 NotImplemented`` (what S3 answered
  before it supported them), everything else goes through.
- ``pass``: everything goes through unchanged.

Every request is counted in ``requests`` as (method, path, condition headers sent).

``deny_deletes``: path fragments; a DELETE whose path holds one is answered ``403 AccessDenied``
(a bucket policy, object lock or legal hold on some keys), in any mode.

``refuse_reads``: path fragment -> HTTP status (403 AccessDenied, 404 NoSuchKey, 503 SlowDown): every
GET and HEAD of a path holding it is answered so (a bucket policy change, a deleted key, an overloaded
server), in any mode. ``port``: listen there (0: any free port), so a test can stop the proxy (the
store does not answer: connection refused) and start one again at the same endpoint.

``refuse_checksums``: a request carrying botocore's flexible-checksum headers (``x-amz-sdk-checksum-
algorithm``, ``x-amz-checksum-*``, ``x-amz-trailer``) or an aws-chunked body is answered ``400
InvalidArgument`` naming the header, as Backblaze B2 and other S3-compatible servers answered
boto3 1.36's new defaults; a PUT's ``Content-MD5`` is checked against the body it brings (``400
BadDigest``), as every S3 server checks it. Every request's headers are kept in ``headers``.

``cut_gets``: path fragment -> how many GETs of a path holding it break off mid-body (the status
and the whole ``Content-Length`` are sent, then half the body, then the connection closes: a
network drop or a load balancer timing out mid-download), in any mode.

``etags``: how the server writes ETags in its answers (PUT, HEAD, GET): ``"unquoted"`` (``abc``),
``"weak"`` (``W/"abc"``, as a gateway that compresses or re-frames bodies marks them) or
``"opaque"`` (``"<other hex>-1"``, not the body's MD5, as multipart uploads, SSE-KMS and some
servers give), or ``"kms"`` (``"<other hex>"``: 32 hex digits as an MD5 has, not the body's, as
SSE-KMS gives); an ``If-Match`` is compared with the ETag as the server writes it (an opaque one
is mapped back to the upstream's before it is forwarded, re-signed).

``list_encoding``: a ListObjectsV2 asked for ``encoding-type=url`` is answered with the keys
``"raw"`` (not encoded, although the answer says ``<EncodingType>url``) or ``"unflagged"``
(encoded, with no ``EncodingType`` element, so the client does not decode them).

``list_lag``: a key written by a PUT is left out of the next ``list_lag`` listings that would
show it (an eventually consistent listing).

``fail``: ``(method, path fragment) -> [status, ...]``: the next matching requests are answered
with these statuses in turn (``503 SlowDown``, ``500 InternalError``) before any go through.

``lose_answers``: ``(method, path fragment) -> count``: the next matching requests go through
and their answer is replaced by ``500 InternalError`` (the write landed; the answer was lost, as
on a server or gateway that fails after committing): the client's retry meets its own write.

``hang_gets``: path fragments; a GET of a path holding one is read and never answered while the
proxy runs (a frozen backend: the connection is open, no byte comes back); stopping the proxy drops
it unanswered.

``lengths``: ``"head_without_length"``: HEAD answers carry no ``Content-Length``;
``"get_short"``: a GET's answer says ``Content-Length`` of half its body and sends that half on
a connection that stays good (a truncation the client cannot see as a dropped connection).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, unquote_plus, urlparse

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

CONDITIONS = ("If-None-Match", "If-Match")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
_ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied'
                  b"</Message></Error>")
_READ_ERRORS = {403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError", 503: "SlowDown"}
_NOT_IMPLEMENTED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NotImplemented</Code><Message>A header '
                    b"you provided implies functionality that is not implemented</Message></Error>")


def _error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            "</Error>").encode()


class _KeepContentHash(S3SigV4Auth):
    """Re-sign a request as it is: its x-amz-content-sha256 (a body hash, or a streaming marker
    for aws-chunked bodies) stays what the client sent."""

    def _modify_request_before_signing(self, request):
        content_hash = request.headers["X-Amz-Content-SHA256"]
        super()._modify_request_before_signing(request)
        del request.headers["X-Amz-Content-SHA256"]
        request.headers["X-Amz-Content-SHA256"] = content_hash


class ConditionProxy:
    def __init__(self, upstream_url: str, mode: str, *, access_key: str, secret_key: str, region: str = "us-east-1",
                 deny_deletes: tuple[str, ...] = (), cut_gets: dict[str, int] | None = None, port: int = 0,
                 refuse_reads: dict[str, int] | None = None, refuse_checksums: bool = False,
                 etags: str | None = None, list_encoding: str | None = None, list_lag: int = 0,
                 fail: dict[tuple[str, str], list[int]] | None = None, lengths: str | None = None,
                 lose_answers: dict[tuple[str, str], int] | None = None, hang_gets: tuple[str, ...] = ()):
        if mode not in ("ignore", "501", "pass"):
            raise ValueError(f"mode {mode!r}: one of ignore, 501, pass")
        self.upstream = urlparse(upstream_url)
        self.mode = mode
        self.deny_deletes = tuple(deny_deletes)
        self.cut_gets = dict(cut_gets or {})
        self.refuse_reads = dict(refuse_reads or {})
        self.refuse_checksums = refuse_checksums
        self.etags, self.list_encoding, self.list_lag, self.lengths = etags, list_encoding, list_lag, lengths
        self.fail = {k: list(v) for k, v in (fail or {}).items()}
        self.lose_answers = dict(lose_answers or {})
        self.hang_gets = tuple(hang_gets)
        self._stopped = threading.Event()  # releases the hung GETs (unanswered) when the proxy stops
        self._opaque: dict[str, str] = {}  # an opaque etag (quoted) -> the upstream's
        self._lagging: dict[str, int] = {}  # upstream key -> listings it is still left out of
        self.headers: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers lower-cased)
        self.signer = _KeepContentHash(Credentials(access_key, secret_key), "s3", region)
        self.requests: list[tuple[str, str, tuple[str, ...]]] = []
        self._connections: set = set()  # clients' open (keep-alive) sockets, closed when the proxy stops
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())  # a port: a store coming back
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "ConditionProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        """Stop listening and drop every open connection (as a server that goes down does)."""
        import socket

        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
        for connection in list(self._connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def puts_with_conditions(self) -> int:
        return sum(1 for method, _, sent in self.requests if method == "PUT" and sent)

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def setup(self) -> None:
                super().setup()
                proxy._connections.add(self.connection)

            def finish(self) -> None:
                proxy._connections.discard(self.connection)
                super().finish()

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
                sent = tuple(k for k, _ in headers if k.lower() in {c.lower() for c in CONDITIONS})
                proxy.requests.append((self.command, self.path, sent))
                lowered = {k.lower(): v for k, v in headers}
                proxy.headers.append((self.command, self.path, lowered))
                if proxy.refuse_checksums:
                    flexible = next((k for k in lowered if k in ("x-amz-sdk-checksum-algorithm", "x-amz-trailer")
                                     or k.startswith("x-amz-checksum-")), None)
                    if flexible is None and "aws-chunked" in lowered.get("content-encoding", ""):
                        flexible = "content-encoding: aws-chunked"
                    if flexible is not None:
                        self.close_connection = True  # a chunked body was not read off the socket
                        return self._answer(400, [("Content-Type", "application/xml")], _error(
                            "InvalidArgument", f"Unsupported header '{flexible}' received for this API call."))
                    md5 = lowered.get("content-md5")
                    if self.command == "PUT" and md5 is not None and \
                            base64.b64encode(hashlib.md5(body).digest()).decode() != md5:
                        return self._answer(400, [("Content-Type", "application/xml")], _error(
                            "BadDigest", "The Content-MD5 you specified did not match what we received."))
                if self.command == "GET" and any(part in self.path for part in proxy.hang_gets):
                    proxy._stopped.wait()
                    self.close_connection = True
                    return None
                failing = next((k for k, left in proxy.fail.items() if left and k[0] == self.command
                                and k[1] in self.path), None)
                if failing is not None:
                    status = proxy.fail[failing].pop(0)
                    return self._answer(status, [("Content-Type", "application/xml")], _error(
                        _READ_ERRORS[status], "Please reduce your request rate." if status == 503 else
                        "We encountered an internal error. Please try again."))
                if self.command == "DELETE" and any(part in self.path for part in proxy.deny_deletes):
                    return self._answer(403, [("Content-Type", "application/xml")], _ACCESS_DENIED)
                refused = next((status for part, status in proxy.refuse_reads.items() if part in self.path), None)
                if self.command in ("GET", "HEAD") and refused is not None:
                    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{_READ_ERRORS[refused]}</Code>' \
                           "</Error>"
                    return self._answer(refused, [("Content-Type", "application/xml")], body.encode())
                if self.command == "PUT" and sent and proxy.mode == "501":
                    return self._answer(501, [("Content-Type", "application/xml")], _NOT_IMPLEMENTED)
                if self.command == "PUT" and sent and proxy.mode == "ignore":
                    headers = proxy.resign(self.command, self.path, headers, body)
                if_match = lowered.get("if-match")
                if proxy.etags in ("opaque", "kms") and if_match in proxy._opaque:
                    headers = proxy.resign(self.command, self.path, headers, body,
                                           replace={"If-Match": proxy._opaque[if_match]})
                status, reply_headers, reply = proxy.forward(self.command, self.path, headers, body)
                reply_headers, reply = proxy.quirks(self.command, self.path, status, reply_headers, reply)
                lost = next((k for k, left in proxy.lose_answers.items() if left and k[0] == self.command
                             and k[1] in self.path), None)
                if lost is not None:
                    proxy.lose_answers[lost] -= 1
                    return self._answer(500, [("Content-Type", "application/xml")], _error(
                        "InternalError", "We encountered an internal error. Please try again."))
                if proxy.lengths == "get_short" and self.command == "GET" and status == 200 and "list-type" \
                        not in self.path:
                    return self._answer(status, reply_headers, reply[:len(reply) // 2])
                cut = next((part for part, left in proxy.cut_gets.items() if left and part in self.path), None)
                if self.command == "GET" and status == 200 and cut is not None:
                    proxy.cut_gets[cut] -= 1
                    self.close_connection = True
                    return self._answer(status, reply_headers, reply, cut_at=len(reply) // 2)
                self._answer(status, reply_headers, reply)

            def _answer(self, status: int, headers: list, body: bytes, cut_at: int | None = None) -> None:
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(body)))
                elif proxy.lengths != "head_without_length":
                    self.send_header("Content-Length", dict((k.lower(), v) for k, v in headers).get("content-length",
                                                                                                    "0"))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body if cut_at is None else body[:cut_at])

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _relay

        return Handler

    def quirks(self, method: str, path: str, status: int, headers: list, body: bytes) -> tuple[list, bytes]:
        """The upstream's answer as the mimicked server writes it (``etags``, ``list_encoding``, ``list_lag``)."""
        if self.etags:
            headers = [(k, self._etag(v) if k.lower() == "etag" else v) for k, v in headers]
        if method == "PUT" and status == 200 and self.list_lag:
            self._lagging[unquote(urlparse(path).path.split("/", 2)[2])] = self.list_lag
        if method == "GET" and status == 200 and "list-type=2" in path:
            text = body.decode()
            for key in list(self._lagging):
                entry = None
                for written in (quote(key, safe="/~"), key):  # as encoding-type=url asked, or raw
                    entry = entry or re.search(r"<Contents>(?:(?!</Contents>).)*<Key>" + re.escape(written) +
                                               r"</Key>.*?</Contents>", text, re.S)
                if entry is not None:
                    text = text.replace(entry.group(0), "")
                    self._lagging[key] -= 1
                    if not self._lagging[key]:
                        del self._lagging[key]
            if self.list_encoding == "raw":
                text = re.sub(r"<Key>(.*?)</Key>", lambda m: f"<Key>{unquote_plus(m.group(1))}</Key>", text)
                text = re.sub(r"<Prefix>(.*?)</Prefix>", lambda m: f"<Prefix>{unquote_plus(m.group(1))}</Prefix>",
                              text)
            elif self.list_encoding == "unflagged":
                text = re.sub(r"<EncodingType>.*?</EncodingType>", "", text)
            body = text.encode()
        return headers, body

    def _etag(self, value: str) -> str:
        bare = value.strip('"')
        if self.etags == "unquoted":
            return bare
        if self.etags == "weak":
            return f'W/"{bare}"'
        opaque = f'"{hashlib.md5(bare.encode()).hexdigest()}{"" if self.etags == "kms" else "-1"}"'
        self._opaque[opaque] = f'"{bare}"'
        return opaque

    def resign(self, method: str, path: str, headers: list, body: bytes, replace: dict[str, str] | None = None) -> list:
        """The request without its condition headers (or with ``replace``'s values for them),
        signed again as the client would have signed it."""
        if replace is not None:
            headers = [(k, replace.get(k.title(), v)) for k, v in headers]
        kept = {k: v for k, v in headers if (replace is not None or k.lower() not in {c.lower() for c in CONDITIONS})
                and k.lower() not in ("authorization", "x-amz-date")}
        request = AWSRequest(method=method, url=f"http://{kept['Host']}{path}", headers=kept, data=body)
        self.signer.add_auth(request)
        return list(request.headers.items())

    def forward(self, method: str, path: str, headers: list, body: bytes) -> tuple[int, list, bytes]:
        connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for key, value in headers:
                connection.putheader(key, value)
            connection.endheaders(body or None)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()
