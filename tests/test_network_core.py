"""Networks on the compiled core against the reference loop: identical runs (paper §5).

The reference (network/sim.py: its event loop over Engine.step, the policies of
network/policies.py on Request objects) and the compiled core (network/fast.py, _fastcore.c
run_network) run the same sampled jobs.  Every built-in network, with random schedulers, class
policies (fcfs, priority in a random class order, max-pressure), budgets, request caps, loads,
seeds and horizons per engine, must give the same sub-requests (ids, times, tokens, rejections),
the same jobs and the same batches, exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmqueue.core import fastcore
from llmqueue.errors import ConfigError
from llmqueue.network import fast, load_network
from llmqueue.network.analysis import analyze_network
from llmqueue.network.sim import _Simulation, generate_jobs, simulate_network
from llmqueue.schedulers import SCHEDULERS

SCENARIOS = ("rybko-stolyar", "rybko-stolyar-reverse", "fork-join", "dag", "agent-loop", "tandem")
ARRAYS = ("sub_engine", "sub_class", "sub_hop", "sub_job", "arrival_time", "num_prompt_tokens", "num_output_tokens",
          "first_token_time", "finish_time", "rejected", "job_class", "job_entry_time", "job_exit_time", "job_tokens",
          "job_rejected")
needs_core = pytest.mark.skipif(fastcore.unavailable() is not None, reason=f"{fastcore.unavailable()}")


@st.composite
def networks(draw):
    scenario = draw(st.sampled_from(SCENARIOS))
    net = load_network(scenario)
    classes = [c.name for c in net.classes]
    sets = [f"run.horizon_s={draw(st.sampled_from([15.0, 40.0, 90.0]))}", f"run.seed={draw(st.integers(0, 99))}",
            f"network.load={draw(st.sampled_from([0.5, 0.9, 1.3]))}"]
    for engine in net.engines:
        name = draw(st.sampled_from(sorted(SCHEDULERS)))
        policy = "fcfs" if name == "maxweight" else draw(st.sampled_from(["fcfs", "priority", "max-pressure"]))
        sets += [f"engines.{engine.name}.scheduler={name}", f"engines.{engine.name}.policy={policy}"]
        if policy == "priority":
            order = draw(st.permutations(classes))[:draw(st.integers(1, len(classes)))]
            sets.append(f"engines.{engine.name}.class_priority={json.dumps(order)}")
        budget = draw(st.sampled_from([None, 48, 256, 1024]))
        if budget is not None:
            sets.append(f"engines.{engine.name}.token_budget={budget}")
        cap = draw(st.none() | st.integers(1, 30))
        if cap is not None:
            sets.append(f"engines.{engine.name}.max_batch_requests={cap}")
        if "split_prompts" in SCHEDULERS[name].options and draw(st.booleans()):
            sets.append(f"engines.{engine.name}.split_prompts=true")
    return scenario, sets


def assert_same_network(ref, fast) -> None:
    for name in ARRAYS:
        a, b = getattr(ref, name), getattr(fast, name)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True), name
    assert len(ref.batches) == len(fast.batches)
    for j, (x, y) in enumerate(zip(ref.batches, fast.batches, strict=True)):
        assert x.keys() == y.keys()
        for key in x:
            assert np.array_equal(x[key], y[key]), (j, key)
    assert [e.violations for e in ref.engines] == [e.violations for e in fast.engines]
    assert [e.num_in_engine for e in ref.engines] == [e.num_in_engine for e in fast.engines]
    assert ref.end_time == fast.end_time


def check(scenario: str, sets: list[str]) -> None:
    net = load_network(scenario, sets)
    jobs = generate_jobs(net, net.seed, net.horizon_s)
    ref = simulate_network(net, jobs=jobs, method="reference")
    fast = simulate_network(net, jobs=jobs)
    assert ref.meta["method"] == "reference (selected)" and fast.meta["method"] == "fast", fast.meta
    assert_same_network(ref, fast)


@needs_core
@pytest.mark.filterwarnings("ignore::llmqueue.model.batch_time.AssumptionWarning")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_compiled_network_equals_reference(case):
    check(*case)


@needs_core
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::llmqueue.model.batch_time.AssumptionWarning")
@settings(max_examples=2_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_compiled_network_equals_reference_many(case):
    check(*case)


@needs_core
def test_drain_and_progress_match():
    net = load_network("dag", ["run.horizon_s=60"])
    ticks: dict[str, list[float]] = {"fast": [], "reference": []}
    runs = {m: simulate_network(net, drain=True, method=m, progress=ticks[m].append) for m in ("fast", "reference")}
    assert_same_network(runs["reference"], runs["fast"])
    assert not np.isnan(runs["fast"].job_exit_time).any()  # drained: every job left
    assert ticks["fast"] and ticks["reference"]


def test_maxweight_under_a_class_policy_is_refused_before_the_run():
    with pytest.raises(ConfigError, match=r"engines\[0\]\.scheduler = 'maxweight'.*load rule"):
        simulate_network(load_network("rybko-stolyar", ["engines.S1.scheduler=maxweight"]))


def test_method_is_checked_and_reported():
    net = load_network("tandem", ["run.horizon_s=10"])
    with pytest.raises(ConfigError, match="run.method"):
        simulate_network(net, method="quick")
    assert simulate_network(net, method="reference").meta["method"] == "reference (selected)"


@needs_core
@pytest.mark.parametrize("ahead", [fast.AHEAD, 0.0], ids=["ahead", "refill"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_compiled_sampler_draws_the_python_jobs(scenario, ahead, monkeypatch):
    # The compiled sampler walks each route's table on the same streams as Route.sample (drawn
    # ahead in its chunks of 1024; with ahead = 0 every stream runs out and is drawn again).
    monkeypatch.setattr(fast, "AHEAD", ahead)
    for seed, horizon in ((0, 200.0), (7, 35.0)):
        net = load_network(scenario, ["engines.S1.policy=max-pressure"] if scenario.startswith("rybko") else [])
        sim = _Simulation(net, analyze_network(net))
        groups = fast.groups_of(sim.engines)
        python = fast.Flat.from_jobs(generate_jobs(net, seed, horizon), sim.buffer, groups)
        compiled = fast.sample(net, analyze_network(net), seed, horizon, sim.buffer, groups)
        for name in ("visits", "segments", "jobs"):
            for a, b in zip(getattr(python, name), getattr(compiled, name), strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b), (scenario, seed, name)
        for name in ("v_hop", "job_class", "job_tokens"):
            assert np.array_equal(getattr(python, name), getattr(compiled, name)), (scenario, seed, name)


@needs_core
def test_the_core_refuses_inconsistent_arrays():
    # network/fast.py builds the arrays; a mistake there is an exception, never a stray read.
    net = load_network("tandem", ["run.horizon_s=20"])
    sim = _Simulation(net, analyze_network(net))
    flat = fast.sample(net, analyze_network(net), 0, 20.0, sim.buffer, fast.groups_of(sim.engines))
    flat.segments = (flat.segments[0] + 10**9, *flat.segments[1:])   # visits past the end
    with pytest.raises(ValueError, match="inconsistent a segment"):
        fast.run(sim.engines, flat, len(sim.buffer), 20.0, None)
    table = net.routes[0].sampling_table()
    bad = (table[0] + 99, *table[1:])
    with pytest.raises(ValueError, match="inconsistent a state"):
        fastcore.core().sample_jobs(bad, tuple(np.zeros(3, np.int64) for _ in range(4)),
                                    (tuple(np.zeros(0, np.int64) for _ in range(3)),) * 2
                                    + (tuple(np.zeros(0) for _ in range(3)), np.zeros(0)), 1)
