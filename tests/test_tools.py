"""dcp-ckpt (ls, inspect, verify, export), dcp_train.sample and --tensorboard.

One real 2-rank torchrun of the tiny model (checkpoints at steps 3 and 6) is the subject of
every test (module fixture); the tools then run in this process (their `main(argv)`), once
through `python -m`, and on an S3 copy of the checkpoint dir in a moto server.

Run: .venv/bin/python -m pytest tests/test_tools.py -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcp_train.checkpoint.io.storage import Storage
from dcp_train.config import ModelConfig
from dcp_train.model import GPT
from dcp_train.job.metrics import Metrics
from dcp_train.tools import ckpt, sample
from dcp_train.tools.export import export_tensors, hf_config, load_model_weights, write_export
from helpers import REPO, TINY, child_env, load_checkpoint, metrics, run_train, write_shards

ARGS = TINY + ["--dropout", "0", "--batch_size", "4", "--total_batch_size", "256",
               "--max_steps", "6", "--checkpoint_interval", "3", "--eval_interval", "3",
               "--val_steps", "2"]
STEP3, STEP6 = "step_00000003", "step_00000006"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tools")
    data = write_shards(root / "data")
    run_train(2, ARGS + ["--data_dir", str(data), "--log_dir", str(root / "log"),
                         "--checkpoint_dir", str(root / "ckpt")])
    return root


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    """(model built from the step-6 checkpoint through torch's own converter, its config)."""
    sd = load_checkpoint(run / "ckpt" / STEP6, tmp_path_factory.mktemp("ref"))
    meta = json.loads(bytes(sd["meta"].numpy().tobytes()))
    cfg = ModelConfig(**meta["config"]["model"])
    model = GPT(cfg)
    missing, _ = model.load_state_dict(
        {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}, strict=False)
    assert missing == ["lm_head.weight"]  # tied to wte: stored once
    return model.eval(), cfg


def tool(capsys, *argv) -> tuple[int, str]:
    rc = ckpt.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


def logits(model, cfg) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=gen)
    with torch.no_grad():
        return model(x)[0]


def flip_byte(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]


# ------------------------------------------------------------------------- local checkpoint
def test_ls(run, tmp_path, capsys):
    root = tmp_path / "ckpt"
    shutil.copytree(run / "ckpt", root)
    shutil.copytree(root / STEP6, root / "step_00000009.tmp-ab12cd")  # a crashed save
    shutil.copytree(root / STEP6, root / "step_00000012")  # copied, never committed
    (root / "step_00000012" / "manifest.json").unlink()

    rc, out = tool(capsys, "ls", root, "--json")
    assert rc == 0
    info = json.loads(out)
    val = {r["step"]: r["loss"] for r in metrics(run / "log", "val")}
    assert [(c["name"], c["step"], c["world_size"], c["latest"]) for c in info["checkpoints"]] == \
        [(STEP3, 3, 2, False), (STEP6, 6, 2, True)]
    assert [c["val_loss"] for c in info["checkpoints"]] == [val[3], val[6]]
    manifest = json.loads((root / STEP6 / "manifest.json").read_text())
    assert info["checkpoints"][1]["bytes"] == sum(f["size"] for f in manifest["files"].values())
    assert info["latest"] == STEP6 and info["latest_valid"]
    assert {a["name"]: a["reason"][:9] for a in info["abandoned"]} == \
        {"step_00000009.tmp-ab12cd": "temp dir:", "step_00000012": "no manife"}

    rc, out = tool(capsys, "ls", root)
    lines = out.splitlines()
    assert rc == 0 and lines[0] == str(root)
    assert any(line.split()[:3] == ["*", STEP6, "6"] for line in lines), out
    assert "latest: step_00000006" in out and "step_00000009.tmp-ab12cd" in out

    (root / "latest").write_text("step_00000012\n")
    assert "not a committed checkpoint" in tool(capsys, "ls", root)[1]
    assert tool(capsys, "ls", tmp_path / "nope") == (
        2, f"dcp-ckpt: error: DIR {tmp_path / 'nope'} does not exist; give a checkpoint dir (a "
           "run's --checkpoint_dir or --local_checkpoint_dir)\n")


