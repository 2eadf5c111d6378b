"""Seeded stability checks of networks (paper §5.4): slow, run in CI with -m slow.

The numbers behind docs/network.md's tables (benchmarks/network_evidence.py regenerates them).
"""

from __future__ import annotations

import pytest

from llmqueue.network import load_network, run_network

pytestmark = pytest.mark.slow
SEEDS = (0, 1, 2)


def network(scenario: str, *sets: str) -> dict:
    return run_network(load_network(scenario, list(sets)))


@pytest.mark.parametrize("seed", SEEDS)
def test_rybko_stolyar_priority_to_the_leaving_class_diverges(seed):
    s = network("rybko-stolyar", f"run.seed={seed}", "run.horizon_s=6000")
    n = s["network"]
    assert n["verdict"] == "unstable"
    # fluid picture: while one engine starves, the work grows at ~ 2·608λ − (768 + 64λ) ≈ 540 tokens/s
    assert 300 < n["backlog_slope_tokens_per_s"] < 700
    assert n["peak_growth"] > 1.5 and n["peak_backlog_tokens"] > 2_000_000
    assert all(e["work_conserving_violations"] == 0 for e in s["engines"])   # work-conserving, yet unstable


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("variant, sets", [
    ("rybko-stolyar-reverse", ()),
    ("rybko-stolyar", ("engines.S1.policy=fcfs", "engines.S2.policy=fcfs")),
    ("rybko-stolyar", ("engines.S1.policy=max-pressure", "engines.S2.policy=max-pressure")),
])
def test_rybko_stolyar_reverse_fcfs_and_max_pressure_stay_bounded(variant, sets, seed):
    n = network(variant, *sets, f"run.seed={seed}", "run.horizon_s=6000")["network"]
    assert n["verdict"] == "stable" and n["peak_backlog_tokens"] < 150_000


@pytest.mark.parametrize("seed", SEEDS)
def test_rybko_stolyar_max_pressure_bounded_at_095(seed):
    n = network("rybko-stolyar", "engines.S1.policy=max-pressure", "engines.S2.policy=max-pressure",
                "network.load=0.95", f"run.seed={seed}", "run.horizon_s=6000")["network"]
    assert n["verdict"] == "stable" and n["peak_backlog_tokens"] < 150_000


def _on_every_engine(scenario: str, scheduler: str) -> list[str]:
    return [f"engines.{e.name}.scheduler={scheduler}" for e in load_network(scenario).engines]


@pytest.mark.parametrize("scheduler", ["sarathi", "orca"])
@pytest.mark.parametrize("scenario", ["dag", "tandem"])
def test_acyclic_networks_stable_below_and_unstable_above_capacity(scenario, scheduler):
    sets = _on_every_engine(scenario, scheduler)
    below = network(scenario, *sets, "network.load=0.9", "run.horizon_s=3000")
    assert below["network"]["predicted"] == "stable" and below["network"]["verdict"] != "unstable"
    assert all(e["verdict"] == "stable" for e in below["engines"])
    above = network(scenario, *sets, "network.load=1.1", "run.horizon_s=1200")
    assert above["network"]["verdict"] == "unstable"
    grows = {e["engine"] for e in above["engines"] if e["verdict"] == "unstable"}
    assert grows == {above["network"]["bottleneck"]}


def test_fork_join_sarathi_stable_at_09_unstable_at_11_at_the_bottleneck():
    below = network("fork-join", "run.horizon_s=3600")
    assert below["network"]["verdict"] == "stable" and all(e["verdict"] == "stable" for e in below["engines"])
    above = network("fork-join", "network.load=1.1", "run.horizon_s=1800")
    assert above["network"]["verdict"] == "unstable"
    assert [e["verdict"] for e in above["engines"] if e["engine"] == "W"] == ["unstable"]


def test_fork_join_orca_diverges_at_09_although_work_conserving():
    """The summariser revisits the planner's engine (cyclic between engines): Orca's prefill-first
    batches there starve the plans' decodes, the workers' engine idles, and the network diverges."""
    s = network("fork-join", *_on_every_engine("fork-join", "orca"), "run.horizon_s=3600")
    assert s["network"]["verdict"] == "unstable"
    w = next(e for e in s["engines"] if e["engine"] == "W")
    assert w["busy_fraction"] < 0.88 and w["work_conserving_violations"] == 0
