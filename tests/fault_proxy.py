"""An HTTP proxy in front of the test S3 server that injects store faults (tests only).

    proxy = FaultProxy(s3.endpoint)           # a real HTTP/1.1 server on 127.0.0.1
    env = {**s3.env, "AWS_ENDPOINT_URL": proxy.endpoint}
    proxy.fault("refuse", 20)                 # every request answered 503 SlowDown for 20 s
    proxy.fault("refuse", 20, when=r"PUT \\S*/step_00000004/manifest\\.json")  # armed: starts
                                              # when a matching request arrives (that one too)
    proxy.fault("hang", None, when=...)       # accept, read the request, never answer
    proxy.fault("reset")                      # close every connection with RST, no answer
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

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message>"
             b"<RequestId>fault-proxy</RequestId></Error>")
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-connection", "expect"}


class _Fault:
    def __init__(self, mode: str, seconds: float | None, when: str | None, after: bool,
                 nth: int = 1):
        self.mode, self.seconds, self.after, self.nth = mode, seconds, after, nth
        self.when = re.compile(when) if when else None
        self.start = None if when else time.monotonic()

    def active(self, now: float) -> bool:
        return self.start is not None and self.start <= now and (
            self.seconds is None or now < self.start + self.seconds)


class FaultProxy:
    def __init__(self, upstream: str):
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
              after: bool = False, nth: int = 1) -> None:
        """mode: 'refuse' (503 SlowDown), 'reset' (RST, no answer) or 'hang' (no answer, the
        connection held until healed); seconds: how long (None: until heal()); when: a regex
        on "METHOD path?query" that starts it (None: now); after: start right after the
        matching request was answered (that one is forwarded); nth: at the nth matching
        request (the earlier ones are forwarded)."""
        assert mode in ("refuse", "reset", "hang"), mode
        with self._lock:
            self._faults.append(_Fault(mode, seconds, when, after, nth))

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
    def _mode(self, line: str) -> tuple[str | None, list[_Fault]]:
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
                    return f.mode, later
        return None, later

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        line = f"{h.command} {h.path}"
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        mode, later = self._mode(line)
        self.log.append((time.monotonic(), line, mode or "ok"))
        if mode is not None:
            with self._lock:
                self.refused += 1
        if mode == "refuse":
            self._answer(h, 503, [("Content-Type", "application/xml")], SLOW_DOWN)
        elif mode == "reset":
            self._reset(h)
        elif mode == "hang":
            while self._mode(line)[0] == "hang":
                time.sleep(0.1)
            self._reset(h)
        else:
            status, headers, data = self._forward(h, body)
            self._answer(h, status, headers, data)
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
    def _answer(h, status: int, headers: list, data: bytes) -> None:
        h.send_response_only(status)
        for k, v in headers:
            h.send_header(k, v)
        if not any(k.lower() == "content-length" for k, _ in headers):
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD" and data:
            h.wfile.write(data)
        h.wfile.flush()

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
