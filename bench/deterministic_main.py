"""dcp_train.main with deterministic kernels only: the ordinary FSDP2 step (no replica, no
exact sums), for checking a bit-exact resume at one world size on CUDA without the cost of
`--deterministic` (whose mode, train/deterministic.py, also makes the bits independent of
the world size). Launch it in place of dcp_train.main,

    torchrun --nproc_per_node 1 -m bench.deterministic_main [dcp_train.main flags]

On CUDA a stopped-and-resumed run can only equal an uninterrupted one if every kernel gives
the same bits for the same inputs; some default kernels do not (the flash-attention backward
accumulates with atomics). torch.use_deterministic_algorithms picks deterministic ones, and
cuBLAS needs CUBLAS_WORKSPACE_CONFIG for that; warn_only: a kernel without a deterministic
version warns instead of failing, and the comparison shows whether it mattered.
"""

import os
import sys

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

torch.use_deterministic_algorithms(True, warn_only=True)

from dcp_train.main import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
