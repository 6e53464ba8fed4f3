"""--init_from: a run started from a Hugging Face GPT-2 directory.

The GPT-2 is a small random GPT2LMHeadModel built and saved here with transformers (no hub
download), with odd sizes so that FSDP's shards are uneven. Checked:
- at 1 and 2 ranks, from a local dir and from an S3 URL (moto), the sharded model's logits
  right after the import (before any step) equal transformers' logits of the same file to
  1e-4, both computed in this test run; also for an
  older-style file (GPT2Model names without `transformer.`, attn.bias / attn.masked_bias mask
  buffers, an lm_head.weight beside wte);
- with a learning rate of 0, checkpoint 1 of a real training run holds the file's weights
  (Conv1D weights transposed, tied embedding) exactly, and `dcp-ckpt export --hf` of it
  starts another run with exactly those weights again (the round trip);
- a 2-rank run trains and checkpoints; stopped at step 3 and resumed with --auto_resume (which
  ignores --init_from and says so in one line), it ends bit for bit like the uninterrupted run;
- dimension flags that contradict config.json, and a config that is not GPT-2, are one error.

Run: .venv/bin/python -m pytest tests/test_init_from.py -q
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from dcp_train.cli import parse_config
from dcp_train.errors import ConfigError
from dcp_train.tools import ckpt
from helpers import (REPO, assert_same_tensors, child_env, free_port, load_checkpoint, losses,
                     one_error, run_train, write_shards)

VOCAB, BLOCK = 509, 32
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
ARGS = ["--preset", "tiny", "--seq_len", "32", "--batch_size", "4", "--total_batch_size", "256",
        "--warmup_steps", "3", "--max_lr", "3e-3", "--eval_interval", "0",
        "--hellaswag_interval", "0", "--generate_interval", "0", "--seed", "1234"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random GPT-2 saved by transformers: (directory, the model)."""
    torch.manual_seed(7)
    config = GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=48, n_layer=2, n_head=3,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(path, safe_serialization=True)
    return path, model


@pytest.fixture(scope="module")
def old_style_dir(hf_dir, tmp_path_factory):
    """The same weights as an older upload: GPT2Model names, mask buffers, lm_head.weight."""
    path, _ = hf_dir
    tensors = {k.removeprefix("transformer."): v for k, v in
               load_file(path / "model.safetensors").items()}
    for i in range(2):
        mask = torch.tril(torch.ones(BLOCK, BLOCK)).view(1, 1, BLOCK, BLOCK)
        tensors[f"h.{i}.attn.bias"] = mask
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()
    old = tmp_path_factory.mktemp("hf_old") / "gpt2"
    old.mkdir()
    save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})
    (old / "config.json").write_text((path / "config.json").read_text())
    return old


def logits_after_import(nproc: int, directory, tmp_path, env: dict | None = None) -> dict:
    out = tmp_path / f"logits_{nproc}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(REPO / "tests" / "hf_logits_worker.py"), str(out), *ARGS,
           "--init_from", str(directory), "--log_dir", str(tmp_path / "log")]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(env), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"weights from --init_from {directory}" in proc.stdout
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("nproc,style", [(1, "transformers"), (2, "transformers"), (2, "old")])
def test_logits_equal_transformers(nproc, style, hf_dir, old_style_dir, tmp_path):
    directory = hf_dir[0] if style == "transformers" else old_style_dir
    got = logits_after_import(nproc, directory, tmp_path)
    with torch.no_grad():
        expected = hf_dir[1](got["idx"]).logits
    assert got["logits"].shape == expected.shape == (2, BLOCK, VOCAB)
    torch.testing.assert_close(got["logits"], expected, atol=1e-4, rtol=0)


def test_from_a_bucket(hf_dir, s3, tmp_path):
    """An s3:// URL: each node's local rank 0 downloads it once into the cache."""
    import fsspec

    path, model = hf_dir
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.put([str(path / n) for n in ("config.json", "model.safetensors")], "data/gpt2/")
    cache = tmp_path / "cache"
    got = logits_after_import(2, "s3://data/gpt2", tmp_path,
                              env={**s3.env, "DCP_TRAIN_CACHE_DIR": str(cache)})
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(got["idx"]).logits, atol=1e-4, rtol=0)
    (cached,) = (cache / "init").iterdir()
    assert sorted(p.name for p in cached.iterdir()) == ["config.json", "model.safetensors"]


