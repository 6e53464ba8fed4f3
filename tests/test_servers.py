"""The local S3 (moto) and GCS (emulator) servers work with fsspec, in this process
(storage_options) and in a child process (env only), and survive stop/restart."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import fsspec
import pytest

from servers import start_gcs_server, start_s3_server

pytest.importorskip("s3fs")
pytest.importorskip("gcsfs")


@pytest.fixture(scope="module", params=["s3", "gs"])
def server(request):
    srv = start_s3_server() if request.param == "s3" else start_gcs_server()
    srv.protocol = request.param
    srv.make_bucket("bkt")
    yield srv
    srv.close()


def test_round_trip(server, tmp_path):
    fs = fsspec.filesystem(server.protocol, **server.storage_options)
    fs.pipe("bkt/rt/a.bin", b"A" * 1000)
    src = tmp_path / "b.txt"
    src.write_bytes(b"hello")
    fs.put(str(src), "bkt/rt/sub/b.txt")
    assert sorted(fs.ls("bkt/rt", detail=False)) == ["bkt/rt/a.bin", "bkt/rt/sub"]
    assert fs.find("bkt/rt", detail=True)["bkt/rt/sub/b.txt"]["size"] == 5
    fs.get("bkt/rt/a.bin", str(tmp_path / "a.bin"))
    assert (tmp_path / "a.bin").read_bytes() == b"A" * 1000

    fs.pipe("bkt/rt/a.bin", b"new")  # overwrite a single object
    assert fs.cat("bkt/rt/a.bin") == b"new"

    fs.rm("bkt/rt", recursive=True)
    fs.invalidate_cache()
    assert not fs.exists("bkt/rt/a.bin")
    assert fs.find("bkt/rt") == []


def test_child_process_with_env_only(server):
    """What a torchrun child gets: no storage options, only server.env."""
    code = (
        "import fsspec, sys; u = sys.argv[1]; fs, p = fsspec.core.url_to_fs(u);"
        "fs.pipe(p, b'from child'); print(fs.cat(p).decode())"
    )
    env = {**os.environ, **server.env}
    url = f"{server.protocol}://bkt/child/x"
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, url], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "from child"
    assert time.monotonic() - t < 20  # no credential/metadata-server timeouts
    fs = fsspec.filesystem(server.protocol, **server.storage_options)
    assert fs.cat("bkt/child/x") == b"from child"


def test_stop_refuses_and_restart_keeps_data(server):
    fs = fsspec.filesystem(server.protocol, **server.storage_options)
    fs.pipe("bkt/keep", b"kept")
    fs.cat("bkt/keep")  # leave a pooled keep-alive connection behind
    port = server.port
    server.stop()
    if server.protocol == "s3":  # gcsfs retries a refused connection for ~32 s; skip that
        fast = fsspec.filesystem(
            "s3", **server.storage_options, skip_instance_cache=True,
            config_kwargs={"retries": {"max_attempts": 1}},
        )
        with pytest.raises(Exception, match="Could not connect to the endpoint URL"):
            fast.cat("bkt/keep")
    server.restart()
    assert server.port == port
    fs.invalidate_cache()
    assert fs.cat("bkt/keep") == b"kept"
