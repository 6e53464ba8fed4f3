"""dcp_train.main in its default mode with deterministic kernels: a reference between the
default mode and `--deterministic`, for a bit-exact stop/resume on CUDA at one world size.

    torchrun --nproc_per_node 1 -m bench.deterministic_main [dcp_train.main flags]

The trainer has both flags this needs: `--deterministic` (dcp_train/deterministic.py: exact
gradient sums, bit-identical on every world size that divides the step's micro-batches, and
deterministic kernels, strictly) and `--async_checkpoint`; the GPU check (bench/gpu_check.py)
runs `dcp_train.main --deterministic`. This launcher keeps the default mode (FSDP2's own
gradient reduction, no replica, no int64 sums) and only pins the kernels, so a run stopped
and resumed on the same world size can equal an uninterrupted one on CUDA too, without the
mode's cost; across world sizes it gives no guarantee (use `--deterministic` for that).

On CUDA some default kernels do not give the same bits for the same inputs (the flash-attention
backward accumulates with atomics). torch.use_deterministic_algorithms picks deterministic
ones, and cuBLAS needs CUBLAS_WORKSPACE_CONFIG for that; warn_only: a kernel without a
deterministic version warns instead of failing, and the comparison shows whether it mattered.
Given `--deterministic` as well, the trainer pins the kernels itself, strictly (no warn_only):
the run is then exactly `dcp_train.main --deterministic`.
"""

import os
import sys

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cudnn.benchmark = False  # as --deterministic: no autotuned algorithm choice

from dcp_train.main import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