def test_checkpoint_holds_the_imported_weights(hf_dir, tmp_path):
    """--max_lr 0: the first update changes nothing, so checkpoint 1 is the import itself."""
    path, _ = hf_dir
    data = write_shards(tmp_path / "data", vocab=VOCAB)
    run_train(1, ARGS + ["--init_from", str(path), "--max_lr", "0", "--max_steps", "1",
                         "--data_dir", str(data), "--log_dir", str(tmp_path / "log"),
                         "--checkpoint_dir", str(tmp_path / "ckpt")])
    saved = load_checkpoint(tmp_path / "ckpt" / "step_00000001", tmp_path)
    hf = load_file(path / "model.safetensors")
    for key, value in hf.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        ours = saved[f"model.{key}"]
        assert torch.equal(ours, value.t() if key.endswith(HF_CONV1D) else value), key
    assert "transformer.wte.weight" in hf  # the tied embedding and lm_head, compared above

    # the way back: dcp-ckpt export --hf of that checkpoint starts a run with the same weights
    export = tmp_path / "export"
    step_1 = str(tmp_path / "ckpt" / "step_00000001")
    assert ckpt.main(["export", step_1, "--out", str(export), "--hf"]) == 0
    run_train(1, ARGS + ["--init_from", str(export), "--max_lr", "0", "--max_steps", "1",
                         "--data_dir", str(data), "--log_dir", str(tmp_path / "log2"),
                         "--checkpoint_dir", str(tmp_path / "ckpt2")])
    again = load_checkpoint(tmp_path / "ckpt2" / "step_00000001", tmp_path)
    assert_same_tensors(saved, again, prefixes=("model.",))


def test_train_checkpoint_resume_bit_exact(hf_dir, tmp_path):
    path, _ = hf_dir
    data = write_shards(tmp_path / "data", vocab=VOCAB)

    def run(name, *extra):
        return run_train(2, ARGS + ["--init_from", str(path), "--max_steps", "6",
                                    "--checkpoint_interval", "3", "--data_dir", str(data),
                                    "--log_dir", str(tmp_path / name / "log"),
                                    "--checkpoint_dir", str(tmp_path / name / "ckpt"), *extra])

    straight = run("straight")
    assert "weights from --init_from" in straight.stdout
    run("resumed", "--stop_at_step", "3")
    again = run("resumed", "--auto_resume")
    ignored = [l for l in again.stdout.splitlines() if "--init_from" in l]
    assert ignored == [f"--init_from {path} ignored: resumed from the checkpoint at step 3, "
                       "which holds the weights"], again.stdout
    assert losses(tmp_path / "resumed" / "log") == losses(tmp_path / "straight" / "log")
    assert sorted(losses(tmp_path / "straight" / "log")) == list(range(1, 7))
    assert_same_tensors(load_checkpoint(tmp_path / "straight" / "ckpt" / "step_00000006",
                                        tmp_path),
                        load_checkpoint(tmp_path / "resumed" / "ckpt" / "step_00000006",
                                        tmp_path))


def test_dimension_flags_must_agree(hf_dir):
    path, _ = hf_dir
    cfg = parse_config(ARGS + ["--init_from", str(path), "--n_embd", "48"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.vocab_size,
            cfg.model.block_size) == (2, 3, 48, VOCAB, BLOCK)
    with pytest.raises(ConfigError, match=r"--n_layer 3 \(its config.json: 2\); drop these "
                       "flags: the model dimensions come from its config.json"):
        parse_config(ARGS + ["--init_from", str(path), "--n_layer", "3"])


def test_not_a_gpt2_config(hf_dir, tmp_path):
    config = json.loads((hf_dir[0] / "config.json").read_text())
    for key, value, words in [("model_type", "llama", "not 'gpt2'"),
                              ("activation_function", "relu", "activation_function")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ConfigError, match=words):
            parse_config(ARGS + ["--init_from", str(tmp_path)])
    with pytest.raises(ConfigError, match="has no config.json"):
        parse_config(ARGS + ["--init_from", str(tmp_path / "nowhere")])


@pytest.mark.parametrize("damage", ["cut", "dims"])
def test_bad_weights_refused_leaving_nothing(damage, hf_dir, tmp_path):
    """model.safetensors cut in half, or a config.json whose dimensions its weights do not
    have: one line naming the file, exit 2, and nothing created (no writer.lease, no
    metrics.jsonl, no dirs): the weights are read before the writer lease (docs/errors.md)."""
    src, _ = hf_dir
    bad = tmp_path / "gpt2"
    bad.mkdir()
    weights = (src / "model.safetensors").read_bytes()
    config = json.loads((src / "config.json").read_text())
    if damage == "cut":
        (bad / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    else:
        (bad / "model.safetensors").write_bytes(weights)
        config["n_embd"] = 60  # the weights are 48 wide
    (bad / "config.json").write_text(json.dumps(config))
    data = write_shards(tmp_path / "data", vocab=VOCAB)
    proc = run_train(2, ARGS + ["--init_from", str(bad), "--max_steps", "2",
                                "--data_dir", str(data),
                                "--checkpoint_dir", str(tmp_path / "ckpt"),
                                "--log_dir", str(tmp_path / "log")], check=False)
    line = one_error(proc)
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)) == {"2"}, proc.stderr
    assert proc.stderr.count("Traceback (most recent call last)") == 1  # torchrun's own
    assert "terminate called" not in proc.stderr and "SafetensorError" not in proc.stdout
    if damage == "cut":
        assert f"{bad / 'model.safetensors'} is not a readable safetensors file" in line
    else:
        assert re.search(f"--init_from {bad}: \\S+ has shape .*, the model needs", line), line
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "log").exists()
