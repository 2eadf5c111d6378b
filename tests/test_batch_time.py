"""Batch-time models (arXiv 2504.07347 §3.1, Eq. 4) and Theorem 2's closed form (§3.2)."""

from __future__ import annotations

import numpy as np
import pytest

from llmqueue.analysis import analyze
from llmqueue.model.batch_time import make_batch_time
from llmqueue.errors import ConfigError


def test_paper_staircase_values():
    t = make_batch_time(None)
    assert t(128) == pytest.approx(0.04675)
    assert t(512) == pytest.approx(0.15316)
    assert t(1024) == pytest.approx(0.29504)
    assert t(1) == t(128) and t(129) == pytest.approx(0.04675 + 0.03547)


def test_piecewise_linear_and_constant():
    pl = make_batch_time({"model": "piecewise_linear", "c_ms": 20.0, "a_ms_per_token": 0.1, "b0": 64})
    assert pl(64) == pytest.approx(0.020) and pl(164) == pytest.approx(0.030)
    const = make_batch_time({"model": "constant", "duration_ms": 1000})
    assert const(1) == const(768) == 1.0


def test_table_interpolation_and_extrapolation():
    spec = {"model": "table", "points_ms": [[1, 10.0], [101, 20.0], [201, 40.0]]}
    lin = make_batch_time(spec)
    assert lin(51) == pytest.approx(0.015)
    assert lin(301) == pytest.approx(0.060)  # continues the last segment
    clamp = make_batch_time({**spec, "extrapolate": "clamp"})
    assert clamp(301) == pytest.approx(0.040)
    strict = make_batch_time({**spec, "extrapolate": "error"})
    assert strict.table(201)[201] == pytest.approx(0.040)
    with pytest.raises(ConfigError, match="outside the table"):
        strict.table(256)


@pytest.mark.parametrize("spec,field", [
    ({"model": "table", "points_ms": [[1, 10.0]]}, "points_ms"),
    ({"model": "table", "points_ms": [[10, 1.0], [5, 2.0]]}, "points_ms"),
    ({"model": "table", "points_ms": [[1, -1.0], [5, 2.0]]}, "points_ms"),
    ({"model": "table", "points_ms": [[1, 1.0], [5, 2.0]], "extrapolate": "wild"}, "extrapolate"),
    ({"model": "staircase", "a_ms": 0}, "a_ms"),
    ({"model": "staircase", "b0": 1.5}, "b0"),
    ({"model": "constant", "duration_ms": True}, "duration_ms"),
    ({"model": "piecewise_linear", "c_ms": 1.0}, "a_ms_per_token"),
    ({"model": "staircase", "slope": 2}, "slope"),
])
def test_bad_batch_time_specs(spec, field):
    with pytest.raises(ConfigError, match=field):
        make_batch_time(spec)


def test_nonpositive_times_refused():
    t = make_batch_time({"model": "table", "points_ms": [[100, 1.0], [200, 50.0]]})  # linear below 100 goes negative
    with pytest.raises(ConfigError, match="> 0"):
        t.table(512)


def test_round_trip_to_dict():
    for spec in (None, {"model": "piecewise_linear", "c_ms": 20.0, "a_ms_per_token": 0.1, "b0": 64},
                 {"model": "constant", "duration_ms": 5.0},
                 {"model": "table", "points_ms": [[1.0, 10.0], [101.0, 20.0]], "extrapolate": "clamp"}):
        t = make_batch_time(spec)
        again = make_batch_time(t.to_dict())
        b = np.arange(1, 300)
        assert np.allclose(t.seconds(b), again.seconds(b))


def test_theorem2_numbers():
    a = analyze(make_batch_time(None), 512, 10.0, 100, 100)
    assert a.capacity_tokens_per_s == pytest.approx(3342.908, rel=1e-6)
    assert a.max_stable_rate_rps == pytest.approx(16.7145, rel=1e-4)
    assert a.offered_tokens_per_s == pytest.approx(2000.0) and a.fluid_growth_tokens_per_s == 0.0
    over = analyze(make_batch_time(None), 512, 1.1 * a.max_stable_rate_rps, 100, 100)
    assert over.fluid_growth_tokens_per_s == pytest.approx(0.1 * a.capacity_tokens_per_s)
    fig1 = analyze(make_batch_time(None), 512, 1.0, 129, 112)
    assert fig1.max_stable_rate_rps == pytest.approx(13.87, abs=0.005)
    assert a.notes == ()


def test_budget_not_multiple_of_b0_is_flagged():
    a = analyze(make_batch_time(None), 600, 1.0, 100, 100)
    assert a.peak_batch_tokens == 512 and a.peak_tokens_per_s > a.capacity_tokens_per_s
    assert any("Assumption 1" in n for n in a.notes)


@pytest.mark.parametrize("budget", [100, 255])
def test_no_assumption_note_when_full_batches_are_fastest(budget):
    """b0 need not divide b_max for Theorem 2's capacity to be exact: below one step (100 < 128)
    every batch takes c + a, and at 255 tokens full batches beat 128-token ones (3.10 vs 2.74
    tokens/ms); only a budget whose whole steps serve faster is flagged."""
    a = analyze(make_batch_time(None), budget, 1.0, 100, 100)
    assert a.peak_batch_tokens == budget and a.notes == ()
