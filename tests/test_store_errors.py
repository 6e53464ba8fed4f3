"""Store failures classified at the source (dcp_train/checkpoint/io/store_errors.py), over
every documented answer, with real client exceptions built from real answers: the S3 and GCS
test servers behind tests/fault_proxy.py, which answers each kind (S3's XML <Error>, GCS's
JSON error body, with the documented status), cuts an answer short, resets or stays silent.

- S3: botocore's own client (one attempt, no retries) raises the ClientError; s3fs's
  translate_boto_error turns it into the OSError s3fs raises (cause attached).
- GCS: the answer fetched through the proxy goes through gcsfs's validate_response.
- No answer: refused (a closed port), reset, short read, silence, through botocore and aiohttp.
Every StoreError survives pickling inside DCP's CheckpointException (what its gathers do),
and what is left of s3fs's OSError pickled without its cause is still transient.

Run: .venv/bin/python -m pytest tests/test_store_errors.py -q
"""

from __future__ import annotations

import asyncio
import http.client
import pickle
import traceback

import pytest

from fault_proxy import FaultProxy
from helpers import free_port

from dcp_train.checkpoint.io.store_errors import StoreError, classify

TRANSIENT = ["InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "408", "429",
             "502", "504"]
PERMANENT = ["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
             "BadRequest"]


@pytest.fixture(scope="module")
def s3_proxy(s3):
    s3.make_bucket("classify")
    proxy = FaultProxy(s3.endpoint, flavour="s3")
    client(proxy.endpoint).put_object(Bucket="classify", Key="obj", Body=b"x" * 4096)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def gcs_proxy(gcs):
    gcs.make_bucket("classify")
    import fsspec
    fsspec.filesystem("gcs", **gcs.storage_options).pipe("classify/obj", b"x" * 4096)
    proxy = FaultProxy(gcs.endpoint, flavour="gcs")
    yield proxy
    proxy.close()


def client(endpoint: str, read_timeout: float = 30):
    import botocore.session
    from botocore.config import Config
    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1, "mode": "standard"},
                      read_timeout=read_timeout, connect_timeout=5))


def s3_failure(proxy: FaultProxy, mode: str, answer: str | None = None,
               read_timeout: float = 30) -> BaseException:
    proxy.heal()
    proxy.fault(mode, answer=answer)
    try:
        client(proxy.endpoint, read_timeout).get_object(Bucket="classify",
                                                        Key="obj")["Body"].read()
    except Exception as e:
        return e
    finally:
        proxy.heal()
    raise AssertionError(f"{mode} {answer}: no failure")


def through_dcp(error: StoreError) -> StoreError:
    """`error` after DCP's gather: wrapped with its traceback, pickled, unpickled."""
    from torch.distributed.checkpoint.api import CheckpointException
    wrapped = CheckpointException("write_data", {1: (error, traceback.extract_stack())})
    back = classify(pickle.loads(pickle.dumps(wrapped)))
    assert isinstance(back, StoreError)
    assert (back.store, back.transient, back.status, back.code, back.silent, str(back)) == (
        error.store, error.transient, error.status, error.code, error.silent, str(error))
    return back


@pytest.mark.parametrize("name", TRANSIENT + PERMANENT)
def test_s3_answers(s3_proxy, name):
    from fault_proxy import ANSWERS
    from s3fs.errors import translate_boto_error

    raw = s3_failure(s3_proxy, "answer", name)
    status, code, _ = ANSWERS[name]
    for e in (raw, translate_boto_error(raw)):  # botocore's, and s3fs's OSError from it
        got = classify(e, "s3://classify")
        assert got is not None and got.transient == (name in TRANSIENT), (name, e)
        assert (got.status, got.code, got.store) == (status, code, "s3://classify")
        through_dcp(got)
    if name in PERMANENT:
        assert "s3://classify refused the request" in str(got)


def test_s3_oserror_pickled_without_its_cause_is_still_transient(s3_proxy):
    from s3fs.errors import translate_boto_error
    for name in ("ServiceUnavailable", "SlowDown", "InternalError"):
        bare = pickle.loads(pickle.dumps(translate_boto_error(s3_failure(s3_proxy, "answer",
                                                                         name))))
        assert bare.__cause__ is None
        assert classify(bare).transient, name