def test_inspect(run, capsys):
    rc, out = tool(capsys, "inspect", run / "ckpt", "--json")  # the dir: follows `latest`
    assert rc == 0
    info = json.loads(out)
    assert info["path"] == str(run / "ckpt" / STEP6)
    e = info["entries"]
    assert e["model.transformer.wte.weight"] == {"shape": [512, 64], "dtype": "float32",
                                                 "shards": 2}
    assert e["model.transformer.h.1.mlp.c_fc.weight"]["shape"] == [256, 64]
    assert e["optim.transformer.h.0.attn.c_attn.weight.exp_avg_sq"]["shape"] == [192, 64]
    assert {k for k in e if k.startswith("rank_")} == {
        "rank_00000.torch_cpu", "rank_00000.json", "rank_00001.torch_cpu", "rank_00001.json"}
    meta = info["meta"]
    assert (meta["step"], meta["world_size"], meta["tokens"]) == (6, 2, 6 * 256)
    assert meta["config"]["model"] == {"block_size": 32, "vocab_size": 512, "n_layer": 2,
                                       "n_head": 2, "n_embd": 64, "dropout": 0.0}

    rc, out = tool(capsys, "inspect", run / "ckpt" / STEP3)
    assert rc == 0 and out.startswith(f"checkpoint {run / 'ckpt' / STEP3}\nstep 3 |")
    for text in ("model: 28 entries", "per-rank: 4 entries", "rank_00001.torch_cpu",
                 "tied to model.transformer.wte.weight", "config:", '"max_steps": 6',
                 "| checkpoint format 1\n", "manifest.json: format 2, checksums crc32c\n"):
        assert text in out


def test_verify(run, tmp_path, capsys):
    assert ckpt.verify(Storage(run / "ckpt"), str(run / "ckpt" / STEP6)) == []
    assert tool(capsys, "verify", run / "ckpt")[0] == 0

    step = tmp_path / STEP6
    shutil.copytree(run / "ckpt" / STEP6, step)
    shard = step / "__1_0.distcp"
    shard.write_bytes(flip_byte(shard.read_bytes(), 1000))
    rc, out = tool(capsys, "verify", step)
    assert rc == 1 and "file __1_0.distcp is corrupt" in out and "FAILED: 1 problem" in out

    (step / "__0_0.distcp").unlink()
    (step / "notes.txt").write_text("x")
    with open(step / ".metadata", "ab") as f:
        f.write(b"\0")
    problems = ckpt.verify(Storage(step), str(step))
    expected = ("extra file notes.txt", "file .metadata has", "missing file __0_0.distcp",
                "file __1_0.distcp is corrupt")
    assert len(problems) == 4 and all(any(p.startswith(e) for p in problems) for e in expected)

    (step / "manifest.json").unlink()
    assert ckpt.verify(Storage(step), str(step)) == [
        "no manifest.json: the checkpoint was never committed"]

    # the module entry point and its exit code, once, in a fresh process
    proc = subprocess.run([sys.executable, "-m", "dcp_train.ckpt", "verify", str(step)],
                          cwd=REPO, env=child_env(), capture_output=True, text=True)
    assert proc.returncode == 1 and "never committed" in proc.stdout


@pytest.mark.parametrize("fmt,suffix", [("torch", "pt"), ("safetensors", "safetensors")])
def test_export_same_logits(run, reference, tmp_path, capsys, fmt, suffix):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    model, cfg = reference
    out = tmp_path / f"model.{suffix}"
    rc, text = tool(capsys, "export", run / "ckpt" / STEP6, "--out", out, "--format", fmt)
    assert rc == 0, text
    if fmt == "torch":
        sd = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file
        sd = load_file(out)
    assert "lm_head.weight" not in sd and not any(k.startswith("model.") for k in sd)
    assert sd["transformer.wte.weight"].shape == (512, 64)
    exported = GPT(cfg)
    missing, unexpected = exported.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied: it is wte
    assert torch.equal(logits(exported.eval(), cfg), logits(model, cfg))


def test_export_bf16(run, reference, tmp_path, capsys):
    model, _ = reference
    rc, _ = tool(capsys, "export", run / "ckpt", "--out", tmp_path / "bf16.pt", "--dtype", "bf16")
    bf16 = torch.load(tmp_path / "bf16.pt", weights_only=True)
    assert rc == 0 and all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert torch.equal(bf16["transformer.h.0.attn.c_attn.weight"],
                       model.transformer.h[0].attn.c_attn.weight.detach().bfloat16())


def _hf_logits(model_dir: Path, x: torch.Tensor) -> torch.Tensor:
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return hf(x).logits


