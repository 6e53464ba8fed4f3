"""An HTTP proxy in front of the test S3 server that injects store faults (tests only).

    proxy = FaultProxy(s3.endpoint)           # a real HTTP/1.1 server on 127.0.0.1
    env = {**s3.env, "AWS_ENDPOINT_URL": proxy.endpoint}
    proxy.fault("refuse", 20)                 # every request answered 503 SlowDown for 20 s
    proxy.fault("refuse", 20, when=r"PUT \\S*/step_00000004/manifest\\.json")  # armed: starts
                                              # when a matching request arrives (that one too)
    proxy.fault("hang", None, when=...)       # accept, read the request, never answer
    proxy.fault("reset")                      # close every connection with RST, no answer
    proxy.fault("answer", 20, answer="ServiceUnavailable")  # a documented error answer
    proxy.fault("short")                      # the upstream's answer, its body cut in half
    proxy.heal()                              # everything forwarded again (armed faults too)
    proxy.refused                             # how many requests got a fault so far
    proxy.close()

Forwarding: each request (method, path, headers, body) is sent to the upstream server on a
keep-alive connection of the handling thread and its answer sent back (body read whole, so
Content-Length is always set; `Expect: 100-continue` is answered here, not forwarded).
moto checks no signatures, so the Host header the client signed may stay the proxy's.
Faults are decided per request when it arrives: the mode of the fault in force then, if any.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

# Error answers as S3 and GCS document them: name -> (HTTP status, S3 error code, GCS reason).
# S3's body is its XML <Error>; GCS's the JSON API's {"error": {"code", "message", "errors":
# [{"reason", ...}]}}; the proxy's `flavour` picks one.
ANSWERS = {
    "InternalError": (500, "InternalError", "internalError"),
    "ServiceUnavailable": (503, "ServiceUnavailable", "backendError"),
    "SlowDown": (503, "SlowDown", "rateLimitExceeded"),
    "RequestTimeout": (400, "RequestTimeout", None),
    "408": (408, "RequestTimeout", "requestTimeout"),
    "429": (429, "TooManyRequests", "rateLimitExceeded"),
    "502": (502, "BadGateway", "backendError"),
    "504": (504, "GatewayTimeout", "backendError"),
    "AccessDenied": (403, "AccessDenied", "forbidden"),
    "InvalidAccessKeyId": (403, "InvalidAccessKeyId", "forbidden"),
    "SignatureDoesNotMatch": (403, "SignatureDoesNotMatch", "forbidden"),
    "NoSuchBucket": (404, "NoSuchBucket", "notFound"),
    "BadRequest": (400, "InvalidArgument", "invalid"),
}


def error_body(name: str, flavour: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of the error answer `name` (ANSWERS) as `flavour`
    ('s3' or 'gcs') sends it."""
    import json
    status, code, reason = ANSWERS[name]
    message = f"fault proxy: {name}"
    if flavour == "gcs":
        errors = [{"domain": "global", "reason": reason, "message": message}] if reason else []
        body = {"error": {"code": status, "message": message, "errors": errors}}
        return status, "application/json; charset=UTF-8", json.dumps(body).encode()
    return status, "application/xml", (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>'
        f"{message}</Message><RequestId>fault-proxy</RequestId></Error>").encode()


SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message>"
             b"<RequestId>fault-proxy</RequestId></Error>")
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-connection", "expect"}


class _Fault:
    def __init__(self, mode: str, seconds: float | None, when: str | None, after: bool,
                 nth: int = 1, answer: str | None = None):
        self.mode, self.seconds, self.after, self.nth = mode, seconds, after, nth
        self.answer = answer
        self.when = re.compile(when) if when else None
        self.start = None if when else time.monotonic()

    def active(self, now: float) -> bool:
        return self.start is not None and self.start <= now and (
            self.seconds is None or now < self.start + self.seconds)


