"""dcp_train.storage against a local dir, moto (s3://) and the GCS emulator (gs://):
the file API, and DCP save/load through the writers/readers it hands out."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dcp_train.checkpoint.io.storage import Storage


@pytest.fixture(params=["local", "s3", "gs"])
def storage(request, tmp_path) -> Storage:
    name = f"{request.node.name.split('[')[0]}-{time.monotonic_ns()}"
    if request.param == "local":
        return Storage(tmp_path / "root")
    srv = request.getfixturevalue("s3" if request.param == "s3" else "gcs")
    return Storage(f"{request.param}://ckpt/{name}", srv.storage_options)


def test_ranged_reads_whole_files_and_spans(storage, monkeypatch):
    """read_ranges splits a file into at most READ_PARTS ranged GETs; read_spans fetches
    merged spans, and SpanFile serves exactly those bytes (an unfetched byte is an error)."""
    from dcp_train.store import ranged_read as R
    st = storage
    data = bytes(range(256)) * 4096  # 1 MiB
    path = st.join("f.bin")
    st.write_bytes(path, data)
    monkeypatch.setattr(R, "READ_CHUNK", 100_000)  # 1 MiB as 4 parts of 262,144 bytes
    assert R.read_ranges(st.fs, {path: len(data)}) == {path: data}
    monkeypatch.setattr(R, "SPAN_GAP", 10)
    got = R.read_spans(st.fs, {path: [(500_000, 100), (100, 50), (140, 20), (165, 5)]})
    assert got == {path: {100: data[100:170], 500_000: data[500_000:500_100]}}
    f = R.SpanFile(got[path], len(data), "f.bin")
    f.seek(500_050)
    assert f.read(50) == data[500_050:500_100]
    f.seek(120)
    assert f.read(50) == data[120:170]
    f.seek(-1, 2)
    with pytest.raises(OSError, match="byte 1048575 was not fetched"):
        f.read(1)
    with pytest.raises(OSError, match="ended before byte"):
        R.read_spans(st.fs, {path: [(len(data) - 10, 20)]})


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """world_size 1, gloo, as the trainer runs it (unless a group already exists)."""
    if dist.is_initialized():
        yield
        return
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_files(storage):
    st = storage
    assert st.listdir(st.root) == [] and not st.exists(st.join("latest"))
    st.write_text(st.join("d", "a.txt"), "hello")
    st.write_bytes(st.join("d", "sub", "b.bin"), b"\0" * 7)
    st.write_atomic(st.join("latest"), b"d\n")
    st.write_atomic(st.join("latest"), b"e\n")  # replace
    assert st.read_text(st.join("latest")) == "e\n"
    assert st.listdir(st.root) == ["d", "latest"]  # no temp file left behind
    assert st.listdir(st.join("d")) == ["a.txt", "sub"]
    assert st.listdir(st.join("missing")) == []
    assert st.find(st.join("d")) == {"a.txt": 5, "sub/b.bin": 7}
    assert st.size(st.join("d", "sub", "b.bin")) == 7
    assert st.read_bytes(st.join("d", "a.txt")) == b"hello"

    st.rename_dir(st.join("d"), st.join("e"), last=("a.txt",))
    assert not st.exists(st.join("d"))
    assert st.find(st.join("e")) == {"a.txt": 5, "sub/b.bin": 7}
    st.write_text(st.join("f", "x"), "x")
    with pytest.raises(FileExistsError):
        st.rename_dir(st.join("f"), st.join("e"))

    st.rm_file(st.join("e", "a.txt"))
    st.rm_file(st.join("e", "a.txt"))  # missing: no error
    assert st.find(st.join("e")) == {"sub/b.bin": 7}
    st.rm_tree(st.join("e"))
    st.rm_tree(st.join("e"))  # missing: no error
    assert st.listdir(st.root) == ["f", "latest"]


def test_dcp_save_load(storage, process_group):
    st = storage
    state = {"w": torch.randn(10), "opt": {"step": torch.tensor(3), "m": torch.arange(6.0).view(2, 3)}}
    tmp = st.join("step_00000003.tmp-x")
    t0 = time.monotonic()
    dcp.save(state, storage_writer=st.dcp_writer(tmp))
    seconds = time.monotonic() - t0
    # gcsfs' rename would call the emulator's missing moveTo and retry for ~30 s
    assert seconds < 5, f"dcp.save took {seconds:.1f} s"
    assert ".metadata" in st.listdir(tmp) and ".metadata.tmp" not in st.listdir(tmp)

    final = st.join("step_00000003")
    st.rename_dir(tmp, final, last=(".metadata",))
    out = {"w": torch.zeros(10), "opt": {"step": torch.tensor(0), "m": torch.zeros(2, 3)}}
    dcp.load(out, storage_reader=st.dcp_reader(final))
    assert torch.equal(out["w"], state["w"])
    assert torch.equal(out["opt"]["m"], state["opt"]["m"]) and out["opt"]["step"].item() == 3

    # passing checkpoint_id as well must not lose the storage options (DCP calls reset())
    again = {"w": torch.zeros(10), "opt": {"step": torch.tensor(0), "m": torch.zeros(2, 3)}}
    dcp.load(again, storage_reader=st.dcp_reader(final), checkpoint_id=final)
    assert torch.equal(again["w"], state["w"])


@pytest.mark.parametrize("failing", ["extra thread", "calling thread"])
def test_a_failed_writer_thread_fails_the_save(storage, process_group, monkeypatch, capfd,
                                               failing):
    """torch 2.13's FileSystemWriter loses an exception raised on one of its extra writer
    threads and reports the save complete (pytorch/pytorch#191391). Our writers (two threads
    per rank) raise it, and nothing is printed by the thread."""
    from dcp_train.checkpoint.io import dcp_io

    base = dcp_io._LocalFS if storage.is_local else dcp_io._FsspecFS
    original, caller = base.create_stream, threading.get_ident()

    def create_stream(self, path, mode):
        on_extra_thread = threading.get_ident() != caller
        if "w" in mode and str(path).endswith(".distcp") and \
                on_extra_thread == (failing == "extra thread"):
            raise OSError("disk full (injected)")
        return original(self, path, mode)

    monkeypatch.setattr(base, "create_stream", create_stream)
    state = {f"t{i}": torch.randn(1 << 20) for i in range(4)}  # 2 files of 8 MB
    with pytest.raises(BaseException) as failed:  # DCP's CheckpointException
        dcp.save(state, storage_writer=storage.dcp_writer(storage.join("x")))
    assert "disk full (injected)" in str(failed.value)
    assert "Exception in thread" not in capfd.readouterr().err
