"""Entry point: `torchrun --nproc_per_node=N -m dcp_train.main [flags]` (or plain `python -m`).

Bad input (flags, data, checkpoints, storage, tokenizer) ends the run with one line on stderr,
`dcp_train: error: <what was wrong; what to do>`, and exit code 2, printed by the one rank
that holds the root cause and carried into torchrun's report (job/failure.py,
docs/errors.md). Nothing is written to the checkpoint directory before the resume decision
and the flag checks have passed.
"""

from __future__ import annotations

import os
import sys
import time

from dcp_train import redact
from dcp_train.cli import parse_config
from dcp_train.errors import EXIT_BAD_INPUT, ConfigError
from dcp_train.job import failure
from dcp_train.job.orphan import exit_if_orphaned, watch_parent


def main(argv: list[str] | None = None) -> None:
    redact.install_excepthook()  # a crash's traceback never shows a credential
    held = failure.hold_stop()
    try:
        cfg = parse_config(argv)
    except ConfigError as e:  # every rank sees it alike: rank 0 says it
        failure.leave(str(e), EXIT_BAD_INPUT, origin=0)
    failure.release_stop(held)
    watch_parent()  # under torchrun: exit when the agent dies (orphan.py)

    # imported after parsing so that --help and flag errors never touch torch.distributed
    from dcp_train.torch_compat import UnsupportedTorch, require_dcp_internals
    try:
        require_dcp_internals()
    except UnsupportedTorch as e:
        failure.leave(str(e), EXIT_BAD_INPUT, origin=0)
    from dcp_train import distributed as D
    from dcp_train.errors import EXIT_STORE_UNAVAILABLE, CheckpointError, StoreUnavailable
    from dcp_train.data import DataError
    from dcp_train.data.tokenizer import TokenizerError
    from dcp_train.job import stall
    from dcp_train.train.loop import train

    user_errors = (ConfigError, CheckpointError, DataError, TokenizerError)
    try:
        t_setup = time.monotonic()
        info = D.setup(cfg.hardware.device, timeout_s=cfg.checkpoint.stall_timeout)
        setup_s = time.monotonic() - t_setup  # the process group's part of a (re)start
        failure.record_peers()
        stall.start(cfg.checkpoint.stall_timeout)  # this rank's heartbeat (job/stall.py)
    except ConfigError as e:  # --device cuda without CUDA
        failure.leave(str(e), EXIT_BAD_INPUT, origin=0)
    try:
        code = train(cfg, info, setup_s=setup_s)
        D.teardown()  # its barrier is a wait on the other ranks too
    except StoreUnavailable as e:  # agreed like the others; relaunch once the store answers
        failure.leave(str(e), EXIT_STORE_UNAVAILABLE, origin=getattr(e, "origin_rank", None))
    except user_errors as e:  # raised through distributed.agree: origin_rank says whose
        stall.leave_if_stalled(e)  # e.g. a save whose collective timed out
        failure.leave(str(e), EXIT_BAD_INPUT, origin=getattr(e, "origin_rank", None))
    except Exception as e:
        exit_if_orphaned()  # a collective failed because the other ranks left with the agent
        stall.leave_if_stalled(e)  # a rank or a save process stopped answering: named
        failure.leave_if_peer_lost(e)  # a peer died: named in words, not gloo's
        raise
    # Leave without Python's interpreter shutdown: gloo's background threads may still be
    # releasing their last work items, and a thread that needs the GIL during finalization
    # aborts the whole process ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
