"""Store failures classified where they are raised, as one typed, picklable error.

    with at_source("s3://bucket/run/step_00000006"):
        ...                          # s3fs / gcsfs calls: DCP's writes and reads
    error = classify(exc, store)     # StoreError (transient or permanent) or None

A failed request is judged by what the store answered, while the exception still holds it:
botocore's ClientError (the S3 error code and the HTTP status; s3fs raises an OSError whose
__cause__ it is), gcsfs's HttpError (status and the JSON error reasons), aiohttp's
ClientResponseError (status), and by the exception's type where there was no answer. DCP
gathers every rank's exception by pickling it (its all_gather of write and read results), which
drops __cause__: a 503 reached the coordinator as `OSError: [Errno 16] Service is unable to
handle request.` and was taken for the user's error. `at_source` (DCP's writer and reader,
dcp_io.py) turns a classified failure into a StoreError before DCP sees it; StoreError
pickles with all its fields, so every rank and every gather gets the same verdict.

Transient (ridden out within --store_retry_budget / --stall_timeout, ride_out.py), following
AWS's "Error responses" and "Retry behavior" pages and Google Cloud Storage's "Retry
strategy" page (docs/buckets.md cites them):
- HTTP 408, 429, 500, 502, 503, 504, whatever the code;
- S3 codes InternalError, ServiceUnavailable, SlowDown, RequestTimeout (S3 answers it with a
  400), Throttling, ThrottlingException, RequestLimitExceeded, TooManyRequests;
- GCS JSON reasons rateLimitExceeded, userRateLimitExceeded, backendError, internalError;
- no answer: a refused or reset connection, an answer cut short (short read), and silence
  (a connect or read timeout: `silent`, judged against --stall_timeout).
Permanent (one line naming the store, exit 2, at once): 401, 403 (AccessDenied,
InvalidAccessKeyId, SignatureDoesNotMatch), 404 NoSuchBucket and every other 4xx answer but
a missing object (404 NoSuchKey / FileNotFoundError, which the protocol asks about on purpose
and handles itself; gcsfs raises FileNotFoundError for a missing GCS bucket too, which the
start-up probe names), and what no rule above covers is left alone (None). gcsfs keeps no
status for a 403 (OSError "Forbidden: ..."), a 400 whose message says "invalid" (ValueError
"Bad Request: ...") and a 502 (requests' ProxyError): those fixed forms are read as such.
"""

from __future__ import annotations

import errno
import socket
from contextlib import contextmanager

from dcp_train.errors import CheckpointError, chain, one_line

TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                   "Throttling", "ThrottlingException", "RequestLimitExceeded",
                   "TooManyRequests", "InternalServerError", "BadGateway", "GatewayTimeout"}
TRANSIENT_REASONS = {"rateLimitExceeded", "userRateLimitExceeded", "backendError",
                     "internalError"}
MISSING_OBJECT_CODES = {"NoSuchKey", "NoSuchUpload", "NoSuchVersion", "NotFound"}
_SILENT_NAMES = {"ReadTimeoutError", "ConnectTimeoutError", "ServerTimeoutError",
                 "FSTimeoutError", "TimeoutError", "timeout", "ReadTimeout", "ConnectTimeout",
                 "ConnectionTimeoutError", "SocketTimeoutError"}
_SHORT_READ_NAMES = {"IncompleteRead", "ClientPayloadError", "ResponseStreamingError",
                     "ContentLengthError", "ResponseParserError", "TransferEncodingError"}
_REFUSED_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ClientConnectorError",
                  "ServerDisconnectedError", "ClientOSError", "ClientConnectionResetError",
                  "ClientConnectionError", "ProxyConnectionError"}
# s3fs's translation of a 500 / 503 (EREMOTEIO / EBUSY), which is all that is left of it
# where its cause was already lost (an exception pickled before it reached at_source)
_TRANSIENT_ERRNOS = {errno.EBUSY, getattr(errno, "EREMOTEIO", 121)}


class StoreError(CheckpointError):
    """A failed store request, classified (module docstring): `store` names it, `transient`
    (ride it out) or not (exit 2), `silent` (no answer at all), and what it answered:
    `status` (HTTP) and `code` (the S3 error code or the GCS reason), where there was one."""

    def __init__(self, message: str, store: str = "", transient: bool = True,
                 status: int | None = None, code: str | None = None, silent: bool = False):
        super().__init__(message)
        self.store, self.transient, self.silent = store, transient, silent
        self.status, self.code = status, code

    def __reduce__(self):  # crosses DCP's gathers and distributed.agree intact
        return type(self), (str(self), self.store, self.transient, self.status, self.code,
                            self.silent)


