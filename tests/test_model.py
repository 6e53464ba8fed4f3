"""Model shapes, weight tying, init; the LR schedule; the optimizer's parameter groups."""

import math

import pytest
import torch

from dcp_train.config import PRESETS, ModelConfig
from dcp_train.model import GPT
from dcp_train.optim import build_optimizer, lr_at

SMALL = ModelConfig(block_size=16, vocab_size=128, n_layer=3, n_head=2, n_embd=32)


def test_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(SMALL)
    idx = torch.randint(0, 128, (2, 16))
    logits, loss = model(idx)
    assert logits.shape == (2, 16, 128) and loss is None
    logits, loss = model(idx, idx)
    assert loss.ndim == 0
    # untrained: close to uniform, ln(128) = 4.85
    assert abs(loss.item() - math.log(128)) < 0.5


def test_weight_tying():
    model = GPT(SMALL)
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # counted once


def test_init_std_and_residual_scale():
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=16, vocab_size=4096, n_layer=8, n_head=4, n_embd=256))
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.001
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.001
    scaled = 0.02 / math.sqrt(2 * 8)
    for block in model.transformer.h:
        assert abs(block.attn.c_proj.weight.std().item() - scaled) < 0.0005
        assert abs(block.mlp.c_proj.weight.std().item() - scaled) < 0.0005
        assert torch.count_nonzero(block.attn.c_attn.bias) == 0


def test_gpt2_124m_parameter_count():
    cfg = PRESETS["gpt2-124m"]
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == \
        (12, 12, 768, 1024, 50304)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == 124_475_904  # 124M with the padded vocab


def test_dropout_uses_the_rng():
    model = GPT(ModelConfig(block_size=16, vocab_size=128, n_layer=1, n_head=2, n_embd=32,
                            dropout=0.5))
    idx = torch.randint(0, 128, (2, 16))
    torch.manual_seed(1)
    a = model(idx, idx)[1]
    torch.manual_seed(1)
    b = model(idx, idx)[1]
    c = model(idx, idx)[1]
    assert a == b and a != c
    model.eval()
    assert model(idx, idx)[1] == model(idx, idx)[1]


def test_lr_schedule():
    max_lr, warmup, steps = 6e-4, 10, 100
    lrs = [lr_at(s, max_lr, warmup, steps) for s in range(1, steps + 1)]
    assert lrs[0] == pytest.approx(max_lr / warmup)  # first update: 1/warmup of max
    assert lrs[warmup - 1] == pytest.approx(max_lr)  # end of warmup
    assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # cosine decreases
    assert lrs[-1] == pytest.approx(0.1 * max_lr, rel=1e-2)  # cosine ends at 10%
    assert lr_at(steps + 5, max_lr, warmup, steps) == pytest.approx(0.1 * max_lr)


def test_optimizer_groups():
    model = GPT(SMALL)
    opt = build_optimizer(model, 1e-3, 0.1, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_tied_weight_is_saved_once_and_older_checkpoints_still_load(tmp_path):
    """ModelState stores lm_head.weight (the same Parameter as transformer.wte.weight) once;
    a checkpoint written before that, which holds both names, loads the same."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from dcp_train.checkpoint import state as S
    from dcp_train.checkpoint.restore import load_into

    def trained(seed):
        torch.manual_seed(seed)
        model = GPT(SMALL)
        opt = build_optimizer(model, 1e-3, 0.1, "cpu")
        idx = torch.randint(0, 128, (2, 16))
        model(idx, idx)[1].backward()
        opt.step()
        return model, opt

    assert S.tied_aliases(GPT(SMALL)) == {"lm_head.weight": "transformer.wte.weight"}
    src, src_opt = trained(0)
    model_sd, optim_sd = get_state_dict(src, src_opt)
    assert "lm_head.weight" in model_sd  # the older layout, both names
    dcp.save({"model": model_sd, "optim": optim_sd["state"]},
             storage_writer=FileSystemWriter(str(tmp_path)), no_dist=True)
    dst, dst_opt = trained(1)
    load_into(FileSystemReader(str(tmp_path)), [S.ModelState(dst), S.OptimizerState(dst, dst_opt)])
    assert dst.lm_head.weight is dst.transformer.wte.weight  # still tied after the load
    for (name, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in zip(src_opt.state.values(), dst_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
