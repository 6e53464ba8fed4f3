"""--compile on CPU: a compiled run stopped and resumed equals an uninterrupted compiled run bit
for bit (losses ==, final model/optimizer and every rank's RNG torch.equal), with dropout and
a val loss (eval mode compiles a graph of its own); train records carry `mfu`.

Inductor compiles C++ kernels with gcc. All runs of this module share one Inductor cache
(TORCHINDUCTOR_CACHE_DIR), so only the first run pays the full compile.
"""

import functools
import pytest

from helpers import TINY, assert_same_run, losses, metrics, run_train, train_in

N = 10
STOP = 6
ARGS = [*TINY, "--dropout", "0.1", "--batch_size", "4", "--total_batch_size", "512",
        "--warmup_steps", "4", "--max_steps", str(N), "--checkpoint_interval", "3",
        "--eval_interval", "5", "--val_steps", "2", "--compile"]
PEAK_TFLOPS = 0.05


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path_factory.mktemp("inductor"))}


_run = functools.partial(train_in, args=ARGS)


def test_compiled_stop_and_resume_is_bit_exact(tmp_path_factory, data, env):
    ref, run = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("run")
    proc = _run(ref, data, env=env)
    assert "compile on" in proc.stdout
    _run(run, data, "--stop_at_step", str(STOP), "--peak_tflops", str(PEAK_TFLOPS), env=env)
    _run(run, data, "--auto_resume", "--peak_tflops", str(PEAK_TFLOPS), env=env)
    assert [r["step"] for r in metrics(run / "log", "resume")] == [STOP]
    assert_same_run(run, ref, tmp_path_factory.mktemp("cmp"), N)

    # compiled kernels really ran: the eager loss of step 1 differs (Inductor draws its own
    # dropout masks and fuses differently)
    eager = tmp_path_factory.mktemp("eager")
    run_train(2, [*ARGS[:-1], "--compile", "false", "--max_steps", str(N), "--stop_at_step",
                  "1", "--data_dir", str(data), "--log_dir", str(eager / "log"),
                  "--checkpoint_dir", str(eager / "ckpt")], env=env)
    assert losses(eager / "log")[1] != losses(ref / "log")[1]

    # mfu: null without a peak on CPU; with --peak_tflops, FLOPs/token * tokens/s/device / peak
    from dcp_train.cli import parse_config
    from dcp_train.train.flops import model_flops_per_token
    from dcp_train.model import GPT

    assert all(r["mfu"] is None for r in metrics(ref / "log", "train"))
    cfg = parse_config(ARGS)
    per_token = model_flops_per_token(GPT(cfg.model), cfg.training.seq_len)
    with_peak = metrics(run / "log", "train")
    assert [r["step"] for r in with_peak] == list(range(1, N + 1))
    for r in with_peak:
        assert r["tokens_per_s_per_device"] == r["tokens_per_s"] / 2
        assert r["mfu"] == per_token * r["tokens_per_s_per_device"] / (PEAK_TFLOPS * 1e12)
        assert r["mfu"] > 0