def test_export_hf(run, reference, tmp_path, capsys):
    pytest.importorskip("safetensors")
    model, cfg = reference
    rc, text = tool(capsys, "export", run / "ckpt", "--out", tmp_path / "hf", "--hf")
    assert rc == 0, text
    from safetensors.torch import load_file
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    w = model.transformer.h[1].attn.c_attn.weight.detach()
    assert torch.equal(sd["transformer.h.1.attn.c_attn.weight"], w.t())  # Conv1D layout
    assert sd["transformer.h.1.mlp.c_proj.weight"].shape == (256, 64)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_positions"],
            config["vocab_size"]) == (2, 2, 64, 32, 512)
    pytest.importorskip("transformers")
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)[0]
    torch.testing.assert_close(_hf_logits(tmp_path / "hf", x), ours, atol=1e-5, rtol=0)


def test_export_hf_drops_padded_vocab(tmp_path):
    """GPT-2's padded 50304-row embedding becomes HF's 50257 rows (export functions directly)."""
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    cfg = ModelConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=32)
    model = GPT(cfg).eval()
    meta = {"config": {"model": vars(cfg)}}
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    tensors = export_tensors(weights, meta, hf=True)
    assert tensors["transformer.wte.weight"].shape == (50257, 32)
    config = hf_config(meta)
    assert config["vocab_size"] == 50257 and config["eos_token_id"] == 50256
    write_export(tensors, str(tmp_path / "model.safetensors"), "safetensors", config)
    pytest.importorskip("transformers")
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x)[0][..., :50257]
    torch.testing.assert_close(_hf_logits(tmp_path, x), ours, atol=1e-5, rtol=0)


def test_sample(run, reference, capsys):
    argv = ["--checkpoint", str(run / "ckpt"), "--prompt", "in the", "--num_samples", "3",
            "--max_new_tokens", "8", "--seed", "7", "--device", "cpu"]
    assert sample.main(argv) == 0
    first = capsys.readouterr()
    texts = first.out.split("\n" + "-" * 40 + "\n")[:-1]
    assert len(texts) == 3 and all(t.startswith("in the") for t in texts)
    assert "step 6 of" in first.err
    assert sample.main(argv) == 0
    assert capsys.readouterr().out == first.out  # seeded
    assert sample.main(argv[:3] + ["Hello"]) == 2  # token 15496 >= vocab 512
    assert "vocab_size is 512" in capsys.readouterr().err


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = Metrics(str(tmp_path), enabled=True, tensorboard=True)
    for step, loss in ((1, 5.5), (2, 5.25)):
        m.log("train", step=step, loss=loss, lr=1e-3, batch_digest="ab")
    m.log("val", step=2, loss=5.0)
    m.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["train/loss", "train/lr", "val/loss"]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 5.5), (2, 5.25)]
    Metrics(str(tmp_path / "off"), enabled=False, tensorboard=True).close()  # other ranks
    assert not (tmp_path / "off").exists()


# ---------------------------------------------------------------------------- S3 (moto)
def test_s3_checkpoint(run, reference, s3, tmp_path, capsys):
    import fsspec

    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.put(str(run / "ckpt") + "/", "ckpt/run/", recursive=True)
    assert ".metadata" in [Path(p).name for p in fs.ls(f"ckpt/run/{STEP6}")]
    opts = ["--storage_options", json.dumps(s3.storage_options)]
    url = "s3://ckpt/run"

    rc, out = tool(capsys, *opts, "ls", url, "--json")
    info = json.loads(out)
    assert rc == 0 and [c["name"] for c in info["checkpoints"]] == [STEP3, STEP6]
    assert info["latest"] == STEP6 and info["checkpoints"][1]["world_size"] == 2

    rc, out = tool(capsys, *opts, "inspect", url, "--json")
    info = json.loads(out)
    assert rc == 0 and info["path"] == f"{url}/{STEP6}" and info["meta"]["step"] == 6
    assert info["entries"]["model.transformer.wte.weight"]["shape"] == [512, 64]
    assert "model.lm_head.weight" not in info["entries"]  # tied: stored once

    model, cfg = reference
    rc, text = tool(capsys, *opts, "export", url, "--out", tmp_path / "m.pt")
    assert rc == 0, text
    exported = GPT(cfg)
    exported.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=False)
    assert torch.equal(logits(exported.eval(), cfg), logits(model, cfg))
    weights, _ = load_model_weights(Storage(url, s3.storage_options), f"{url}/{STEP3}")
    assert weights["transformer.wpe.weight"].shape == (32, 64)

    assert tool(capsys, *opts, "verify", url)[0] == 0
    key = f"ckpt/run/{STEP6}/__0_0.distcp"
    fs.pipe_file(key, flip_byte(fs.cat_file(key), 123))
    rc, out = tool(capsys, *opts, "verify", f"{url}/{STEP6}")
    assert rc == 1 and "file __0_0.distcp is corrupt" in out


