import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py, tests/servers.py

from helpers import SHARED_TIKTOKEN  # noqa: E402

# Tests never download: the GPT-2 BPE ranks come from ../shared/tiktoken_cache.
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))


import pytest  # noqa: E402

from helpers import write_shards  # noqa: E402


@pytest.fixture(scope="module")
def base(request, tmp_path_factory) -> Path:
    """A temp dir per test module, named after it."""
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))


@pytest.fixture(scope="module")
def data(base) -> Path:
    """Synthetic token shards (helpers.write_shards) in base/data."""
    return write_shards(base / "data")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with the buckets `ckpt` and `data` (per test module)."""
    pytest.importorskip("s3fs")
    from servers import start_s3_server

    with start_s3_server() as srv:
        srv.make_bucket("ckpt")
        srv.make_bucket("data")
        yield srv


@pytest.fixture(scope="module")
def gcs():
    """A GCS emulator on 127.0.0.1 with the bucket `ckpt` (per test module)."""
    pytest.importorskip("gcsfs")
    from servers import start_gcs_server

    with start_gcs_server() as srv:
        srv.make_bucket("ckpt")
        yield srv
