"""The stability verdict and the backlog/in-system series (metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest

from llmqueue.metrics import Trend, backlog, backlog_trend, in_system, kv_blocks_at, timeseries, verdict
from llmqueue.core.simulator import KVRecord, Result


def _result(arrivals, prompts, outputs, finish, batch_end, batch_tokens, end_time):
    n = len(arrivals)
    return Result("test", 512, end_time, np.asarray(arrivals, float), np.asarray(prompts), np.asarray(outputs),
                  np.full(n, np.nan), np.asarray(finish, float), np.zeros(n, bool), np.asarray(batch_end, float),
                  np.asarray(batch_tokens), 0)


def test_backlog_and_in_system_step_functions():
    r = _result([0.0, 1.0], [3, 2], [1, 1], [2.5, np.nan], [1.0, 2.5, 3.5], [3, 2, 1], 4.0)
    t = np.array([0.0, 0.5, 1.0, 2.5, 3.9])
    assert backlog(r, t).tolist() == [4, 4, 4, 2, 1]
    assert in_system(r, t).tolist() == [1, 1, 2, 1, 1]


def test_kv_blocks_in_use_follow_the_running_batch():
    """Blocks of the batch running at t; 0 before the first batch and while the engine is idle."""
    r = _result([0.0, 1.0], [3, 2], [1, 1], [2.5, np.nan], [1.0, 2.5, 3.5], [3, 2, 1], 4.0)
    r.kv = KVRecord(10, 16, "recompute", np.array([0.5, 1.0, 3.0]), np.array([4, 6, 2]), np.zeros(3, np.int64),
                    np.zeros(2, np.int64), np.zeros(2, np.int64), 0)
    t = np.array([0.0, 0.5, 0.99, 1.0, 2.4, 2.5, 2.9, 3.0, 3.49, 3.5, 4.0])
    assert kv_blocks_at(r, t).tolist() == [0, 4, 4, 6, 6, 0, 0, 2, 2, 0, 0]
    assert timeseries(r, 5)["kv_blocks_in_use"].tolist() == [0, 6, 6, 2, 0]
    r.kv = None
    assert "kv_blocks_in_use" not in timeseries(r, 5)


@pytest.mark.parametrize("trend,expected", [
    (Trend(300.0, 280.0, 320.0, (0, 1)), "unstable"),
    (Trend(1.0, -5.0, 7.0, (0, 1)), "stable"),
    (Trend(-40.0, -60.0, -20.0, (0, 1)), "stable"),
    (Trend(30.0, 10.0, 50.0, (0, 1)), "inconclusive"),   # grows, but not beyond the tolerance
    (Trend(60.0, -5.0, 125.0, (0, 1)), "inconclusive"),  # too noisy
])
def test_verdict_rules(trend, expected):
    assert verdict(trend, 33.0, 10_000)[0] == expected


def test_short_runs_are_inconclusive():
    assert verdict(Trend(500.0, 490.0, 510.0, (0, 1)), 33.0, 50)[0] == "inconclusive"
    assert verdict(None, 33.0, 10_000)[0] == "inconclusive"


def test_trend_recovers_a_linear_growth():
    # one 100-token request per second, served 50 tokens per second: growth 50 tokens/s
    T = 1000.0
    arrivals = np.arange(1000.0)
    ends = np.arange(1.0, T + 1)
    r = _result(arrivals, np.full(1000, 60), np.full(1000, 40), np.full(1000, np.nan), ends, np.full(1000, 50), T)
    t = backlog_trend(r)
    assert t.slope == pytest.approx(50.0, rel=0.01) and t.ci_low > 45
