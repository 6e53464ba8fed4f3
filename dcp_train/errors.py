"""Errors for the user and the exit codes: ConfigError and CheckpointError, the one-line
`dcp_train: error: ...` (error_line), and environmental failures named in words:
`describe(exc, path)` is one line for the user.

Exit codes: 0 done; EXIT_BAD_INPUT (2) bad input or an unusable environment; EXIT_PEER_LOST
(69) a rank died or stopped answering; EXIT_PREEMPTED (75) stopped early with a checkpoint,
continue with --auto_resume; EXIT_ORPHANED (128+SIGHUP)
the launcher went away; 128+signal a second signal or the preemption timeout.

Storage errors arrive wrapped: DCP's CheckpointException holds {rank: (exception, traceback)},
s3fs turns botocore's ClientError into an OSError whose __cause__ is the ClientError, torch's
zip writer turns a short write on a full disk into "RuntimeError: [enforce fail at
inline_container.cc:...] . unexpected pos 704 vs 598" with no errno at all. `describe` walks
the whole chain (every __cause__, __context__ unless suppressed, the first failure of a
CheckpointException) and names the first kind it recognises:

    KIND                 recognised by
    no space left        errno ENOSPC or EDQUOT; or, for a local `path` whose filesystem has
                         less than LOW_FREE_BYTES free, torch's "unexpected pos"/"enforce
                         fail" writer error (what ENOSPC becomes inside torch.save)
    read-only            errno EROFS
    permission denied    errno EACCES or EPERM; HTTP 401/403, AccessDenied
    unreachable          ConnectionError (refused, reset), socket.gaierror, timeouts,
                         botocore's EndpointConnectionError/ConnectTimeoutError,
                         aiohttp's ClientConnectorError
    throttled            S3 SlowDown/503/ThrottlingException/RequestLimitExceeded/
                         TooManyRequests, HTTP 429/503 (gcsfs's HttpError code)

Known kinds read `<kind>: <details>; <what to do> (<Type: message>)`, of the exception in the
chain that showed the kind (botocore's outer EndpointConnectionError names the URL, its cause
only host:port); anything else is the innermost cause as `Type: message` (`innermost`).
Free space comes from os.statvfs of the nearest existing ancestor of a local `path`.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys

from dcp_train import redact


def _dcp_failures(e: BaseException) -> list[BaseException]:
    """The per-rank exceptions a DCP CheckpointException wraps ([] for anything else). Such an
    exception exists only once torch's DCP is imported, so this module never imports torch
    (`--help` and flag errors stay instant)."""
    api = sys.modules.get("torch.distributed.checkpoint.api")
    if api is not None and isinstance(e, api.CheckpointException) and e.failures:
        return [failure[0] for failure in e.failures.values()]
    return []

EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; resume with --auto_resume
EXIT_ORPHANED = 128 + signal.SIGHUP  # as if hung up: the controlling agent is gone
EXIT_PEER_LOST = 69  # EX_UNAVAILABLE: a rank died or stopped answering; relaunch --auto_resume
EXIT_STORE_UNAVAILABLE = 69  # a store did not answer within the retry budget (StoreUnavailable)


class ConfigError(ValueError):
    """A bad flag or combination; main() prints it as one line and exits 2."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message is for the user (exit 2)."""


class StoreUnavailable(CheckpointError):
    """A store refused requests for longer than --store_retry_budget, or did not answer at all
    for --stall_timeout, in a phase of a save or a resume (checkpoint/ride_out.py); the message
    names the store, the phase and the step. Exit EXIT_STORE_UNAVAILABLE (69)."""


def scrub_line(message: str) -> str:
    """`message` on one line, credentials scrubbed."""
    return " ".join(redact.scrub(message).split())


def error_line(message: str) -> None:
    """The one-line error the user sees for bad input: one write(2) call, so the lines of
    several ranks sharing a pipe never interleave. Which rank calls it: job/failure.py."""
    sys.stdout.flush()
    os.write(2, f"dcp_train: error: {scrub_line(message)}\n".encode())



LOW_FREE_BYTES = 64 * 2**20  # below this, torch's unexplained writer errors mean a full disk
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                   "TooManyRequests", "RequestThrottled", "ServiceUnavailable", "503", "429"}
_DENIED_CODES = {"AccessDenied", "Forbidden", "403", "401", "InvalidAccessKeyId",
                 "SignatureDoesNotMatch", "AllAccessDisabled"}
_UNREACHABLE_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                      "ClientConnectorError", "ServerDisconnectedError", "ReadTimeoutError",
                      "ServerTimeoutError", "ConnectionError", "TimeoutError"}
