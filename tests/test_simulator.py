"""The event loop (simulator.py): boundaries, idle jumps, horizons, determinism, records."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_engine
from llmqueue.config import parse_config
from llmqueue.runner import compare, run_config
from llmqueue.core.simulator import simulate
from llmqueue.model.workload import Requests


def _requests(rows):
    t, p, d = zip(*rows)
    return Requests(np.array(t, float), np.array(p, np.int64), np.array(d, np.int64))


def test_arrival_during_a_batch_waits_for_the_boundary_and_idle_engine_jumps():
    # 1 s per batch; B arrives mid-batch, C long after the engine went idle.
    reqs = _requests([(0.0, 1, 1), (0.5, 1, 1), (10.25, 2, 0)])
    r = simulate(make_engine("sarathi", 8), reqs, drain=True, record_batches=True)
    assert r.first_token_time.tolist() == [1.0, 2.0, 11.25]
    assert r.finish_time.tolist() == [2.0, 3.0, 11.25]
    assert r.batches["start_time"].tolist() == [0.0, 1.0, 2.0, 10.25]
    assert r.batches["num_prefill_tokens"].tolist() == [1, 1, 0, 2]
    assert r.batches["num_decode_tokens"].tolist() == [0, 1, 1, 0]
    assert r.end_time == 11.25


def test_horizon_stops_at_the_first_boundary_after_it():
    reqs = _requests([(0.0, 1, 5), (0.1, 1, 5)])
    r = simulate(make_engine("sarathi", 8), reqs, horizon_s=2.5)
    assert r.end_time == 2.5
    assert r.batch_end_time.tolist() == [1.0, 2.0, 3.0]  # the batch started at 2.0 < 2.5 completes
    assert np.isnan(r.finish_time).all()


def test_run_by_requests_ends_at_the_last_arrival():
    data = {"workload": {"rate": 5.0}, "run": {"requests": 500, "seed": 1}}
    run = run_config(parse_config(data))
    assert run.summary["arrived"] == 500
    assert run.result.end_time == pytest.approx(run.result.arrival_time[-1])


def test_same_seed_same_run_and_common_arrivals_across_schedulers():
    data = {"workload": {"load": 0.8}, "run": {"horizon_s": 120.0, "seed": 7}}
    a, b = run_config(parse_config(data)), run_config(parse_config(data))
    assert np.array_equal(a.result.finish_time, b.result.finish_time, equal_nan=True)
    assert a.summary == {**b.summary, "wall_s": a.summary["wall_s"]}
    other = run_config(parse_config({**data, "run": {"horizon_s": 120.0, "seed": 8}}))
    assert not np.array_equal(a.result.arrival_time[:50], other.result.arrival_time[:50])
    runs = compare(parse_config(data), ["vllm", "orca", "sarathi"])
    for run in runs[1:]:
        assert np.array_equal(run.result.arrival_time, runs[0].result.arrival_time)
        assert np.array_equal(run.result.num_output_tokens, runs[0].result.num_output_tokens)


def test_batch_records_are_consistent_with_the_summary():
    data = {"workload": {"load": 0.9}, "run": {"horizon_s": 300.0, "seed": 2, "record_batches": True},
            "engine": {"scheduler": "vllm"}}
    run = run_config(parse_config(data))
    b = run.result.batches
    tokens = b["num_prefill_tokens"] + b["num_decode_tokens"]
    assert np.array_equal(tokens, run.result.batch_tokens)
    assert (tokens <= 512).all() and (tokens <= b["bound"]).all() and (b["bound"] <= b["demand"]).all()
    assert np.count_nonzero(tokens != b["bound"]) == run.summary["work_conserving_violations"] > 0
    assert np.allclose(b["end_time"][:-1], np.minimum(b["start_time"][1:], b["end_time"][:-1]))
    assert run.summary["batches"] == len(tokens)
    assert run.summary["mean_batch_tokens"] == pytest.approx(tokens.mean())
