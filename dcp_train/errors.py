"""Errors the user sees: the exception types that end a run with exit code 2, and one-line
descriptions of whatever a library raised."""

from __future__ import annotations

from torch.distributed.checkpoint.api import CheckpointException


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message is for the user."""


def cause(e: BaseException) -> str:
    """One line: the innermost meaningful cause of a (possibly wrapped) exception."""
    while True:
        if isinstance(e, CheckpointException) and e.failures:  # DCP: {rank: (exc, traceback)}
            e = next(iter(e.failures.values()))[0]
        elif e.__cause__ is not None:
            e = e.__cause__
        elif e.__context__ is not None and not e.__suppress_context__:
            e = e.__context__  # `raise X from None` means X is the whole story: keep X
        else:
            break
    return one_line(e)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:300]