_ZIP_WRITER_TEXT = ("unexpected pos", "enforce fail at inline_container")


def chain(exc: BaseException) -> list[BaseException]:
    """`exc` and everything it wraps, outermost first (each exception once)."""
    out, todo = [], [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        todo += _dcp_failures(e)
        todo.append(e.__cause__)
        if not e.__suppress_context__:
            todo.append(e.__context__)
    return out


def one_line(e: BaseException) -> str:
    """`Type: first line of the message`, at most 300 characters, credentials scrubbed."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return redact.scrub(f"{type(e).__name__}: {text}")[:300]


def innermost(e: BaseException) -> BaseException:
    """The deepest cause: the first failure DCP gathered, else the cause, else the context."""
    while True:
        failures = _dcp_failures(e)
        if failures:
            e = failures[0]
        elif e.__cause__ is not None:
            e = e.__cause__
        elif e.__context__ is not None and not e.__suppress_context__:
            e = e.__context__
        else:
            return e


def free_bytes(path: str | None) -> int | None:
    """Bytes available to this user on the filesystem of local `path` (or its nearest existing
    ancestor); None for URLs or where statvfs tells nothing."""
    if not path or "://" in path and not path.startswith("file://"):
        return None
    path = os.path.abspath(path.removeprefix("file://"))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize if st.f_blocks else None  # f_blocks 0: no numbers


def _code(e: BaseException) -> str | None:
    """The service's error code of a botocore ClientError / gcsfs HttpError, as text."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        err, meta = response.get("Error") or {}, response.get("ResponseMetadata") or {}
        return str(err.get("Code") or meta.get("HTTPStatusCode") or "") or None
    code = getattr(e, "code", None)
    return str(code) if isinstance(code, (int, str)) and code else None


def classify(exc: BaseException, path: str | None = None
             ) -> tuple[str | None, BaseException]:
    """(kind, the exception of the chain that shows it): kind is 'no space', 'read-only',
    'permission', 'unreachable', 'throttled' or None (then the innermost cause)."""
    found = chain(exc)
    for e in found:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return "no space", e
    for e in found:
        if isinstance(e, OSError) and e.errno == errno.EROFS:
            return "read-only", e
    for e in found:
        code = _code(e)
        if code in _THROTTLE_CODES:
            return "throttled", e
        if code in _DENIED_CODES or isinstance(e, PermissionError) or (
                isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM)):
            return "permission", e
        if (isinstance(e, (ConnectionError, socket.gaierror, socket.timeout))
                or type(e).__name__ in _UNREACHABLE_NAMES):
            return "unreachable", e  # botocore's outer error names the endpoint URL
    free = free_bytes(path)
    if free is not None and free < LOW_FREE_BYTES and any(
            t in str(e) for e in found for t in _ZIP_WRITER_TEXT):
        return "no space", innermost(exc)
    return None, innermost(exc)


def no_space_line(path: str, needed: int | None, free: int | None) -> str:
    """The words for a full disk, with the numbers that are known."""
    numbers = [f"needs about {needed:,} bytes" if needed is not None else "",
               f"{free:,} bytes free" if free is not None else ""]
    numbers = ", ".join(n for n in numbers if n)
    return (f"no space left on the filesystem of {path} (disk full or quota)"
            f"{': ' + numbers if numbers else ''}; free space there, lower "
            "--keep_last_n_checkpoints, or use another --checkpoint_dir")


_ADVICE = {
    "read-only": "read-only filesystem; remount it writable, or copy the checkpoint dir to a "
                 "writable place and pass --auto_resume there",
    "permission": "permission denied; check the directory's permissions, or the credentials "
                  "and the bucket policy",
    "unreachable": "storage endpoint unreachable; check the endpoint URL, the network and the "
                   "server",
    "throttled": "throttled by the store (SlowDown/503/429); retry later, write less often "
                 "(--checkpoint_interval), or ride out longer bursts (--store_retry_budget)",
}


def describe(exc: BaseException, path: str | None = None, needed: int | None = None) -> str:
    """One line naming what went wrong (module docstring). `path`: the local or remote
    directory being written/read (free space is looked up there); `needed`: bytes the
    operation needed, when known."""
    what, shown = classify(exc, path)
    cause = one_line(shown)
    if what == "no space":
        return f"{no_space_line(path or '?', needed, free_bytes(path))} ({cause})"
    if what is not None:
        return f"{_ADVICE[what]} ({cause})"
    return cause
