"""A host's routing statistics: Peak-EWMA time to first byte, the failure penalty, the decode rate,
p95 for hedging, the first-byte deadline, and the in-flight counts the workers of one edge share."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from edge.routing.fleet import Host
from edge.routing.stats import (
    FAILURE_PENALTY_S,
    UNSAMPLED_FLOORS,
    HostStats,
    SharedLoad,
    first_byte_deadline,
    sweep,
)

# --- the score ------------------------------------------------------------------------------


def test_peak_ewma_takes_bad_news_at_once_and_good_news_gradually():
    stats = HostStats()
    stats.record(0.1, False, 0.0)
    stats.record(2.0, False, 0.1)
    assert stats.ttfb_ewma == 2.0  # peak
    stats.record(0.1, False, 0.2)
    assert 1.9 < stats.ttfb_ewma < 2.0  # 0.1 s later: barely moved
    stats.record(0.1, False, 30.0)
    assert stats.ttfb_ewma < 0.2  # long after: the sample dominates


def test_a_failure_is_a_penalty_latency_and_counts_as_failing():
    stats = HostStats()
    stats.record(0.01, False, 0.0)
    stats.record(None, True, 0.001)  # a 503 in 1 ms
    assert stats.ttfb_ewma == FAILURE_PENALTY_S
    assert stats.failing(1.0, 10.0) and not stats.failing(11.0, 10.0)
    stats.record(0.01, False, 2.0)
    assert not stats.failing(2.0, 10.0)


def test_score_drifts_back_to_neutral_and_unsampled_is_neutral():
    stats = HostStats()
    assert stats.score(5.0, neutral=0.3, decay_s=10.0) == 0.3
    stats.record(None, True, 0.0)
    assert stats.score(0.0, 0.3, 10.0) == FAILURE_PENALTY_S
    assert stats.score(10.0, 0.3, 10.0) == pytest.approx(0.3 + (5.0 - 0.3) / 2.718281828, 1e-3)
    assert stats.score(100.0, 0.3, 10.0) == pytest.approx(0.3, abs=1e-3)


def test_decode_rate_needs_streaming_after_the_first_byte():
    stats = HostStats()
    stats.record(0.1, False, 1.0, 100, duration_s=1.1)  # 100 tokens in 1 s after first byte
    assert stats.rate_ewma == pytest.approx(100.0)
    stats.record(0.5, False, 2.0, 100, duration_s=0.51)  # a non-streamed body: no rate
    assert stats.rate_samples == 1


def test_p95_needs_enough_samples_and_is_capped_at_four_medians():
    stats = HostStats()
    for i in range(7):
        stats.record(0.01 * (i + 1), False, float(i))
        assert (stats.p95() is None) == (i < 4)
    for i in range(13):
        stats.record(0.01, False, 10.0 + i)
    stats.record(0.9, False, 30.0)
    assert stats.p95() == 0.04  # the 95th percentile (0.07) is over four medians (0.01)
    for i in range(10):
        stats.record(0.05, False, 40.0 + i)
    assert stats.p95() == 0.07


# --- the first-byte deadline ----------------------------------------------------------------


def test_an_unsampled_host_gets_twice_the_floor_never_past_the_ceiling():
    stats = HostStats()
    assert UNSAMPLED_FLOORS == 2.0
    assert first_byte_deadline(stats, 4.0, 5.0, 60.0) == 10.0  # the defaults: seconds, not 60
    assert first_byte_deadline(stats, 4.0, 5.0, 7.0) == 7.0
    assert first_byte_deadline(stats, 4.0, 5.0, 3.0) == 3.0  # a model's ceiling below the floor


def test_the_deadline_is_factor_times_the_slowest_good_sample_until_a_p95_is_known():
    stats = HostStats()
    stats.record(0.5, False, 0.0)
    assert first_byte_deadline(stats, 4.0, 5.0, 60.0) == 5.0  # 2 s: the floor
    stats.record(3.0, False, 1.0)
    assert first_byte_deadline(stats, 4.0, 5.0, 60.0) == 12.0
    assert first_byte_deadline(stats, 4.0, 5.0, 10.0) == 10.0  # the ceiling
    # A failure is no measure of the host's first token: its penalty (in the EWMA, for the
    # policies) does not stretch the deadline to 4 x FAILURE_PENALTY_S.
    stats.record(None, True, 2.0)
    assert stats.ttfb_ewma == FAILURE_PENALTY_S
    assert first_byte_deadline(stats, 4.0, 1.0, 60.0) == 12.0
    failed_only = HostStats()
    failed_only.record(None, True, 0.0)
    assert first_byte_deadline(failed_only, 4.0, 5.0, 60.0) == 10.0  # as if unsampled
    # Five good samples, far apart: the EWMA forgets the 3 s and the failure, the p95 does not.
    fresh = HostStats()
    for i, ttfb in enumerate((3.0, 1.0, 1.0, 1.0, 1.0)):
        fresh.record(ttfb, False, 100.0 * i)
    assert fresh.p95() == 3.0 and fresh.ttfb_ewma < 1.01
    assert first_byte_deadline(fresh, 4.0, 1.0, 60.0) == 12.0
    assert first_byte_deadline(fresh, 2.0, 1.0, 60.0) == 6.0
    assert first_byte_deadline(fresh, 4.0, 20.0, 60.0) == 20.0  # the floor


# --- shared in-flight counts ----------------------------------------------------------------


def test_shared_load_shows_each_worker_the_others_counts(tmp_path):
    path = str(tmp_path / "load")
    a, b = SharedLoad(path, rows=4, row=0), SharedLoad(path, rows=4, row=1)
    try:
        mine, theirs = Host("http://10.0.0.1:8000"), Host("http://10.0.0.1:8000")
        mine.inflight, theirs.inflight = 2, 5
        a.publish([mine])
        b.publish([theirs])
        a.publish([mine])
        assert mine.stats.remote_inflight == 5 and theirs.stats.remote_inflight == 2
        theirs.inflight = 0
        b.publish([])  # the host left b's fleet: its count goes with it
        a.publish([mine])
        assert mine.stats.remote_inflight == 0
    finally:
        b.close()
        a.close()
    assert not (tmp_path / "load").exists()


def test_shared_load_reaps_a_dead_workers_row(tmp_path):
    path = str(tmp_path / "load")
    child = textwrap.dedent(f"""
        import sys
        from edge.routing.fleet import Host
        from edge.routing.stats import SharedLoad
        shared = SharedLoad({path!r}, rows=4)
        host = Host("http://10.0.0.1:8000")
        host.inflight = 7
        shared.publish([host])
        print(shared.row, flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        row = int(proc.stdout.readline())
        ours = SharedLoad(path, rows=4, row=3)
        host = Host("http://10.0.0.1:8000")
        ours.publish([host])
        assert host.stats.remote_inflight == 7 and row == 0
        assert ours.reap() == 0  # alive: its lock holds
        proc.kill()
        proc.wait(timeout=10)
        assert ours.reap() == 1
        ours.publish([host])
        assert host.stats.remote_inflight == 0
        ours.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdin.close()
        proc.stdout.close()


def test_sweep_removes_only_tables_of_supervisors_that_are_gone(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=10)
    names = [
        f"edge-load-{dead.pid}-8080",
        f"edge-load-{os.getpid()}-8080",
        "edge-load-x-1",
        "other",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert sweep(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
