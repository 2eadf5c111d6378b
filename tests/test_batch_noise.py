"""Batch-time noise ([engine.batch_time] noise): a factor of mean 1 per batch, seeded per run and engine."""
from __future__ import annotations

import numpy as np
import pytest

from llmqueue.cluster.capacity import mg1_sojourn
from llmqueue.config import parse_config
from llmqueue.errors import ConfigError
from llmqueue.model.batch_time import Noisy, make_batch_time
from llmqueue.runner import build_engine, run_config

CONSTANT = {"model": "constant", "duration_ms": 10.0}


def _config(noise=None, seed=0, load=0.7, horizon=200.0, **engine):
    bt = dict(CONSTANT, **({} if noise is None else {"noise": noise}))
    return parse_config({
        "engine": {"scheduler": "sarathi", "token_budget": 1, "batch_time": bt, **engine},
        "workload": {"arrival": "poisson", "prompt": {"dist": "fixed", "value": 1},
                     "output": {"dist": "fixed", "value": 1}, "load": load},
        "run": {"horizon_s": horizon, "seed": seed, "record_batches": True}})


def _factors(model: Noisy, n: int) -> np.ndarray:
    return np.array([model._next() for _ in range(n)])


def test_lognormal_factor_has_mean_one_and_the_cv():
    model = make_batch_time(dict(CONSTANT, noise={"cv": 0.5})).fresh(3)
    f = _factors(model, 200_000)
    assert abs(f.mean() - 1) < 0.01 and abs(f.std() / f.mean() - 0.5) < 0.01 and (f > 0).all()
    assert model.noise_cv == 0.5 and model.to_dict()["noise"] == {"cv": 0.5}


def test_measured_factors_are_resampled_at_mean_one():
    model = make_batch_time(dict(CONSTANT, noise={"factors": [1.0, 2.0, 3.0], "seed": 5})).fresh(0)
    f = _factors(model, 30_000)
    assert set(np.round(f, 12)) == {0.5, 1.0, 1.5}
    assert abs(f.mean() - 1) < 0.01
    assert model.to_dict()["noise"] == {"factors": [0.5, 1.0, 1.5], "seed": 5}


def test_noise_is_deterministic_and_seeded_per_run_and_engine():
    a, b = (_factors(make_batch_time(dict(CONSTANT, noise={"cv": 0.3})).fresh(7, 2), 100) for _ in range(2))
    assert np.array_equal(a, b)
    other_seed = _factors(make_batch_time(dict(CONSTANT, noise={"cv": 0.3})).fresh(8, 2), 100)
    other_stream = _factors(make_batch_time(dict(CONSTANT, noise={"cv": 0.3})).fresh(7, 3), 100)
    assert not np.array_equal(a, other_seed) and not np.array_equal(a, other_stream)
    # a seed in the table fixes the draws whatever the run's seed
    fixed = [_factors(make_batch_time(dict(CONSTANT, noise={"cv": 0.3, "seed": 1})).fresh(s), 50) for s in (0, 9)]
    assert np.array_equal(*fixed)


def test_runs_repeat_and_keep_the_arrivals():
    one, two = run_config(_config({"cv": 0.8}, horizon=20)), run_config(_config({"cv": 0.8}, horizon=20))
    plain = run_config(_config(horizon=20))
    assert {**one.summary, "wall_s": 0} == {**two.summary, "wall_s": 0}
    assert np.array_equal(one.result.arrival_time, plain.result.arrival_time)
    assert one.summary["e2e_s"]["mean"] != plain.summary["e2e_s"]["mean"]
    # every batch of the plain run lasts 10 ms; the noisy ones scatter
    gaps = np.diff(one.result.batch_end_time)
    assert len(set(np.round(np.diff(plain.result.batch_end_time), 9))) >= 1 and len(set(np.round(gaps, 9))) > 100


def test_correlated_factors_keep_the_law_and_correlate_by_r_to_the_k():
    """With correlation r, ln ε is AR(1) (stationary from the first batch, carried across the draw
    blocks): mean 1 and the cv as without it, lag-k correlation r^k of ln ε."""
    model = make_batch_time(dict(CONSTANT, noise={"cv": 0.3, "correlation": 0.6})).fresh(4)
    f = _factors(model, 200_000)
    x = np.log(f)
    assert abs(f.mean() - 1) < 0.01 and abs(f.std() / f.mean() - 0.3) < 0.01
    for k in (1, 2, 3):
        assert abs(np.corrcoef(x[:-k], x[k:])[0, 1] - 0.6 ** k) < 0.01, k
    ends = np.arange(4096, len(x), 4096)   # the first draw of each block continues the last block's series
    assert np.corrcoef(x[ends - 1], x[ends])[0, 1] > 0.3   # 48 pairs: 0.6 ± 0.1 carried, 0 ± 0.15 if not
    first = np.array([np.log(make_batch_time(dict(CONSTANT, noise={"cv": 0.3, "correlation": 0.9})).fresh(s)._next())
                      for s in range(3000)])
    assert abs(first.std() - np.sqrt(np.log1p(0.09))) < 0.02      # stationary: no warm-up from 1
    assert model.to_dict()["noise"] == {"cv": 0.3, "correlation": 0.6}
    assert make_batch_time(model.to_dict()).fresh(4).correlation == 0.6


