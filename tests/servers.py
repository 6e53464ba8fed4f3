"""Local S3 and GCS servers for tests (no mocks: real HTTP servers on 127.0.0.1).

    s3 = start_s3_server()     # moto_server (pip: moto[server])
    gcs = start_gcs_server()   # gcp-storage-emulator
    s3.make_bucket("ckpt")
    env = {**os.environ, **s3.env}         # for child processes (torchrun ...)
    fs = fsspec.filesystem("s3", **s3.storage_options)   # in this process
    ...
    s3.stop()      # endpoint down: connection refused, open connections dropped
    s3.restart()   # endpoint back on the same port, with the same data
    s3.close()     # kill everything (also done at interpreter exit); use this, or
                   # `with start_s3_server() as s3:`, for teardown: stop() kills nothing
    s3.requests()  # [(method, path?query), ...] the server answered so far (its own log)

Outage simulation. moto keeps its state in memory and has no persistence option
(its request "recorder" cannot replay multipart uploads, checked with moto 5.2.5), so
killing moto_server would lose every object. SIGSTOP/SIGCONT keeps the data but makes
the endpoint hang instead of failing: the kernel still accepts connections and clients
wait for their read timeout (botocore: 60 s per attempt, and s3fs retries read timeouts
5 times on top: 34 s for one cat() even with read_timeout=3, max_attempts=1). So each server runs behind a
small TCP gate on the public port: `stop()` closes the gate's listening socket and all
connections through it (clients see "connection refused" / "connection reset" at
once), the server process keeps running with its data, and `restart()` listens on the
same port again. Both servers are handled the same way.

Configuration. `env` holds what a child process needs (endpoint, fake credentials);
`storage_options` configures an fsspec filesystem in this process without touching
os.environ (the endpoint is part of the options, so fsspec's instance cache never hands
out a filesystem that points at an older server). gcsfs reads
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT once, when it is *imported*; left at its default
("true") every gcsfs call first tries a gRPC bucket-type probe that the emulator cannot
answer. Importing this module therefore sets it to "false" unless it is already set.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from procs import free_port

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

_BIN = Path(sys.executable).parent  # moto_server / gcp-storage-emulator live next to python


class _Gate:
    """TCP forwarder 127.0.0.1:port -> 127.0.0.1:upstream that can be closed and reopened."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.port = 0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.open()

    def open(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(128)
        self.port = ls.getsockname()[1]
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def close(self) -> None:
        ls, self._listener = self._listener, None
        if ls is not None:
            try:
                ls.shutdown(socket.SHUT_RDWR)  # wakes the accept() below (Linux)
            except OSError:
                pass
            ls.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            _hard_close(c)

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # listener closed
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                _hard_close(client)
                continue
            with self._lock:
                if self._listener is not ls:  # closed meanwhile
                    _hard_close(client)
                    _hard_close(server)
                    return
                self._conns.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._conns.difference_update((src, dst))
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _hard_close(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), so the peer sees 'connection reset' at once."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ACCESS = re.compile(r'"([A-Z]+) (\S+) HTTP/1\.[01]" \d{3}')


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout} s")
            time.sleep(0.05)


def _request(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> None:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    urllib.request.urlopen(req, timeout=10).close()


class _Server:
    """A server subprocess on a private port, published through a _Gate."""

    def __init__(self, cmd: list[str], port: int, health_path: str, tmpdir: str):
        self._tmpdir = tmpdir
        self._log = open(os.path.join(tmpdir, "server.log"), "wb")
        self._proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        atexit.register(self.close)
        self._gate = None
        try:
            _wait_http(f"http://127.0.0.1:{port}{health_path}", self._proc)
            self._gate = _Gate(port)
        except BaseException:
            self.close()
            raise
        self.port = self._gate.port
        self.endpoint = f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        """What the server printed so far (for debugging failed tests)."""
        return Path(self._tmpdir, "server.log").read_text(errors="replace")

    def stop(self) -> None:
        """Endpoint down: new connections refused, open ones reset. Data is kept."""
        if self._gate is not None:
            self._gate.close()

    def restart(self) -> None:
        """Endpoint up again on the same port, same data."""
        if self._gate is not None and self._gate._listener is None:
            self._gate.open()

    def close(self) -> None:
        """Kill the server process and the gate; the data is gone. Idempotent."""
        if self._gate is not None:
            self._gate.close()
            self._gate = None
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)  # its own session: it and its children
            except ProcessLookupError:
                pass
            self._proc.wait()
        self._log.close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        atexit.unregister(self.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class S3Server(_Server):
    """moto_server. `env` makes botocore/s3fs in a child process use it;
    `storage_options` does the same for an fsspec filesystem in this process."""

    def __init__(self):
        port = free_port()
        super().__init__(
            [str(_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            port, "/moto-api/", tempfile.mkdtemp(prefix="moto-"),
        )
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            # fail fast when the endpoint is down (storage.py, "Errors when the endpoint is down")
            "AWS_MAX_ATTEMPTS": "2",
            "AWS_RETRY_MODE": "standard",
        }
        self.storage_options = {
            "endpoint_url": self.endpoint,
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
        }

    def requests(self) -> list[tuple[str, str]]:
        """(method, path with query) of every request moto answered so far, in order, from
        moto's own request log (werkzeug's access lines): counted at the server, so nothing
        the client does is taken on trust."""
        out = []
        for line in self.log.splitlines():
            m = _ACCESS.search(_ANSI.sub("", line))
            if m:
                out.append((m.group(1), m.group(2)))
        return out

    def make_bucket(self, name: str) -> str:
        """Create the bucket (moto does not check signatures); return 's3://name'."""
        _request("PUT", f"{self.endpoint}/{name}")
        return f"s3://{name}"


class GCSServer(_Server):
    """gcp-storage-emulator, data on disk in a temp dir. gcsfs finds it through
    STORAGE_EMULATOR_HOST; `storage_options` adds token='anon' (no credential lookup)."""

    def __init__(self):
        port = free_port()
        tmpdir = tempfile.mkdtemp(prefix="gcs-emu-")
        super().__init__(
            [str(_BIN / "gcp-storage-emulator"), "-d", os.path.join(tmpdir, "data"),
             "start", "-H", "127.0.0.1", "--port", str(port), "-q"],
            port, "/", tmpdir,
        )
        self.env = {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            # skip gcsfs' gRPC storage-layout probe (read at `import gcsfs`)
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            # gcsfs' default credential chain: google_default, cache, GCE metadata, anon;
            # this skips the GCE metadata probe so it falls through to anon quickly
            "NO_GCE_CHECK": "true",
            "GOOGLE_CLOUD_PROJECT": "test-project",
        }
        self.storage_options = {"endpoint_url": self.endpoint, "token": "anon", "project": "test-project"}

    def make_bucket(self, name: str) -> str:
        _request("POST", f"{self.endpoint}/storage/v1/b", json.dumps({"name": name}).encode(),
                 {"Content-Type": "application/json"})
        return f"gs://{name}"


def start_s3_server() -> S3Server:
    return S3Server()


def start_gcs_server() -> GCSServer:
    return GCSServer()
