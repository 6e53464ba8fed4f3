"""Model FLOPs utilization (MFU) and per-device tokens/s of a training step.

FLOPs per token, forward and backward, are nanoGPT's estimate (PaLM paper, appendix B):

    6 * N + 12 * L * H * Q * T

N: parameters without the position embedding (the tied token embedding counts once, as the
head's matmul), L layers, H heads, Q head size, T the sequence length trained on (--seq_len;
nanoGPT uses block_size, the same thing in its runs). MFU is the FLOPs achieved per second on
one device over that device's peak:

    mfu = flops_per_token * tokens_per_s_per_device / peak_flops

Peak FLOP/s: --peak_tflops when given (> 0); otherwise, on CUDA, the dense bf16 tensor-core
peak of the GPU looked up by its name in PEAK_BF16_TFLOPS (our CUDA runs compute in bf16);
otherwise unknown, and mfu is None (null in metrics.jsonl). No number is ever guessed: a GPU
that is not in the table, or any CPU, needs --peak_tflops.
"""

from __future__ import annotations

from typing import Optional

# Dense (no sparsity) bf16 tensor-core peak per GPU in TFLOP/s, from NVIDIA's data sheets.
# Checked in order, first match wins: specific names before the general ones.
PEAK_BF16_TFLOPS = [
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),  # SXM and PCIe
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
]


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int,
                    seq_len: int) -> int:
    """nanoGPT's forward+backward FLOPs per trained token: 6N + 12*L*H*Q*T."""
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len


def model_flops_per_token(model, seq_len: int) -> int:
    """flops_per_token of a GPT (dcp_train.model, FSDP2-sharded or not: a DTensor's numel is
    the full size). N excludes the position embedding, as nanoGPT's get_num_params does."""
    c = model.config
    n = model.num_params() - model.transformer.wpe.weight.numel()
    return flops_per_token(n, c.n_layer, c.n_head, c.n_embd // c.n_head, seq_len)


def gpu_peak_tflops(device_name: str) -> Optional[float]:
    """The table's dense bf16 peak for a CUDA device name (torch.cuda.get_device_name), or
    None for a GPU not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def peak_flops(device_type: str, flag_tflops: float, device_name: str = "") -> Optional[float]:
    """Peak FLOP/s of one device: the flag if > 0, else the CUDA table, else None."""
    if flag_tflops > 0:
        return flag_tflops * 1e12
    if device_type == "cuda":
        tflops = gpu_peak_tflops(device_name)
        return None if tflops is None else tflops * 1e12
    return None


class Throughput:
    """Turns a step's wall time into the rates logged with it.

    `rates(seconds)` -> {"tokens_per_s": over all devices, "tokens_per_s_per_device",
    "mfu": a fraction of the peak, or None without one}."""

    def __init__(self, tokens_per_step: int, world_size: int, flops_per_token: int,
                 peak: Optional[float]):
        self.tokens_per_step, self.world_size = tokens_per_step, world_size
        self.flops_per_token, self.peak = flops_per_token, peak

    def rates(self, seconds: float) -> dict:
        per_device = self.tokens_per_step / seconds / self.world_size
        mfu = None if self.peak is None else self.flops_per_token * per_device / self.peak
        return {"tokens_per_s": self.tokens_per_step / seconds,
                "tokens_per_s_per_device": per_device, "mfu": mfu}

    @staticmethod
    def text(rates: dict) -> str:
        """The step line's part: 'tok/s/dev 123456 | MFU 41.2%' ('MFU -' without a peak)."""
        mfu = "-" if rates["mfu"] is None else f"{100 * rates['mfu']:.1f}%"
        return f"tok/s/dev {rates['tokens_per_s_per_device']:9.0f} | MFU {mfu}"

    def describe(self) -> str:
        """For the start-up line: the FLOPs estimate and the peak used."""
        peak = ("unknown (mfu null; give --peak_tflops)" if self.peak is None
                else f"{self.peak / 1e12:g} TFLOP/s")
        return f"{self.flops_per_token / 1e6:.1f} MFLOP/token, peak {peak}"
