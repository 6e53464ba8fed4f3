"""What bench/goodput.py reports: per failure, the steps lost and the seconds from the failure
to the next optimizer step, split into phases; ETTR of ours, of the baseline and of the floor;
the final state compared with the failure-free run's; the markdown table.

Phases of a failure that ended a process (Unix times; records' `time` field where the program
writes one, else when the supervisor's poll saw the record):

- detection: from the failure until the failed attempt's last worker process is gone (the
  failure noticed and the attempt torn down: torchrun's monitor, `--stall_timeout`, the
  supervisor seeing torchrun exit);
- relaunch: until the new attempt's worker processes started (/proc start time): torchrun's
  restart, or the supervisor launching torchrun again;
- startup: until the `config` record, written once the process group is up: imports and the
  process group (split as `imports` and `process_group` where the record says how long the
  process group took, `setup_s`);
- build: until the resume began (`resume` record's time minus its `seconds`): data, model,
  optimizer;
- resume: the `resume` record's `seconds`;
- first_step: until the first `train` record after it.

A failure that ended no process (bucket, a disk-full the job rode out) lost no steps; its
`seconds` is the time to the next step and `slowdown_s` what its window cost against the
failure-free step time.
"""

from __future__ import annotations

import statistics

from bench.common import run_meta
from dcp_train.checkpoint.io.names import step_name  # noqa: F401 (bench.goodput's)
from dcp_train.job.metrics import of_kind
from bench.storm import PROCESS_KINDS

PHASES = ("detection", "relaunch", "imports", "process_group", "startup", "build", "resume",
          "first_step")


def trains(run: dict) -> list[dict]:
    return of_kind(run["records"], "train")


def final_step(run: dict) -> int:
    return max((r["step"] for r in trains(run)), default=0)


def median_step_s(run: dict) -> float:
    """Median seconds between consecutive steps of one launch (a failure-free run)."""
    steps = trains(run)
    return statistics.median(b["time"] - a["time"] for a, b in zip(steps, steps[1:])
                             if b["step"] == a["step"] + 1)


def ettr(steps: int, step_s: float, wall_s: float) -> float:
    """Effective training time ratio: the failure-free time of the steps made, over the wall."""
    return steps * step_s / wall_s


def floor_ettr(process_failures: int, bare_s: float, wall_s: float) -> float:
    """The same wall time if the first launch and each failure that ends a process cost only a
    bare launch, and nothing else costs anything (no lost steps, no saves)."""
    return 1 - (1 + process_failures) * bare_s / wall_s


def final_equal(step_dir, ref_step_dir, tmp) -> dict:
    """Model and optimizer tensors of two checkpoints, torch.equal one by one."""
    import torch

    from dcp_train.tools.export import load_full_state
    a, b = load_full_state(step_dir, tmp), load_full_state(ref_step_dir, tmp)
    keys = sorted(k for k in set(a) | set(b) if k.startswith(("model.", "optim.")))
    differ = [k for k in keys if k not in a or k not in b or not torch.equal(a[k], b[k])]
    return {"equal": bool(keys) and not differ, "tensors": len(keys), "differ": differ[:5]}


