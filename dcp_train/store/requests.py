"""Requests this process sent to object stores, counted by kind: what a save or a resume costs.

    mark = store_requests.snapshot()
    ...                                   # s3fs / gcsfs calls
    store_requests.since(mark)            # {"GET": 3, "LIST": 1, "PUT": 4}

Buckets bill, throttle and slow down by the request, so the `checkpoint` and `resume` records
carry these counts (all ranks summed) and dcp-ckpt prints its own.

Where they are counted: s3fs (through aiobotocore) and gcsfs send every HTTP request through
aiohttp's `ClientSession.request`; `install()` wraps that method once per process, so every
attempt that goes on the wire is counted, retries included, and nothing else is changed. The
count is of this process only (a save process counts its own), of every bucket it talks to.

Kinds (one request is one of them):
- LIST: a listing (S3 ListObjectsV2 `?list-type=2`; GCS `GET .../b/<bucket>/o`);
- HEAD: a metadata-only look at one object (S3 HEAD; GCS `GET .../o/<name>` without
  `alt=media`);
- GET: object bytes (whole or a byte range);
- PUT: object bytes written (S3 PUT, a multipart upload's part; GCS upload);
- DELETE: an object removed (S3 DELETE or a batched `POST ?delete`; GCS DELETE or a batch);
- POST: anything else that creates or completes something (S3 multipart initiate/complete,
  GCS resumable upload sessions).
"""

from __future__ import annotations

import threading
from collections import Counter

KINDS = ("GET", "PUT", "HEAD", "LIST", "DELETE", "POST")

_counts: Counter = Counter()
_lock = threading.Lock()
_installed = False


def install() -> None:
    """Count from now on (idempotent; cheap to call for every Storage that is not local)."""
    global _installed
    with _lock:
        if _installed:
            return
        from aiohttp import ClientSession  # s3fs and gcsfs both depend on aiohttp

        original = ClientSession.request

        def request(self, *args, **kwargs):
            method = kwargs.get("method", args[0] if args else "")
            url = kwargs.get("url", args[1] if len(args) > 1 else "")
            count(str(method).upper(), str(url), kwargs.get("params"))
            return original(self, *args, **kwargs)

        ClientSession.request = request
        _installed = True


def kind(method: str, url: str, params=None) -> str:
    """The kind (KINDS) of one HTTP request to S3 or GCS."""
    path, _, query = url.partition("?")
    query += "&" + "&".join(f"{k}={v}" for k, v in dict(params or {}).items())
    if method == "GET":
        if "list-type=" in query or path.rstrip("/").endswith("/o"):
            return "LIST"
        if "/storage/v1/b/" in path and "alt=media" not in query:
            return "HEAD"
        return "GET"
    if method == "POST":
        if "delete" in query.split("&") or query.startswith("delete"):
            return "DELETE"
        if "/upload/storage/" in path and "uploadType=media" in query:
            return "PUT"
        if "/batch/" in path:  # gcsfs batches deletes only
            return "DELETE"
        if "/batch/" in path:  # gcsfs batches deletes only
            return "DELETE"
        return "POST"
    return method if method in KINDS else "POST"


def count(method: str, url: str, params=None) -> None:
    with _lock:
        _counts[kind(method, url, params)] += 1


def snapshot() -> Counter:
    """This process's counts so far (a copy)."""
    with _lock:
        return Counter(_counts)


def since(mark: Counter) -> dict[str, int]:
    """{kind: n} of the requests sent since `mark` (a snapshot()); kinds with none left out."""
    now = snapshot()
    now.subtract(mark)
    return {k: now[k] for k in KINDS if now[k] > 0}


def total(*parts: dict) -> dict[str, int]:
    """The sum of several {kind: n} (e.g. every rank's), with "total" added."""
    out = Counter()
    for p in parts:
        out.update({k: v for k, v in p.items() if k != "total"})
    return {**{k: out[k] for k in KINDS if out[k] > 0}, "total": sum(out.values())}


def line(counts: dict) -> str:
    """'12 requests (GET 5, PUT 4, LIST 2, DELETE 1)' for a console line."""
    parts = ", ".join(f"{k} {counts[k]}" for k in KINDS if counts.get(k))
    n = counts.get("total", sum(v for k, v in counts.items() if k != "total"))
    return f"{n} requests ({parts})" if parts else f"{n} requests"
