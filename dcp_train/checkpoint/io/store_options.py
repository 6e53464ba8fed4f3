"""Default request timeouts and retries of the store clients, merged under --storage_options.

    options = store_options.merged("s3://bucket/run", user_options, stall_timeout=300)
    Storage("s3://bucket/run", options)

Every request to a bucket gets a connect and a read timeout and is retried by the client on
transient failures (5xx, SlowDown/429, connection errors, timeouts) with exponential backoff
and jitter; a longer outage is ridden out one protocol phase at a time by checkpoint/ride_out.py
within --store_retry_budget. What the clients offer is used:

- s3fs: `config_kwargs`, botocore's Config: connect_timeout, read_timeout and
  retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS} (botocore's backoff: random
  jitter, exponential, capped at 20 s; 5xx, SlowDown, throttling, connection errors and
  timeouts are retried). Standard, not adaptive: adaptive's client-side rate limiter slows
  every later request of the process after a burst, and the ride-out loop already backs off.
  s3fs retries timeouts, short reads and SlowDown on top, S3FileSystem.retries times (5, not an
  option) at two nested levels for a read: measured here, a GET of an endpoint that never
  answers sent 75 requests (5 x 5 x 3) and took 145 s with read_timeout=1. `configure(fs)`
  (Storage calls it) sets it to S3FS_RETRIES, so one s3fs call sends at most
  S3FS_RETRIES**2 x MAX_ATTEMPTS = 8 attempts (measured through tests/fault_proxy.py
  with --stall_timeout 30: a GET of a silent endpoint fails after 8 in 17 s, a PUT after 4 in
  8 s; a refusing one after 2 s, then checkpoint/ride_out.py takes over).
- gcsfs: `requests_timeout` (seconds per HTTP request); its own retry (6 attempts,
  exponential backoff with jitter, on 5xx, 429, connection errors and timeouts) is fixed.

The timeouts follow --stall_timeout: a store that accepts connections but never answers must be
named within it, and one s3fs call waits at most 8 read timeouts plus the backoffs between
them, so the read timeout is stall_timeout / (2 x 8), between MIN_TIMEOUT_S and MAX_TIMEOUT_S
(18.75 s at the default 300 s: far above what a healthy S3/GCS needs to answer one request, a
read timeout being the time between two reads of an answer, not the length of a transfer).

Whatever the user gives wins, key by key (a user's `config_kwargs` keeps our keys it lacks);
other URLs (local paths, memory://, file://) get nothing.
"""

from __future__ import annotations

import copy

MAX_ATTEMPTS = 2  # botocore's attempts per request, the first included
S3FS_RETRIES = 2  # s3fs.S3FileSystem.retries (its default: 5), at two nested levels
ATTEMPTS_PER_CALL = S3FS_RETRIES ** 2 * MAX_ATTEMPTS
MIN_TIMEOUT_S = 1.0
MAX_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0  # at most: a reachable endpoint connects in milliseconds
DEFAULT_STALL_S = 300.0  # --stall_timeout's default


def read_timeout(stall_timeout: float = DEFAULT_STALL_S) -> float:
    """Seconds one request may wait for the next bytes of its answer (module docstring)."""
    return max(MIN_TIMEOUT_S, min(MAX_TIMEOUT_S, stall_timeout / (2 * ATTEMPTS_PER_CALL)))


def defaults(url: str, stall_timeout: float = DEFAULT_STALL_S) -> dict:
    """The options this module adds for `url` (by its protocol); {} for other URLs."""
    protocol = url.split("://", 1)[0] if "://" in url else ""
    timeout = read_timeout(stall_timeout)
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": min(CONNECT_TIMEOUT_S, timeout),
                                  "read_timeout": timeout,
                                  "retries": {"mode": "standard",
                                              "total_max_attempts": MAX_ATTEMPTS}}}
    if protocol in ("gs", "gcs"):
        return {"requests_timeout": timeout}
    return {}


def merged(url: str, options: dict | None, stall_timeout: float = DEFAULT_STALL_S) -> dict:
    """`options` (the user's --storage_options) over defaults(url): the user's keys win; in
    `config_kwargs` key by key (its `retries` as a whole). A new dict."""
    out = copy.deepcopy(defaults(url, stall_timeout))
    for key, value in (options or {}).items():
        if key == "config_kwargs" and isinstance(value, dict) and key in out:
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def configure(fs) -> None:
    """What cannot be passed as an option: s3fs's own retries (module docstring), and the
    event loop of fsspec's async stores kept quiet about store failures nobody waits for
    (store_errors.quiet_loop)."""
    if type(fs).__module__.startswith("s3fs"):
        fs.retries = S3FS_RETRIES
    if getattr(fs, "async_impl", False):
        from dcp_train.checkpoint.io.store_errors import quiet_loop
        quiet_loop()


def url_to_fs(url: str, options: dict | None, stall_timeout: float = DEFAULT_STALL_S):
    """fsspec's url_to_fs with this module's timeouts and retries under `options` (merged)
    and s3fs's retries set (configure): how every store of this project is opened (the
    checkpoint dir through Storage, --data_dir and --init_from URLs)."""
    from fsspec.core import url_to_fs as fsspec_url_to_fs

    fs, root = fsspec_url_to_fs(url, **merged(url, options, stall_timeout))
    configure(fs)
    return fs, root