def analyse(run: dict, f, median_s: float, until: float) -> dict:
    """The measurements of one injected failure of `run` (see the module's docstring); `until`:
    when the next failure was injected (or the run ended)."""
    t = f.injected
    recs = run["records"]
    after = [r for r in recs if r["kind"] == "train" and r["time"] > t]
    if not after:
        return {"kind": f.kind, "reached": True, "next_step": None}
    # a failure that ends processes may do so a while later (a full disk at the next save)
    configs = [r for r in recs if r["kind"] == "config" and t < r["time"] < until]
    if configs:
        after = [r for r in after if r["time"] > configs[0]["time"]] or after
    first = after[0]
    out = {"kind": f.kind, "detail": f.detail, "effect": f.effect, "at_s": t - run["start"],
           "seconds": first["time"] - t, "lost_steps": 0, **f.info}
    configs = [r for r in configs if r["time"] < first["time"]]
    if not configs:
        window = [r for r in after if r["time"] <= t + f.seconds]
        out["slowdown_s"] = f.seconds - len(window) * median_s if f.seconds else 0.0
        return out
    cfg = configs[-1]
    old = [w for w in run["workers"].values() if w["start"] < t and (w["gone"] or t) >= t]
    new = [w["start"] for w in run["workers"].values() if t < w["start"] <= cfg["time"]]
    gone = max((w["gone"] for w in old if w["gone"] is not None), default=t)
    started = max(new) if new else gone
    gone = min(gone, started)  # seen by a poll, so late; a new worker's start is exact
    res = next((r for r in recs if r["kind"] == "resume" and cfg["time"] <= r["time"]
                <= first["time"]), None)
    res_start = res["time"] - res["seconds"] if res else first["time"]
    res_end = res["time"] if res else first["time"]
    phases = {"detection": gone - t, "relaunch": started - gone,
              "startup": cfg["time"] - started, "build": res_start - cfg["time"],
              "resume": res_end - res_start, "first_step": first["time"] - res_end}
    if cfg.get("setup_s") is not None:
        phases["process_group"] = cfg["setup_s"]
        phases["imports"] = phases["startup"] - cfg["setup_s"]
    before = [r["step"] for r in recs if r["kind"] == "train" and r["time"] < cfg["time"]]
    out.update(phases=phases, restarts=len(configs),
               lost_steps=max(before, default=0) - (res["step"] if res else 0),
               resumed_from=res["step"] if res else 0, resume_path=res and res.get("path"))
    return out


def failures(run: dict, median_s: float) -> list[dict]:
    injected = sorted(f.injected for f in run["failures"] if f.injected is not None)
    return [analyse(run, f, median_s, until=min([x for x in injected if x > f.injected],
                                                default=run["end"]))
            if f.injected is not None else {"kind": f.kind, "reached": False}
            for f in run["failures"]]


