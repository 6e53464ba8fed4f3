"""Checksums computed on the bytes as they pass (dcp_train/checkpoint/io/checksum.py, dcp_io.py): assembled
from pieces in any order they equal the checksum of the whole file; DCP's writer and reader
report the checksums of exactly the bytes on disk; manifest formats 1 and 2 read, others are
one clear error. Real DCP saves and loads (no process group), real files."""

import json
import random
import zlib

import crc32c
import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_train.checkpoint.io import checksum as C
from dcp_train.checkpoint.io import manifest as M
from dcp_train.checkpoint.io.storage import Storage


@pytest.mark.parametrize("checksum", C.ALGORITHMS)
def test_pieces_in_any_order_give_the_whole_files_checksum(checksum):
    rng = random.Random(0)
    data = rng.randbytes(3_000_000)
    whole = {"crc32c": crc32c.crc32c, "crc32": zlib.crc32}[checksum](data)
    assert C.update(checksum, 0, data) == whole
    cut = 1_234_567
    assert C.combine(checksum, C.update(checksum, 0, data[:cut]),
                     C.update(checksum, 0, data[cut:]), len(data) - cut) == whole
    for trial in range(20):  # random pieces: gaps, overlaps, duplicates, small ones, any order
        pieces = C.Pieces(checksum)
        for _ in range(trial):
            offset = rng.randrange(len(data))
            n = rng.choice([100, C.PIECE_MIN, rng.randrange(1, 800_000)])
            pieces.add(offset, data[offset:offset + n])
        reads = []

        def read_at(offset, length):
            reads.append(length)
            return data[offset:offset + length]
        assert pieces.finish(read_at, len(data)) == whole, trial
    with pytest.raises(OSError, match="file ended"):  # a file shorter than it says
        C.Pieces(checksum).finish(lambda o, n: data[o:o + n], len(data) + 10)


def _save(path, sd):
    writer = Storage(str(path)).dcp_writer(str(path))
    dcp.save(sd, storage_writer=writer, no_dist=True)
    return writer.checksums


def _load(path, checksum, template):
    reader = Storage(str(path)).dcp_reader(str(path))
    reader.verify_with(checksum)
    dcp.load(template, storage_reader=reader, no_dist=True)
    return reader.digests


def test_dcp_writer_and_reader_checksum_the_bytes_on_disk(tmp_path):
    torch.manual_seed(0)
    sd = {f"w{i}": torch.randn(300 + i, 257) for i in range(6)}
    sd["small"], sd["json"] = torch.arange(10.0), torch.tensor(list(b'{"step": 7}'),
                                                               dtype=torch.uint8)
    written = _save(tmp_path, sd)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(written) == names  # every file, .metadata included
    assert written == M.hash_files(Storage(str(tmp_path)), str(tmp_path), names)

    template = {k: torch.zeros_like(v) for k, v in sd.items()}
    digests = _load(tmp_path, C.CHECKSUM, template)
    shards = [n for n in names if n.endswith(".distcp")]
    assert sorted(digests) == shards and all(digests[n] == written[n] for n in shards)
    assert all(torch.equal(template[k], sd[k]) for k in sd)
    # read with format 1's checksum: the same files, zlib's CRC-32
    assert _load(tmp_path, "crc32", template) == M.hash_files(
        Storage(str(tmp_path)), str(tmp_path), shards, "crc32")

    # one flipped byte in a zip header DCP's reads skip over, and one inside a tensor
    for offset in (5, written[shards[0]][0] // 2):
        raw = bytearray((tmp_path / shards[0]).read_bytes())
        raw[offset] ^= 0x10
        (tmp_path / shards[0]).write_bytes(bytes(raw))
        damaged = _load(tmp_path, C.CHECKSUM, template)
        assert damaged[shards[0]][1] != written[shards[0]][1]
        raw[offset] ^= 0x10
        (tmp_path / shards[0]).write_bytes(bytes(raw))
    assert _load(tmp_path, C.CHECKSUM, template) == {n: written[n] for n in shards}


def _rewrite_manifest(step_dir, **fields):
    """manifest.json of `step_dir` with `fields` changed, its own sha256 made to match."""
    manifest = json.loads((step_dir / M.MANIFEST).read_text())
    manifest.update(fields)
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    manifest["sha256"] = M._self_hash(body)
    (step_dir / M.MANIFEST).write_text(json.dumps(manifest))


def test_manifest_formats(tmp_path):
    step = tmp_path / "step_00000003"
    written = _save(step, {"w": torch.randn(100, 100)})
    (step / M.MANIFEST).write_bytes(M.build(3, 1, written))
    storage = Storage(str(step))
    manifest = M.read(storage, str(step))
    assert manifest["format_version"] == M.FORMAT_VERSION and manifest["checksum"] == "crc32c"
    assert M.problems(storage, str(step)) == []

    # format 1, as written before: no format_version, no checksum field, zlib CRC-32s
    old = {"step": 3, "world_size": 1, "files": {
        n: {"size": s, "crc32": h} for n, (s, h) in
        M.hash_files(storage, str(step), sorted(written), "crc32").items()}}
    (step / M.MANIFEST).write_text(json.dumps({**old, "sha256": M._self_hash(old)}))
    assert M.read(storage, str(step))["checksum"] == "crc32"
    assert M.problems(storage, str(step)) == []
    with open(step / "__0_0.distcp", "r+b") as f:
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 1]))
    assert [p.split(" (")[0] for p in M.problems(storage, str(step))] == [
        "file __0_0.distcp is corrupt"]

    for fields, said in (({"format_version": 3}, "format 3 with checksum 'crc32'"),
                         ({"format_version": 2, "checksum": "sha3"}, "format 2 with checksum "
                                                                    "'sha3'")):
        _rewrite_manifest(step, **fields)
        with pytest.raises(M.ManifestFormatError) as e:  # not damage: never a fall-back
            M.problems(storage, str(step))
        assert str(e.value) == (
            f"{step / M.MANIFEST} has manifest {said}, newer than this dcp_train reads "
            "(formats 1-2, checksums crc32c, crc32); resume it with the dcp_train version "
            "that wrote it, or upgrade")