class FaultProxy:
    def __init__(self, upstream: str, flavour: str = "s3"):
        self.flavour = flavour  # how error answers look: 's3' (XML) or 'gcs' (JSON)
        up = urlparse(upstream)
        self.upstream = (up.hostname, up.port)
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self.refused = 0
        self.log: list[tuple[float, str, str]] = []  # (time, "METHOD path", fault or "ok")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.handle_error = lambda *_: None  # a reset connection is the point
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    # ------------------------------------------------------------------ control
    def fault(self, mode: str, seconds: float | None = None, when: str | None = None,
              after: bool = False, nth: int = 1, answer: str | None = None) -> None:
        """mode: 'refuse' (503 SlowDown), 'answer' (the error answer `answer`, a key of
        ANSWERS, in the proxy's flavour), 'short' (the upstream's answer with its full
        Content-Length but half its body, then the connection closed), 'reset' (RST, no
        answer) or 'hang' (no answer, the connection held until healed); seconds: how long
        (None: until heal()); when: a regex on "METHOD path?query <the body's first KiB>"
        that starts it (None: now); after: start right after the matching request was answered (that one is
        forwarded); nth: at the nth matching request (the earlier ones are forwarded)."""
        assert mode in ("refuse", "answer", "short", "reset", "hang"), mode
        assert (mode == "answer") == (answer in ANSWERS), (mode, answer)
        with self._lock:
            self._faults.append(_Fault(mode, seconds, when, after, nth, answer))

    def heal(self) -> None:
        with self._lock:
            self._faults.clear()

    def faulty(self) -> bool:
        """A fault is in force now, or armed."""
        now = time.monotonic()
        with self._lock:
            return any(f.start is None or f.active(now) for f in self._faults)

    def close(self) -> None:
        self.heal()
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ serving
    def _mode(self, line: str) -> tuple[_Fault | None, list[_Fault]]:
        """The fault for a request arriving now, and the faults it arms after its answer."""
        now = time.monotonic()
        later = []
        with self._lock:
            for f in self._faults:
                if f.start is None and f.when.search(line):
                    f.nth -= 1
                    if f.nth > 0:
                        continue
                    if f.after:
                        later.append(f)
                    else:
                        f.start = now
            self._faults = [f for f in self._faults
                            if f.start is None or f.seconds is None or now < f.start + f.seconds]
            for f in self._faults:
                if f.active(now):
                    return f, later
        return None, later

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        line = f"{h.command} {h.path}"
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        # what `when` is matched against: the request line, and the head of its body (a GCS
        # upload names its object in the body's JSON part, not in the URL)
        fault, later = self._mode(f"{line} {body[:1024].decode('latin-1')}")
        mode = fault.mode if fault is not None else None
        self.log.append((time.monotonic(), line, mode or "ok"))
        if mode is not None:
            with self._lock:
                self.refused += 1
        if mode == "refuse":
            self._answer(h, 503, [("Content-Type", "application/xml")], SLOW_DOWN)
        elif mode == "answer":
            status, kind, data = error_body(fault.answer, self.flavour)
            self._answer(h, status, [("Content-Type", kind)], data)
        elif mode == "reset":
            self._reset(h)
        elif mode == "hang":
            while (now_fault := self._mode(line)[0]) is not None and now_fault.mode == "hang":
                time.sleep(0.1)
            self._reset(h)
        else:
            status, headers, data = self._forward(h, body)
            self._answer(h, status, headers, data, short=mode == "short")
            now = time.monotonic()
            with self._lock:
                for f in later:
                    f.start = now

    def _forward(self, h, body: bytes):
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        for attempt in range(2):  # a keep-alive connection the upstream closed: once more
            conn = getattr(h, "_upstream", None)
            if conn is None:
                conn = h._upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
            try:
                conn.request(h.command, h.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP
                       and not (k.lower() == "content-length" and h.command != "HEAD")]
                if h.command != "HEAD":
                    out.append(("Content-Length", str(len(data))))
                return resp.status, out, data
            except (OSError, http.client.HTTPException):
                conn.close()
                h._upstream = None
                if attempt:
                    raise

    @staticmethod
    def _answer(h, status: int, headers: list, data: bytes, short: bool = False) -> None:
        """Send an answer; `short`: its headers (its full Content-Length) and half its body,
        then the connection closed (a short read)."""
        h.send_response_only(status)
        for k, v in headers:
            h.send_header(k, v)
        if not any(k.lower() == "content-length" for k, _ in headers):
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD" and data:
            h.wfile.write(data[:len(data) // 2] if short else data)
        h.wfile.flush()
        if short:
            FaultProxy._reset(h)

    @staticmethod
    def _reset(h) -> None:
        try:
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        h.close_connection = True
        try:
            h.connection.close()
        except OSError:
            pass
