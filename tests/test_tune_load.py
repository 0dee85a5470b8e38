"""Load: 300 ASHA trials through 16 slots of one host, with nothing lost and no slot leaked."""

from __future__ import annotations

import pytest

import tune_helpers as h
from tune_helpers import ray_session  # noqa: F401 - shared fixture

TRIALS, SLOTS, K = 300, 16, 2


def rungs() -> set[int]:
    """Iterations where ASHA may stop a trial: grace * rf^k, and max_t."""
    out, r = {h.LOAD_MAX_T}, h.LOAD_GRACE
    while r < h.LOAD_MAX_T:
        out.add(r)
        r *= h.LOAD_RF
    return out


@pytest.mark.slow  # a load test: outside the README command, run by .ci/run
def test_300_asha_trials_through_16_slots_lose_nothing(ray_session, tmp_path):
    T, grid, log, watch, wall = h.load_sweep(str(tmp_path), trials=TRIALS, slots=SLOTS, reuse_actors=True,
                                             steps_per_report=K)
    try:
        assert len(grid) == TRIALS and h.errors(grid) == []
        stopped_at = set()
        for r in grid:
            rows = log.rows(r)
            its = [x["training_iteration"] for x in rows]
            assert its == list(range(1, len(rows) + 1)), (r.path, its)  # complete, each iteration once
            assert all(x["slot_steps"] == x["training_iteration"] * K for x in rows)  # a fresh slot per trial
            assert all(x["lr"] == rows[0]["config"]["lr"] for x in rows)  # its own hyperparameters
            assert r.metrics["training_iteration"] == its[-1]
            stopped_at.add(its[-1])
            # the on-disk history (Tune's JSON logger) agrees with what the controller saw
            assert [x["training_iteration"] for x in h.read_results(r.path)] == its
        assert stopped_at <= rungs() and h.LOAD_MAX_T in stopped_at and len(stopped_at) > 1
        # No slot leaks: the host never held more than its slots, and all are free at the end.
        assert max(s["max_held"] for s in watch.samples) <= SLOTS
        assert h.wait_until(lambda: all(s["attached"] == s["reserved"] == 0 for s in T.host_stats()), timeout=30)
        for s in T.host_stats():
            assert all(st["used"] == st["active"] == 0 for st in s["stacks"].values()), s["stacks"]
            assert sum(1 for e in s["events"] if e["event"] == "attach") >= 1
        print(f"\n{TRIALS} trials, {len(watch.times)} results in {wall:.1f}s: "
              f"{len(watch.times) / wall:.0f} results/s, peak {watch.peak_rate():.0f}/s")
    finally:
        T.shutdown_hosts()
