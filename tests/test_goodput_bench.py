"""bench/goodput.py's arithmetic and its seeded storm, without running one (the storm itself is
the benchmark: python -m bench.goodput --minutes 4)."""

from __future__ import annotations

from bench import goodput_report as report
from bench.storm import KINDS, Failure, schedule


def test_schedule_is_seeded_and_varied():
    a, b = schedule(7, 4, 10), schedule(7, 4, 10)
    assert [f.as_dict() for f in a] == [f.as_dict() for f in b]  # same seed, same storm
    assert [f.as_dict() for f in a] != [f.as_dict() for f in schedule(8, 4, 10)]
    assert len(a) >= 4 and len({f.kind for f in a}) >= 3
    assert len({f.kind for f in schedule(3, 20, 10)[:5]}) == len(KINDS)  # each kind early
    assert all(0 < f.at < 4 * 60 for f in a) and a == sorted(a, key=lambda f: f.at)
    for f in schedule(3, 20, 10):
        if f.kind == "bucket":
            assert f.detail in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                                "silent")
            assert f.seconds == (15.0 if f.detail == "silent" else 20.0)


def test_ettr_and_floor():
    assert report.ettr(steps=900, step_s=0.2, wall_s=200) == 0.9
    assert report.floor_ettr(process_failures=3, bare_s=2.5, wall_s=200) == 1 - 4 * 2.5 / 200


def test_a_restart_split_into_phases():
    """A rank killed at t=100 after step 12, checkpoint 10, the group restarted."""
    recs = [{"kind": "train", "step": s, "time": 90 + s * 0.5} for s in range(1, 13)]
    recs += [{"kind": "config", "time": 106.0},
             {"kind": "resume", "step": 10, "seconds": 0.5, "time": 108.0},
             {"kind": "train", "step": 11, "time": 108.3}]
    workers = {1: {"rank": 0, "start": 80.0, "gone": 101.0},
               2: {"rank": 1, "start": 80.0, "gone": 100.1},
               3: {"rank": 0, "start": 102.0, "gone": None}}
    f = Failure(at=10, kind="rank_kill", rank=1, injected=100.0)
    run = {"records": recs, "workers": workers, "start": 90.0, "failures": [f]}
    row = report.analyse(run, f, median_s=0.5, until=200.0)
    assert row["lost_steps"] == 2 and row["resumed_from"] == 10
    assert abs(row["seconds"] - 8.3) < 1e-9
    ph = row["phases"]
    expect = {"detection": 1.0, "relaunch": 1.0, "startup": 4.0, "build": 1.5, "resume": 0.5,
              "first_step": 0.3}
    assert {k: round(v, 9) for k, v in ph.items()} == expect
    assert abs(sum(ph.values()) - row["seconds"]) < 1e-9
