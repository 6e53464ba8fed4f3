"""When an interval of steps is due: the one rule for every `--*_interval` counted in steps
(the checkpoint manager's saves, the loop's evaluations, HellaSwag and samples)."""


def due(interval: int, step: int, last: bool) -> bool:
    """An interval of `interval` steps (0: off) is due after `step` (or at the last step)."""
    return interval > 0 and (step % interval == 0 or last)
