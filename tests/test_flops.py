"""MFU math (dcp_train/train/flops.py), the --compile/--peak_tflops flags, and compile keeping
every parameter name. In-process, no torchrun: instant."""

import pytest

from dcp_train.cli import parse_config
from dcp_train.config import ModelConfig
from dcp_train.errors import ConfigError
from dcp_train.model import GPT
from dcp_train.train.flops import (Throughput, flops_per_token, gpu_peak_tflops,
                                   model_flops_per_token, peak_flops)


def test_gpt2_124m_flops_per_token_is_nanogpts():
    model = GPT(ModelConfig())  # 124,475,904 parameters with the tied head counted once
    n = 124_475_904 - 1024 * 768  # without the position embedding (nanoGPT get_num_params)
    assert sum(p.numel() for p in model.parameters()) == 124_475_904
    expected = 6 * n + 12 * 12 * 12 * 64 * 1024
    assert model_flops_per_token(model, 1024) == flops_per_token(n, 12, 12, 64, 1024) == expected
    assert expected == 855_383_040
    # the attention term follows the trained sequence length
    assert model_flops_per_token(model, 256) == 6 * n + 12 * 12 * 12 * 64 * 256


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0),
    ("Tesla T4", None), ("NVIDIA GeForce RTX 4090", None)])
def test_gpu_peak_table(name, tflops):
    assert gpu_peak_tflops(name) == tflops


def test_peak_flops_flag_table_or_none():
    assert peak_flops("cpu", 0.0, "cpu") is None  # never a made-up CPU number
    assert peak_flops("cpu", 1.5, "cpu") == 1.5e12
    assert peak_flops("cuda", 0.0, "NVIDIA H200") == 989e12
    assert peak_flops("cuda", 500.0, "NVIDIA H200") == 500e12  # the flag wins
    assert peak_flops("cuda", 0.0, "Tesla T4") is None


def test_throughput_rates():
    t = Throughput(tokens_per_step=524288, world_size=8, flops_per_token=855_383_040,
                   peak=989e12)
    r = t.rates(0.5)
    assert r["tokens_per_s"] == 1048576.0 and r["tokens_per_s_per_device"] == 131072.0
    assert r["mfu"] == 855_383_040 * 131072.0 / 989e12
    assert 0.11 < r["mfu"] < 0.12
    assert Throughput.text(r) == "tok/s/dev    131072 | MFU 11.3%"
    none = Throughput(512, 2, 1000, None).rates(1.0)
    assert none["mfu"] is None and Throughput.text(none).endswith("MFU -")


def test_compile_and_peak_flags():
    assert parse_config([]).hardware.compile is None  # auto
    assert parse_config(["--compile"]).hardware.compile is True
    assert parse_config(["--compile", "false"]).hardware.compile is False
    assert parse_config(["--compile", "auto"]).hardware.compile is None
    assert parse_config(["--peak_tflops", "312"]).hardware.peak_tflops == 312.0
    with pytest.raises(ConfigError, match="--peak_tflops must be >= 0"):
        parse_config(["--peak_tflops", "-1"])
    from dcp_train.compiled import resolve
    assert (resolve(None, "cuda"), resolve(None, "cpu")) == (True, False)
    assert (resolve(True, "cpu"), resolve(False, "cuda")) == (True, False)


def test_compiled_blocks_keep_parameter_names():
    """Compiling in place: checkpoints of compiled and eager runs have the same keys."""
    from dcp_train.compiled import compile_blocks

    config = ModelConfig(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=64)
    eager, compiled = GPT(config), GPT(config)
    compile_blocks(compiled.transformer.h)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert all("_orig_mod" not in name for name, _ in compiled.named_parameters())