def test_correlated_noise_lengthens_the_queue():
    """Slow batches in runs: at the same cv the queue is longer with correlated factors than with
    independent ones (the excursions a deterministic or independent model misses)."""
    def mean_e2e(noise):
        return np.mean([run_config(_config(noise, seed=s, horizon=300.0)).summary["e2e_s"]["mean"] for s in range(2)])

    independent, correlated = mean_e2e({"cv": 0.3}), mean_e2e({"cv": 0.3, "correlation": 0.95})
    assert correlated > 1.3 * independent, (correlated, independent)


@pytest.mark.parametrize("noise, field", [
    ({"cv": 0}, "noise.cv"), ({"cv": 11}, "noise.cv"), ({"cv": "x"}, "noise.cv"),
    ({"factors": [1.0]}, "noise.factors"), ({"factors": [1.0, -1.0]}, "noise.factors"),
    ({"factors": [1.0, float("nan")]}, "noise.factors"), ({"factors": "ab"}, "noise.factors"),
    ({"cv": 0.1, "factors": [1, 2]}, "noise"), ({}, "noise"), ({"sigma": 1}, "noise"), (0.3, "noise"),
    ({"cv": 0.1, "seed": -1}, "noise.seed"), ({"cv": 0.1, "seed": 1.5}, "noise.seed"),
    ({"cv": 0.1, "correlation": 1.0}, "noise.correlation"), ({"cv": 0.1, "correlation": -0.1}, "noise.correlation"),
    ({"cv": 0.1, "correlation": "x"}, "noise.correlation"),
    ({"factors": [1.0, 2.0], "correlation": 0.5}, "noise.correlation"),
])
def test_bad_noise_is_refused_with_the_field(noise, field):
    with pytest.raises(ConfigError) as err:
        _config(noise)
    assert f"engine.batch_time.{field}" in str(err.value)
    assert "\n" not in str(err.value)


def test_network_engines_refuse_noise():
    from llmqueue.network.model import make_batch_time as network_batch_time  # noqa: F401 (the same builder)

    with pytest.raises(ConfigError, match="not yet for network engines"):
        make_batch_time(dict(CONSTANT, noise={"cv": 0.2}), noise=False)


def test_compiled_core_refuses_noise_with_the_reason():
    from llmqueue.core import fastcore

    engine = build_engine(_config({"cv": 0.2}))
    assert "batch-time noise" in fastcore.policy_reason(engine.scheduler, engine.batch_time)
    assert fastcore.policy_reason(build_engine(_config()).scheduler, build_engine(_config()).batch_time) is None


def test_cluster_replicas_draw_their_own_noise(monkeypatch):
    from llmqueue.cluster import sim
    from llmqueue.cluster.config import parse_cluster
    from llmqueue.runner import build_workload, generate

    data = {"engine": {"scheduler": "sarathi", "token_budget": 1, "batch_time": dict(CONSTANT, noise={"cv": 0.5})},
            "workload": {"prompt": {"dist": "fixed", "value": 1}, "output": {"dist": "fixed", "value": 1},
                         "load": 0.5},
            "cluster": {"replicas": 3}, "run": {"horizon_s": 5.0}}
    built = []

    def spy(config, scheduler=None, stream=0):
        built.append(build_engine(config, scheduler, stream))
        return built[-1]

    monkeypatch.setattr("llmqueue.runner.build_engine", spy)
    cfg = parse_cluster(data)
    base = cfg.replicas[0].config
    workload = build_workload(base)
    sim.simulate_pool(cfg, generate(base, workload))
    assert len(built) == 3
    draws = [_factors(e.batch_time.fresh(0, e.batch_time.stream), 20) for e in built]
    assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])


@pytest.mark.slow
@pytest.mark.parametrize("cv", [0.0, 0.5, 1.0])
def test_one_request_at_a_time_is_pollaczek_khinchine(cv):
    """Budget 1, one prompt token and one output token: each request is two batches of 10 ms · ε, an
    M/G/1 queue whose service has c² = cv² / 2; the mean time in system follows Pollaczek–Khinchine."""
    load = 0.7
    means = [run_config(_config(None if cv == 0 else {"cv": cv}, seed=s, load=load, horizon=2000.0))
             .summary["e2e_s"]["mean"] for s in range(3)]
    want = mg1_sojourn(load, cv * cv / 2) * 0.02
    assert abs(np.mean(means) / want - 1) < 0.05, (np.mean(means), want)
