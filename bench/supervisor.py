"""A job supervised the way users run one: torchrun `--max-restarts` restarts the worker group
after a rank fails; an outer loop relaunches torchrun when the job exits 69 (stalled) or 75
(stopped with a checkpoint), as a SLURM requeue or a Kubernetes restart policy would, and after a
whole-"node" loss. Exit 2 (bad input) ends the job, except while a disk-full failure the storm
injected is in force: then it is relaunched once the disk is freed (an operator's action; the
report marks it).

    job = Job(workdir, trainer_flags, env)
    job.launch()
    while ...: job.poll(now)        # worker pids and start times, new metrics records

What it observes, with Unix times: each launch of torchrun, each worker process's start (its
/proc start time), each worker's disappearance (seen by polling, within POLL seconds), each
torchrun exit with the workers' exit codes from its report, and every metrics record (its
`time` field where the program writes one, else when the poll saw it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from bench.common import child_env, descendants, free_port, torchrun

POLL = 0.02
RELAUNCH_CODES = (69, 75)
_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)")
_CLK = os.sysconf("SC_CLK_TCK")


def _boot_time() -> float:
    with open("/proc/stat") as f:
        return float(next(line.split()[1] for line in f if line.startswith("btime")))


_BTIME = _boot_time()


def start_time(pid: int) -> float | None:
    """Unix time the process started (/proc/PID/stat field 22, clock ticks since boot)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return _BTIME + int(fields[19]) / _CLK


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        return int(env[b"RANK"])
    except (OSError, KeyError, ValueError):
        return None


class Job:
    def __init__(self, workdir: Path, flags: list[str], env: dict, nproc: int = 2,
                 max_restarts: int = 100):
        self.workdir, self.flags, self.nproc = Path(workdir), flags, nproc
        self.env = child_env(nproc, env)
        self.max_restarts = max_restarts
        self.metrics_path = self.workdir / "log" / "metrics.jsonl"
        self.out = open(self.workdir / "torchrun.log", "ab")
        self.proc: subprocess.Popen | None = None
        self.launches: list[dict] = []   # {"start", "end", "codes", "rc"}
        self.workers: dict[int, dict] = {}  # pid -> {"rank", "start", "gone"}
        self.records: list[dict] = []     # metrics records, each with "time"
        self._offset = 0
        self._out_offset = 0

    # ---------------------------------------------------------------- control
    def launch(self) -> None:
        cmd = torchrun(self.nproc, ["--max-restarts", str(self.max_restarts),
                                    "-m", "dcp_train.main", "--auto_resume", *self.flags])
        cmd[cmd.index("--master_port") + 1] = str(free_port())
        self._out_offset = self.out.tell()
        self.launches.append({"start": time.time(), "end": None, "codes": [], "rc": None})
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=self.env, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def worker_of_rank(self, rank: int) -> int | None:
        alive = [pid for pid, w in self.workers.items() if w["gone"] is None and w["rank"] == rank]
        return alive[-1] if alive else None

    def kill_node(self) -> None:
        """SIGKILL torchrun and every process under it (its workers have sessions of their own)."""
        if self.proc is None:
            return
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """SIGTERM to torchrun, which passes it on: the ranks save and exit 75."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)

    def kill_all(self) -> None:
        if self.running():
            self.kill_node()
            self.proc.wait()

    # ---------------------------------------------------------------- observing
    def poll(self, now: float) -> dict | None:
        """Observe; returns the ended launch ({"rc", "codes", ...}) when torchrun has exited."""
        self._read_metrics(now)
        if self.proc is None:
            return None
        for pid in _children(self.proc.pid):
            if pid not in self.workers:
                self.workers[pid] = {"rank": None, "start": start_time(pid) or now, "gone": None}
            if self.workers[pid]["rank"] is None:  # seen between fork and exec: not yet known
                self.workers[pid]["rank"] = _rank_of(pid)
        for pid, w in self.workers.items():
            if w["gone"] is None and not os.path.exists(f"/proc/{pid}/stat"):
                w["gone"] = now
            elif w["gone"] is None and self.proc.poll() is not None:
                w["gone"] = now
        if self.proc.poll() is None:
            return None
        launch = self.launches[-1]
        if launch["end"] is None:
            self._read_metrics(now)
            launch.update(end=now, rc=self.proc.returncode, codes=self._exit_codes())
            for w in self.workers.values():
                w["gone"] = w["gone"] or now
            return launch
        return None

    def _exit_codes(self) -> list[int]:
        self.out.flush()
        with open(self.out.name, "rb") as f:
            f.seek(self._out_offset)
            text = f.read().decode(errors="replace")
        return [int(c) for c in _EXITCODE.findall(text)]

    def _read_metrics(self, now: float) -> None:
        try:
            with open(self.metrics_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # whole lines only
        self._offset += end
        for line in data[:end].splitlines():
            if line.strip():
                rec = json.loads(line)
                if "time" not in rec:  # a program that writes no `time` field
                    rec["time"], rec["time_observed"] = now, True
                self.records.append(rec)

    def tail(self, n: int = 30) -> str:
        self.out.flush()
        return "\n".join(Path(self.out.name).read_text(errors="replace").splitlines()[-n:])

    def close(self) -> None:
        self.kill_all()
        self.out.close()