def test_gcs_answers(gcs_proxy):
    from gcsfs.retry import validate_response
    from fault_proxy import ANSWERS
    for name in [n for n in TRANSIENT + PERMANENT if n != "RequestTimeout"]:
        gcs_proxy.heal()
        gcs_proxy.fault("answer", answer=name)
        conn = http.client.HTTPConnection("127.0.0.1", gcs_proxy.port, timeout=30)
        conn.request("GET", "/storage/v1/b/classify/o/obj?alt=media")
        resp = conn.getresponse()
        status, body = resp.status, resp.read()
        conn.close()
        gcs_proxy.heal()
        assert status == ANSWERS[name][0]
        with pytest.raises(Exception) as info:
            validate_response(status, body, "classify/obj")
        got = classify(info.value, "gs://classify")
        if name == "NoSuchBucket":  # gcsfs: FileNotFoundError, as for a missing object
            assert got is None and isinstance(info.value, FileNotFoundError)
            continue
        assert got is not None and got.transient == (name in TRANSIENT), (name, info.value)
        assert got.status == status, (name, got.status)
        through_dcp(got)


def test_no_answer_through_botocore(s3_proxy):
    refused = s3_failure_at(f"http://127.0.0.1:{free_port()}")
    reset = s3_failure(s3_proxy, "reset")
    short = s3_failure(s3_proxy, "short")
    silent = s3_failure(s3_proxy, "hang", read_timeout=0.5)
    for e, is_silent in ((refused, False), (reset, False), (short, False), (silent, True)):
        got = classify(e, "s3://classify")
        assert got is not None and got.transient and got.silent == is_silent, repr(e)
        through_dcp(got)


def s3_failure_at(endpoint: str) -> BaseException:
    try:
        client(endpoint).get_object(Bucket="classify", Key="obj")
    except Exception as e:
        return e
    raise AssertionError("no failure")


def test_no_answer_through_aiohttp(gcs_proxy):
    import aiohttp

    async def get(mode: str, timeout: float = 30) -> BaseException:
        gcs_proxy.heal()
        gcs_proxy.fault(mode)
        try:
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(sock_read=timeout)) as session:
                async with session.get(f"{gcs_proxy.endpoint}/storage/v1/b/classify/o/obj"
                                       "?alt=media") as resp:
                    await resp.read()
        except Exception as e:
            return e
        finally:
            gcs_proxy.heal()
        raise AssertionError(f"{mode}: no failure")

    for mode, is_silent in (("reset", False), ("short", False), ("hang", True)):
        e = asyncio.run(get(mode, 0.5 if mode == "hang" else 30))
        got = classify(e, "gs://classify")
        assert got is not None and got.transient and got.silent == is_silent, (mode, repr(e))


def test_what_is_no_store_failure_is_left_alone():
    import errno
    for e in (FileNotFoundError(errno.ENOENT, "no such key"), ValueError("bad value"),
              RuntimeError("a bug"), OSError(errno.ENOSPC, "No space left on device")):
        assert classify(e) is None, e


def test_unretrieved_store_failures_stay_off_stderr(caplog):
    """fsspec's event loop (where every s3fs/gcsfs request runs) reports a task that failed
    and was never awaited on stderr (`Task exception was never retrieved`); with the handler
    store_options installs, a store failure among those is dropped, anything else is not."""
    import gc

    import aiohttp
    import fsspec
    from fsspec.asyn import get_loop

    from dcp_train.checkpoint.io.store_options import configure
    configure(fsspec.filesystem("s3", anon=True))  # installs it, as for every async store
    loop = get_loop()

    async def fails(exc):
        raise exc

    def abandon(exc) -> None:
        async def start():
            loop.create_task(fails(exc))  # nobody keeps it, nobody awaits it
        asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), loop).result(10)
        gc.collect()
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), loop).result(10)

    said = lambda: [r for r in caplog.records if "never retrieved" in r.getMessage()]  # noqa
    abandon(aiohttp.ClientConnectionResetError("Cannot write to closing transport"))
    assert said() == []  # asyncio logs it (to stderr, in a run): dropped
    abandon(ZeroDivisionError("a bug"))
    assert len(said()) == 1