def by_kind(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for r in rows:
        if r.get("reached") is False:
            continue
        k = out.setdefault(r["kind"], {"n": 0, "lost_steps": 0, "seconds": []})
        k["n"] += 1
        k["lost_steps"] += r.get("lost_steps") or 0
        if r.get("seconds") is not None:
            k["seconds"].append(r["seconds"])
    for k in out.values():
        k["seconds_median"] = statistics.median(k["seconds"]) if k["seconds"] else None
    return out


def summarize(ours: dict, base: dict, ref: dict, bares: list[dict], equal: dict,
              on_tmpfs: bool) -> dict:
    step_s = median_step_s(ref)
    bare = {"seconds": statistics.median(b["seconds"] for b in bares), "each": bares}
    rows, base_rows = failures(ours, step_s), failures(base, step_s)
    injected = [f for f in ours["failures"] if f.injected is not None]
    k = sum(f.kind in PROCESS_KINDS for f in injected)
    restarts = [r["seconds"] for r in rows if "phases" in r and r.get("seconds") is not None]
    return {
        "ettr": ettr(final_step(ref), step_s, ours["wall_s"]),  # ref: to ours' last checkpoint
        "baseline_ettr": ettr(base["final_committed"], step_s, base["wall_s"]),
        "floor_ettr": floor_ettr(k, bare["seconds"], ours["wall_s"]),
        "failures": rows, "by_kind": by_kind(rows), "final_equal": equal["equal"],
        "restart_s_median": statistics.median(restarts) if restarts else None,
        "baseline_failures": base_rows, "baseline_by_kind": by_kind(base_rows),
        "final_state": equal, "median_step_s": step_s, "bare_relaunch_s": bare["seconds"],
        "bare_relaunch": bare,
        "runs": {name: {"wall_s": r["wall_s"], "final_step": final_step(r),
                        "final_committed": r.get("final_committed", final_step(ref)),
                        "launches": len(r.get("launches", [])),
                        "attempts": sum(x["kind"] == "config" for x in r["records"])}
                 for name, r in (("ours", ours), ("baseline", base), ("reference", ref))},
        "record_time": "program" if all(not r.get("time_observed") for r in ours["records"])
        else "observed by the supervisor's poll (the records carry no `time`)",
        "local_tier_on_tmpfs": on_tmpfs,
        "raw": {name: {k: r.get(k) for k in ("start", "end", "records", "launches", "workers")}
                for name, r in (("ours", ours), ("baseline", base), ("reference", ref))},
    }


def load_figures(result: dict) -> dict:
    """Figures that tell the failures' cost from the machine's load, from the raw records:
    per run its own median step time, and ETTR at it (the load of the run's own minutes in
    both numerator and denominator); `final_saved`: ours' last step is its final checkpoint."""
    out = {}
    for name, run in result["runs"].items():
        raw = result["raw"][name]
        own = median_step_s(raw)
        run["median_step_s"] = own
        run["ettr_at_own_step"] = ettr(run["final_committed"], own, run["wall_s"])
        out[name] = own
    last = [r for r in result["raw"]["ours"]["records"] if r["kind"] == "train"][-1]
    result["final_saved"] = last["step"] == result["runs"]["ours"]["final_committed"]
    return out


def meta(started, load0, argv) -> dict:
    return run_meta(started, load0, argv)


def _f(x, fmt=".2f") -> str:
    return "-" if x is None else format(x, fmt)


def render(r: dict, minutes: float, seed: int) -> str:
    m = r.get("meta", {})
    lines = ["# Goodput under a failure storm (bench/goodput.py)", "",
             f"`python -m bench.goodput --minutes {minutes:g} --seed {seed}`, {m.get('date')}, "
             f"{m.get('machine')}, load average {m.get('load')} (start, end).", "",
             "| run | ETTR | final checkpoint | wall s | its median step ms | ETTR at its own "
             "step time |", "| --- | --- | --- | --- | --- | --- |"]
    for name, key in (("ours (two tiers)", "ours"), ("baseline (bucket only, sync)", "baseline")):
        e = r["ettr"] if key == "ours" else r["baseline_ettr"]
        run = r["runs"][key]
        lines.append(f"| {name} | {e:.3f} | {run['final_committed']} | {run['wall_s']:.0f} | "
                     f"{run['median_step_s'] * 1000:.0f} | {run['ettr_at_own_step']:.3f} |")
    lines += [f"| floor (bare relaunch {r['bare_relaunch_s']:.2f} s per failure) | "
              f"{r['floor_ettr']:.3f} | | | | |", "",
              f"final_equal: {r['final_equal']} ({r['final_state']['tensors']} tensors); "
              f"median failure-free step {r['median_step_s'] * 1000:.0f} ms; restart median "
              f"{_f(r['restart_s_median'])} s; record times: {r['record_time']}; ours' last "
              f"step is its final checkpoint: {r['final_saved']}.", "",
              "| at s | kind | what | lost steps | s to next step | slowdown s | "
              + " | ".join(PHASES) + " |", "| " + " | ".join(["---"] * (6 + len(PHASES))) + " |"]
    for row in r["failures"]:
        if row.get("reached") is False:
            lines.append(f"| - | {row['kind']} | not reached | | | |" + " |" * len(PHASES))
            continue
        ph = row.get("phases", {})
        lines.append(f"| {_f(row.get('at_s'), '.0f')} | {row['kind']} | {row.get('effect', '')} "
                     f"| {row.get('lost_steps')} | {_f(row.get('seconds'))} | "
                     f"{_f(row.get('slowdown_s'))} | "
                     + " | ".join(_f(ph.get(p)) for p in PHASES) + " |")
    return "\n".join(lines) + "\n"
