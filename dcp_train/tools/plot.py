"""Loss curves of a run: `python -m dcp_train.plot LOG_DIR [-o loss.png]`.

Reads <LOG_DIR>/metrics.jsonl and draws train loss and val loss over steps, with a dashed gray
line at every committed checkpoint and a red line where the run resumed. A resumed run logs
the steps after its checkpoint again; each stretch between resumes is its own line, so
repeated steps show up (on a bit-exact resume they lie on top of each other).

Needs matplotlib (`pip install 'dcp_train[plot]'`); renders with the Agg backend (no display).
"""

from __future__ import annotations

import argparse
import os
import sys

from dcp_train.job.metrics import of_kind, read_metrics
from dcp_train.tools import paths


def plot_metrics(records: list[dict], out: str, title: str = "", size=(10, 5), dpi: int = 100):
    """Draw the records to `out` (PNG, size*dpi pixels); return the matplotlib Figure.

    Every line carries a gid: "train", "val", "checkpoint" or "resume"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segments, current = [], []  # train records, split where the run resumed
    for r in records:
        if r["kind"] == "resume" and current:
            segments.append(current)
            current = []
        elif r["kind"] == "train":
            current.append(r)
    segments.append(current)

    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    for i, seg in enumerate(s for s in segments if s):
        ax.plot([r["step"] for r in seg], [r["loss"] for r in seg], color="tab:blue",
                lw=1.2, label="train loss" if i == 0 else "_nolegend_", gid="train")
    val = of_kind(records, "val")
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", color="tab:orange",
                lw=1.5, ms=4, label="val loss", gid="val")
    markers = (("checkpoint", "checkpoint committed", dict(color="0.6", ls="--", lw=0.8)),
               ("resume", "resumed", dict(color="tab:red", ls="-", lw=1.5)))
    for kind, label, style in markers:
        for i, step in enumerate(sorted({r["step"] for r in of_kind(records, kind)})):
            ax.axvline(step, label=label if i == 0 else "_nolegend_", gid=kind, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dcp_train.plot", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("log_dir", help="the run's --log_dir (holds metrics.jsonl)")
    p.add_argument("-o", "--out", default="", help="PNG to write (default: LOG_DIR/loss.png)")
    p.add_argument("--title", default="", help="(default: LOG_DIR)")
    p.add_argument("--dpi", type=int, default=100, help="pixels per inch of the 10x5 in figure")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.log_dir, "loss.png")
    try:  # the paths first: a PNG is a view of the log, replaced when drawn again
        paths.input_dir(args.log_dir, "LOG_DIR", "the run's --log_dir (the dir that holds "
                        "metrics.jsonl)")
        if not os.path.isfile(os.path.join(args.log_dir, "metrics.jsonl")):
            raise paths.PathError(f"no metrics.jsonl in {args.log_dir}; give the run's "
                                  "--log_dir")
        paths.output_file(out, "--out", replace=True)
        records = read_metrics(args.log_dir)
    except (paths.PathError, ValueError, OSError) as e:  # ValueError: a line that is not JSON
        print(f"dcp_train.plot: error: {e}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("dcp_train.plot: error: needs matplotlib: pip install 'dcp_train[plot]'",
              file=sys.stderr)
        return 2
    plot_metrics(records, out, args.title or args.log_dir, dpi=args.dpi)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