def test_every_tool_checks_its_paths_before_the_work(run, tmp_path, capsys):
    """A file where a dir is expected and the reverse, a missing parent, an existing output:
    one line, exit 2, no traceback, no errno text, nothing written (tools/paths.py)."""
    from dcp_train.tools import plot
    from dcp_train.train import hellaswag

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    log = run / "log"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (tmp_path / "taken.pt").write_bytes(b"old")
    ckpt_dir = run / "ckpt"
    cases = [
        (ckpt.main, ["inspect", a_file], f"dcp-ckpt: error: CKPT {a_file} is a file, not a "
                                         "directory; give a step dir or a checkpoint dir"),
        (ckpt.main, ["verify", a_file], f"dcp-ckpt: error: CKPT {a_file} is a file"),
        (ckpt.main, ["ls", a_file], f"dcp-ckpt: error: DIR {a_file} is a file"),
        (ckpt.main, ["ls", ckpt_dir, "--local", a_file], f"dcp-ckpt: error: --local {a_file} "
                                                        "is a file"),
        (ckpt.main, ["export", ckpt_dir, "--out", out_dir], f"dcp-ckpt: error: --out {out_dir} "
         "is a directory; give a file path, or pass --hf to write a Hugging Face dir into it"),
        (ckpt.main, ["export", ckpt_dir, "--out", tmp_path / "taken.pt"],
         f"dcp-ckpt: error: --out {tmp_path / 'taken.pt'} already exists; remove it or give "
         "another path"),
        (ckpt.main, ["export", ckpt_dir, "--out", tmp_path / "no" / "m.pt"],
         f"dcp-ckpt: error: --out {tmp_path / 'no' / 'm.pt'}: its directory {tmp_path / 'no'} "
         "does not exist; create it first or give another path"),
        (ckpt.main, ["export", ckpt_dir, "--out", a_file, "--hf"],
         f"dcp-ckpt: error: --out {a_file} is a file, not a directory; give a directory"),
        (plot.main, [log / "metrics.jsonl"], f"dcp_train.plot: error: LOG_DIR "
         f"{log / 'metrics.jsonl'} is a file, not a directory; give the run's --log_dir"),
        (plot.main, [log, "-o", tmp_path / "no" / "x.png"], "dcp_train.plot: error: --out "
         f"{tmp_path / 'no' / 'x.png'}: its directory {tmp_path / 'no'} does not exist"),
        (plot.main, [log, "-o", out_dir], f"dcp_train.plot: error: --out {out_dir} is a "
                                          "directory; give a file path"),
        (plot.main, [tmp_path], f"dcp_train.plot: error: no metrics.jsonl in {tmp_path}"),
        (sample.main, ["--checkpoint", a_file], f"dcp_train.sample: error: --checkpoint "
                                                f"{a_file} is a file, not a directory"),
        (sample.main, ["--checkpoint", ckpt_dir, "--tokenizer_file", out_dir],
         f"dcp_train.sample: error: --tokenizer_file {out_dir} is a directory, not a file"),
        (hellaswag.main, ["--download", a_file], f"dcp_train.hellaswag: error: --download "
                                                 f"{a_file} is a file, not a directory"),
        (hellaswag.main, ["--download", tmp_path / "no" / "hs"], "dcp_train.hellaswag: error: "
         f"--download {tmp_path / 'no' / 'hs'}: its directory {tmp_path / 'no'} does not "
         "exist"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for main, argv, says in cases:
        rc = main([str(a) for a in argv])
        out = capsys.readouterr()
        assert rc == 2, (argv, out)
        assert out.out == "" and out.err.count("\n") == 1, (argv, out)
        assert out.err.startswith(says), (argv, out.err)
        assert "Errno" not in out.err and "Traceback" not in out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "taken.pt").read_bytes() == b"old" and not any(out_dir.iterdir())