def answer(e: BaseException) -> tuple[int | None, str | None] | None:
    """(HTTP status, service code or reason) of an exception that carries a store's answer;
    None for any other exception."""
    response = getattr(e, "response", None)
    if isinstance(response, dict) and ("Error" in response or "ResponseMetadata" in response):
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return status, (response.get("Error") or {}).get("Code") or None
    if type(e).__name__ == "HttpError":  # gcsfs: code = status, reasons in the JSON body
        body = getattr(e, "_error_response", None) or {}
        reasons = [x.get("reason") for x in body.get("errors") or [] if isinstance(x, dict)]
        status = getattr(e, "code", None)
        return (status if isinstance(status, int) else None), next(filter(None, reasons), None)
    if type(e).__name__ == "ClientResponseError":  # aiohttp
        return getattr(e, "status", None), None
    # gcsfs's validate_response keeps no status for three answers, only these forms
    if type(e).__name__ == "ProxyError":  # a 502
        return 502, None
    if type(e) is OSError and str(e).startswith("Forbidden: "):  # a 403
        return 403, "forbidden"
    if type(e) is ValueError and str(e).startswith("Bad Request: "):  # a 400 "invalid"
        return 400, "invalid"
    return None


def classify(exc: BaseException, store: str = "") -> StoreError | None:
    """The StoreError for `exc` (anywhere in its chain, module docstring), or None where it is
    no store failure (or a missing object, which callers handle)."""
    found = chain(exc)
    for e in found:
        if isinstance(e, StoreError):
            return e
    for e in found:
        got = answer(e)
        if got is not None and (got[0] is not None or got[1] is not None):
            return _from_answer(exc, e, store, *got)
    names = {type(e).__name__ for e in found}
    if names & _SHORT_READ_NAMES:
        return StoreError(_words(store, "answer cut short", exc), store)
    if names & _REFUSED_NAMES or any(isinstance(e, (ConnectionRefusedError,
                                                     ConnectionResetError, BrokenPipeError,
                                                     socket.gaierror)) for e in found):
        return StoreError(_words(store, "connection refused or reset", exc), store)
    if names & _SILENT_NAMES or any(isinstance(e, socket.timeout) for e in found):
        return StoreError(_words(store, "no answer", exc), store, silent=True)
    if any(isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS for e in found):
        return StoreError(_words(store, "server busy or failing", exc), store)
    return None


def _from_answer(exc, e, store: str, status: int | None, code: str | None):
    said = " ".join(str(x) for x in (status, code) if x is not None)
    if status in TRANSIENT_STATUS or code in TRANSIENT_CODES or code in TRANSIENT_REASONS:
        return StoreError(_words(store, said, exc), store, True, status, code)
    if code in MISSING_OBJECT_CODES or (status == 404 and code != "NoSuchBucket"):
        return None  # a missing object: the protocol asked, and handles it
    if status is not None and 400 <= status < 500 or code is not None:
        return StoreError(f"{store or 'the store'} refused the request ({said}): "
                          f"{one_line(e)}; check the bucket's name, the credentials and the "
                          "bucket policy", store, False, status, code)
    return None


def _words(store: str, what: str, exc: BaseException) -> str:
    return f"{store or 'the store'}: {what} ({one_line(exc)})"


@contextmanager
def at_source(store: str):
    """Raise a StoreError (from the original) for a store failure raised inside; anything
    else passes unchanged."""
    try:
        yield
    except StoreError:
        raise
    except Exception as e:
        typed = classify(e, store)
        if typed is None:
            raise
        raise typed from e


_quieted: list = []  # the event loops whose handler is installed


def quiet_loop() -> None:
    """Keep the store failures nobody waits for off stderr: fsspec's event loop (the thread
    every s3fs/gcsfs request runs on) reports a task that failed and was never awaited (an
    upload cut off when the store stopped answering, a connection the store reset while it
    was closed) as `Task exception was never retrieved ... ClientConnectionResetError('Cannot
    write to closing transport')`, beside the job's one line. Such an exception is a store
    failure classify() recognises, already ridden out or reported by the request that waited
    for it: dropped. Anything else goes to asyncio's default handler. Idempotent."""
    from fsspec.asyn import get_loop

    loop = get_loop()
    if any(known is loop for known in _quieted):
        return

    def handler(loop, context) -> None:
        exc = context.get("exception")
        if exc is not None and classify(exc) is not None:
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    _quieted.append(loop)
