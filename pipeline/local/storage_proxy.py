"""A request-counting, fault-injecting HTTP reverse proxy for the loopback storage servers.

Put a `StorageProxy` in front of a server from `pipeline.local.storage_servers` (moto S3 or the GCS emulator)
and point the client at `proxy.endpoint_url` instead. It is for tests and benchmarks that need to

* count the storage requests a pipeline makes, by kind (PUT, COPY, LIST, ...), e.g. per clip, and
  the body bytes of object reads (to assert that no clip audio is read back);
* inject faults into uploads: answer a share of them with a 503 (in the S3 or GCS dialect) or drop
  the connection with a reset, without forwarding them, so the object is not written.

Standard library only; one thread per client connection, each with its own keep-alive upstream
connection. Request bodies (Content-Length or chunked) and response bodies are read whole and
resent with a Content-Length, so chunked encoding never crosses the proxy. The Host header is
forwarded unchanged, so SigV4 signatures still match and the GCS emulator builds resumable-session
and media URLs that point back at the proxy. It binds loopback (127.0.0.1) only.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import re
import socket
import struct
import sys
import threading
from collections import Counter
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

from pipeline.local.storage_servers import LOOPBACK

KINDS = ("PUT", "POST_INIT", "COMPLETE", "COPY", "DELETE", "ABORT", "GET", "HEAD", "LIST", "BUCKET", "OTHER")
UPLOAD_KINDS = frozenset({"PUT", "POST_INIT", "COMPLETE"})
"""The requests that write an object; faults hit only these unless `fail_kinds` says otherwise."""

GCS_PREFIXES = ("/storage/", "/upload/", "/download/", "/batch/")
"""Paths of the GCS JSON API; anything else is taken as S3 path-style (/bucket/key)."""

# Hop-by-hop headers (RFC 9110 7.6.1), plus the ones the proxy recomputes or must not pass on:
# Content-Length (bodies are resent whole) and Expect (the proxy already answered 100-continue).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
    }
)
# S3 GET/PUT query parameters that don't change what the request does to the object's bytes.
_S3_OBJECT_PARAMS = frozenset({"x-id", "versionId", "partNumber", "uploadId"})
_S3_LIST_PARAMS = frozenset(
    {"list-type", "prefix", "delimiter", "marker", "continuation-token", "start-after", "max-keys", "uploads"}
)
_BATCH_LINE = re.compile(rb"^(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+)(?: HTTP/\d(?:\.\d)?)?\r?$", re.MULTILINE)


class ProxiedRequest(NamedTuple):
    """One request as the proxy saw it, for debugging messages."""

    kind: str
    method: str
    path: str
    """The request target, with its query."""


def is_gcs_path(path: str) -> bool:
    """Whether a request path belongs to the GCS JSON API (otherwise it is S3)."""
    return path.startswith(GCS_PREFIXES)


def classify(method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"") -> str:
    """The kind of a storage request, from its method, target (path and query) and, for S3 copies
    and GCS batches, its headers and body. `headers` keys must be lower case."""
    split = urlsplit(target)
    query = parse_qs(split.query, keep_blank_values=True)
    if is_gcs_path(split.path):
        return _classify_gcs(method, split.path, query, body)
    return _classify_s3(method, split.path, query, headers or {})


def _classify_s3(method: str, path: str, query: dict[str, list[str]], headers: dict[str, str]) -> str:
    bucket, _, key = path.lstrip("/").partition("/")
    params = set(query)
    if not bucket:
        return "OTHER"  # ListBuckets
    if not key:
        return _classify_s3_bucket(method, params)
    # Presigned-URL (X-Amz-*) and response-header overrides (response-*) don't change the operation.
    extra = {p for p in params - _S3_OBJECT_PARAMS if not p.lower().startswith(("x-amz-", "response-"))}
    if method == "PUT" and not extra:
        return "COPY" if "x-amz-copy-source" in headers else "PUT"
    if method == "POST" and "uploads" in params:
        return "POST_INIT"
    if method == "POST" and "uploadId" in params and not extra:
        return "COMPLETE"
    if method == "DELETE" and not extra:
        return "ABORT" if "uploadId" in params else "DELETE"
    if method == "GET" and not extra:
        return "LIST" if "uploadId" in params else "GET"  # ListParts is a listing.
    if method == "HEAD" and not extra:
        return "HEAD"
    return "OTHER"


def _classify_s3_bucket(method: str, params: set[str]) -> str:
    if method == "GET":
        return "LIST" if not params - {"x-id"} or params & _S3_LIST_PARAMS else "BUCKET"
    if method == "HEAD":
        return "BUCKET"
    return "DELETE" if method == "POST" and "delete" in params else "OTHER"


def _classify_gcs_upload(method: str, query: dict[str, list[str]]) -> str:
    if method == "POST":
        return "POST_INIT" if query.get("uploadType") == ["resumable"] else "PUT"
    # A resumable session's data (or status) PUT; DELETE cancels a resumable session.
    return {"PUT": "PUT", "DELETE": "ABORT"}.get(method, "OTHER")


def _classify_gcs(method: str, path: str, query: dict[str, list[str]], body: bytes) -> str:
    if path.startswith("/batch/"):
        return _classify_gcs_batch(body) if method == "POST" else "OTHER"
    if path.startswith("/download/"):
        return "GET" if method == "GET" else "OTHER"
    if path.startswith("/upload/"):
        return _classify_gcs_upload(method, query)
    parts = path.split("/")  # ['', 'storage', 'v1', 'b', BUCKET, 'o', NAME, ...]
    if len(parts) < 5 or parts[3] != "b":
        return "OTHER"
    if len(parts) == 5:
        return "BUCKET" if method in ("GET", "HEAD") else "OTHER"
    if parts[5] != "o":
        return "OTHER"  # acl, iam, ...
    if len(parts) == 6 or (len(parts) == 7 and not parts[6]):
        return "LIST" if method == "GET" else "OTHER"
    if len(parts) > 7:  # Object names are percent-encoded, so more segments mean a sub-resource.
        return "COPY" if method == "POST" and parts[7] in ("rewriteTo", "copyTo") else "OTHER"
    if method in ("GET", "HEAD"):
        return "GET" if method == "GET" and query.get("alt") == ["media"] else "HEAD"
    return "DELETE" if method == "DELETE" else "OTHER"


def _classify_gcs_batch(body: bytes) -> str:
    """A batch is as many requests as it has parts, but it is one round trip: count it once, as the
    kind all its parts share (DELETE for the deletes Beam batches), else OTHER."""
    kinds = set()
    for method, target in _BATCH_LINE.findall(body):
        split = urlsplit(target.decode())
        kinds.add(_classify_gcs(method.decode(), split.path, parse_qs(split.query, keep_blank_values=True), b""))
    return kinds.pop() if len(kinds) == 1 else "OTHER"


def fault_body(path: str, status: int) -> tuple[str, bytes]:
    """(content type, body) of an injected error in the dialect of the API `path` belongs to."""
    reason = http.client.responses.get(status, "Error")
    message = f"{reason} (injected by the test storage proxy)"
    if is_gcs_path(path):
        error = {"code": status, "message": message, "errors": [{"message": message, "reason": "backendError"}]}
        return "application/json; charset=UTF-8", json.dumps({"error": error}).encode()
    code = {500: "InternalError", 503: "SlowDown"}.get(status, reason.replace(" ", ""))
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>storage-proxy</RequestId></Error>"
    )
    return "application/xml", xml.encode()


class StorageProxy:
    """Reverse proxy on `endpoint_url` in front of `upstream` (`http://127.0.0.1:PORT`).

    Counters and fault settings are guarded by one lock, so tests may read and change them while
    requests are in flight. Faults are drawn from `random.Random(seed)`, one draw per request of a
    `fail_kinds` kind: the first `drop_fraction` of [0, 1) drops, the next `fail_fraction` fails.
    The sequence is deterministic for requests made one at a time.
    """

    def __init__(
        self,
        upstream: str,
        *,
        fail_fraction: float = 0.0,
        fail_status: int = 503,
        drop_fraction: float = 0.0,
        fail_kinds: Iterable[str] = UPLOAD_KINDS,
        fail_match: str = "",
        seed: int = 0,
        timeout: float = 60.0,
    ):
        split = urlsplit(upstream)
        if split.scheme != "http" or not split.hostname or not split.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = f"http://{split.hostname}:{split.port}"
        self._upstream_address = (split.hostname, split.port)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._fail_fraction = self._drop_fraction = 0.0
        self.fail_fraction = fail_fraction
        self.drop_fraction = drop_fraction
        self.fail_status = fail_status
        self.fail_kinds = fail_kinds
        self.fail_match = fail_match
        """Faults hit only requests whose path (or, for GCS, the JSON part that starts an upload's body and
        names its object) contains this text; "" for all."""
        self._counts: Counter[str] = Counter()
        self._faults: Counter[str] = Counter()
        self._upstream_errors: Counter[str] = Counter()
        self._bytes_read = 0
        self._bytes_written = 0
        self._accepted = 0
        self._log: list[ProxiedRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> StorageProxy:
        """Bind a free loopback port and serve in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self._server = _QuietServer((LOOPBACK, 0), _make_handler(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="storage-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close client connections still kept alive, so none outlives the proxy."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> StorageProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        """`http://127.0.0.1:<port>`: give this to the client instead of the upstream URL."""
        if self._server is None:
            raise RuntimeError("proxy not started")
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    # --- fault settings --------------------------------------------------------------------------

    @property
    def fail_fraction(self) -> float:
        """Share of `fail_kinds` requests answered with `fail_status` by the proxy itself."""
        return self._fail_fraction

    @fail_fraction.setter
    def fail_fraction(self, value: float) -> None:
        with self._lock:
            self._fail_fraction = _fraction(value, "fail_fraction")

    @property
    def drop_fraction(self) -> float:
        """Share of `fail_kinds` requests whose connection is reset instead of answered."""
        return self._drop_fraction

    @drop_fraction.setter
    def drop_fraction(self, value: float) -> None:
        with self._lock:
            self._drop_fraction = _fraction(value, "drop_fraction")

    @property
    def fail_status(self) -> int:
        """Status of the injected failures (503 by default: S3 SlowDown, GCS backendError)."""
        return self._fail_status

    @fail_status.setter
    def fail_status(self, value: int) -> None:
        if not 400 <= value <= 599:
            raise ValueError(f"fail_status must be an HTTP error status, got {value}")
        with self._lock:
            self._fail_status = value

    @property
    def fail_kinds(self) -> frozenset[str]:
        """Kinds both faults may hit (default: the upload kinds PUT, POST_INIT, COMPLETE)."""
        return self._fail_kinds

    @fail_kinds.setter
    def fail_kinds(self, kinds: Iterable[str]) -> None:
        kinds = frozenset(kinds)
        if unknown := kinds - set(KINDS):
            raise ValueError(f"unknown kinds {sorted(unknown)}; known: {KINDS}")
        with self._lock:
            self._fail_kinds = kinds

    def reseed(self, seed: int) -> None:
        """Restart the fault sequence."""
        with self._lock:
            self._rng = random.Random(seed)

    # --- counters --------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Requests received per kind (faulted ones included), omitting kinds never seen."""
        with self._lock:
            return {kind: n for kind, n in self._counts.items() if n}

    def faults(self) -> dict[str, int]:
        """Faults injected: `{str(status): n, "drop": m}`, omitting those never injected."""
        with self._lock:
            return dict(self._faults)

    def upstream_errors(self) -> dict[str, int]:
        """Error answers of the server itself (not injected faults), as {"PUT 503": n}."""
        with self._lock:
            return dict(self._upstream_errors)

    def bytes_read(self) -> int:
        """Body bytes of 2xx responses to GET-kind requests: the object bytes clients read."""
        with self._lock:
            return self._bytes_read

    def bytes_written(self) -> int:
        """Body bytes of forwarded upload-kind requests (as sent, including any multipart framing)."""
        with self._lock:
            return self._bytes_written

    def connections(self) -> int:
        """Client connections accepted: with keep-alive working, far fewer than requests."""
        with self._lock:
            return self._accepted

    @property
    def log(self) -> list[ProxiedRequest]:
        """Every request since the last `reset()`, in arrival order (a copy)."""
        with self._lock:
            return list(self._log)

    def reset(self) -> None:
        """Zero the counters and clear the log; fault settings and the random sequence are kept."""
        with self._lock:
            self._counts.clear()
            self._faults.clear()
            self._upstream_errors.clear()
            self._bytes_read = self._bytes_written = self._accepted = 0
            self._log.clear()

    # --- used by the handler ---------------------------------------------------------------------

    def _admit(self, kind: str, method: str, path: str, body: bytes = b"") -> str | None:
        """Record a request; return the fault to inject ("drop" or the status), or None to forward."""
        with self._lock:
            self._counts[kind] += 1
            self._log.append(ProxiedRequest(kind, method, path))
            if kind not in self._fail_kinds or not (self._drop_fraction or self._fail_fraction):
                return None
            named_in_body = is_gcs_path(path) and self.fail_match.encode() in body[:1024]  # upload's JSON part
            if self.fail_match and self.fail_match not in path and not named_in_body:
                return None
            draw = self._rng.random()
            if draw < self._drop_fraction:
                fault = "drop"
            elif draw < self._drop_fraction + self._fail_fraction:
                fault = str(self._fail_status)
            else:
                return None
            self._faults[fault] += 1
            return fault

    def _forwarded(self, kind: str, request_bytes: int, status: int, response_bytes: int) -> None:
        with self._lock:
            if status >= 400:
                self._upstream_errors[f"{kind} {status}"] += 1
            if kind in UPLOAD_KINDS:
                self._bytes_written += request_bytes
            if kind == "GET" and 200 <= status < 300:
                self._bytes_read += response_bytes

    def _track(self, sock: socket.socket, alive: bool) -> None:
        with self._lock:
            if alive:
                self._connections.add(sock)
                self._accepted += 1
            else:
                self._connections.discard(sock)


def _fraction(value: float, name: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients hanging up mid-request is normal in fault tests; report anything else."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _make_handler(proxy: StorageProxy) -> type[BaseHTTPRequestHandler]:
    return type("StorageProxyHandler", (_ProxyHandler,), {"proxy": proxy})


class _ProxyHandler(BaseHTTPRequestHandler):
    """Handles one client connection (keep-alive), forwarding over one upstream connection."""

    protocol_version = "HTTP/1.1"  # Keep-alive; also makes the base class answer `Expect: 100-continue`.
    proxy: StorageProxy
    _upstream: http.client.HTTPConnection | None = None
    _upstream_used = False

    def setup(self) -> None:
        super().setup()
        self.proxy._track(self.connection, alive=True)

    def finish(self) -> None:
        self.proxy._track(self.connection, alive=False)
        if self._upstream is not None:
            self._upstream.close()
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the base class writes every request to stderr."""

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def _proxy(self) -> None:
        body = self._read_body()
        headers = {name.lower(): value for name, value in self.headers.items()}
        kind = classify(self.command, self.path, headers, body)
        fault = self.proxy._admit(kind, self.command, self.path, body)
        if fault == "drop":
            self._reset_connection()
        elif fault is not None:
            self._send_fault(int(fault))
        else:
            self._forward(kind, body)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after the chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, dropped
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, kind: str, body: bytes) -> None:
        # Headers named in Connection are hop-by-hop too.
        hop = _HOP_BY_HOP | {h.strip().lower() for h in self.headers.get("Connection", "").split(",")}
        headers = [(name, value) for name, value in self.headers.items() if name.lower() not in hop]
        has_body = bool(body) or "Content-Length" in self.headers or "Transfer-Encoding" in self.headers
        if has_body:
            headers.append(("Content-Length", str(len(body))))
        try:
            response, data = self._exchange(headers, body if has_body else None)
        except (OSError, http.client.HTTPException) as e:
            self.proxy._forwarded(kind, len(body), 502, 0)
            self._send(502, [("Content-Type", "text/plain")], f"storage proxy: upstream failed: {e!r}".encode())
            return
        self.proxy._forwarded(kind, len(body), response.status, len(data))
        hop = _HOP_BY_HOP | {h.strip().lower() for h in (response.getheader("Connection") or "").split(",")}
        out = [(name, self._rewrite(name, value)) for name, value in response.getheaders() if name.lower() not in hop]
        if self.command == "HEAD" or response.status in (204, 304):
            # No body, but a HEAD's Content-Length is the object's size: pass it through.
            out += [("Content-Length", v) for n, v in response.getheaders() if n.lower() == "content-length"]
            self._send(response.status, out, b"", response.reason, set_length=False)
        else:
            self._send(response.status, out, data, response.reason)

    def _exchange(self, headers: list[tuple[str, str]], body: bytes | None) -> tuple[http.client.HTTPResponse, bytes]:
        """Send upstream and read the whole response; retry once on a fresh connection if a reused
        keep-alive connection turns out to have been closed by the upstream while idle."""
        for attempt in (0, 1):
            if self._upstream is None:
                host, port = self.proxy._upstream_address
                self._upstream = http.client.HTTPConnection(host, port, timeout=self.proxy._timeout)
                self._upstream_used = False
            conn = self._upstream
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    conn.putheader(name, value)
                conn.endheaders(body)
                response = conn.getresponse()
                data = response.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                conn.close()
                self._upstream = None
                if attempt or not self._upstream_used:
                    raise
                continue
            self._upstream_used = True
            if response.will_close:
                conn.close()
                self._upstream = None
            return response, data
        raise AssertionError("unreachable")

    def _rewrite(self, name: str, value: str) -> str:
        """Point redirects and session URLs the upstream builds from its own address at the proxy."""
        if name.lower() == "location" and value.startswith(self.proxy.upstream):
            return self.proxy.endpoint_url + value[len(self.proxy.upstream) :]
        return value

    def _send_fault(self, status: int) -> None:
        content_type, body = fault_body(self.path, status)
        self._send(status, [("Content-Type", content_type)], body)

    def _send(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        reason: str | None = None,
        *,
        set_length: bool = True,
    ) -> None:
        # send_response_only: the upstream already sent Server and Date; don't add a second pair.
        self.send_response_only(status, reason or None)
        for name, value in headers:
            self.send_header(name, value)
        if set_length:
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:  # The client sent `Connection: close` (or spoke HTTP/1.0).
            self.send_header("Connection", "close")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _reset_connection(self) -> None:
        """Close with SO_LINGER 0, so the client gets a TCP reset, not a response or a clean FIN."""
        self.close_connection = True
        sock = self.connection
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # rfile holds a reference that would defer the real close until finish(), after the
        # server's shutdown(SHUT_WR) has already sent a FIN.
        self.rfile.close()
        sock.close()
