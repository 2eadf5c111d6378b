"""KV-cache memory at the engines of a network (docs/network.md, "KV-cache memory"; issue 21, 7a).

Checks: without kv_blocks nothing changes (the compiled core still runs); a cache that never binds
gives the same run as no cache under every per-engine policy; a binding cache on a multi-hop
network with growing prompts preempts, conserves tokens, finishes or reports every job and keeps
the engines' invariants (LLMQUEUE_CHECKS) under fcfs, priority and max-pressure; the reserve
policy never preempts; bad input is one ConfigError naming engines[i]; the memory bounds of
``network capacity`` match the single engine's where they must.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import llmqueue.core.engine as engine_module
from llmqueue.analysis.memory import block_iterations, memory_analysis, token_iterations
from llmqueue.cli import main
from llmqueue.errors import ConfigError
from llmqueue.network import analyze_network, engine_memory, parse_network, simulate_network, summarize_network
from llmqueue.network.model import apply_override

STAIRCASE = '{ model = "staircase", c_ms = 11.28, a_ms = 35.47, b0 = 128 }'
# Two classes, two engines, prompts that grow with the previous output: agent plans on A, acts on B,
# reviews on A; chat is one visit to B.
NETWORK = f"""
[[engines]]
name = "A"
scheduler = "sarathi"
token_budget = 256
batch_time = {STAIRCASE}
kv_blocks = 40

[[engines]]
name = "B"
scheduler = "sarathi"
token_budget = 256
batch_time = {STAIRCASE}
kv_blocks = 40

[[classes]]
name = "agent"
rate = 1.0
add_previous_output = true

[[classes.hops]]
id = "plan"
engine = "A"
prompt = {{ dist = "poisson", mean = 100 }}
output = {{ dist = "poisson", mean = 60 }}

[[classes.hops]]
id = "act"
engine = "B"
prompt = {{ dist = "poisson", mean = 40 }}
output = {{ dist = "poisson", mean = 80 }}

[[classes.hops]]
id = "review"
engine = "A"
prompt = {{ dist = "poisson", mean = 20 }}
output = {{ dist = "poisson", mean = 30 }}

[[classes]]
name = "chat"
rate = 1.0

[[classes.hops]]
engine = "B"
prompt = {{ dist = "poisson", mean = 80 }}
output = {{ dist = "poisson", mean = 60 }}

[run]
horizon_s = 30.0
drain = true
"""


def _net(*sets: str, text: str = NETWORK):
    import tomllib

    data = tomllib.loads(text)
    for item in sets:
        apply_override(data, item)
    return parse_network(data)


@pytest.fixture
def checks(monkeypatch):
    """LLMQUEUE_CHECKS=1 for engines built in this test (the flag is read when engine.py is imported)."""
    monkeypatch.setenv("LLMQUEUE_CHECKS", "1")
    monkeypatch.setattr(engine_module, "CHECKS", True)


def _policy(policy: str) -> list[str]:
    return [f"engines.{e}.policy={policy}" for e in "AB"] + [f'engines.{e}.class_priority=["chat", "agent"]'
                                                              for e in "AB"]


def _same_run(a, b) -> None:
    for j in range(len(a.batches)):
        for key in ("start_time", "end_time", "num_prefill_tokens", "num_decode_tokens", "num_requests"):
            assert np.array_equal(a.batches[j][key], b.batches[j][key]), (j, key)
    for key in ("first_token_time", "finish_time", "job_exit_time"):
        assert np.array_equal(getattr(a, key), getattr(b, key), equal_nan=True), key
    assert np.array_equal(a.sub_engine, b.sub_engine) and np.array_equal(a.rejected, b.rejected)


def _conserved(result) -> None:
    """Every token computed is a visit's prompt or output, or one computed again after a preemption;
    drained, every job left or was rejected, and every visit not rejected finished."""
    computed = sum(int((b["num_prefill_tokens"] + b["num_decode_tokens"]).sum()) for b in result.batches)
    served = ~result.rejected
    work = int((result.num_prompt_tokens[served] + result.num_output_tokens[served]).sum())
    recomputed = sum(int(k.batch_recomputed.sum()) for k in result.kv if k is not None)
    assert computed == work + recomputed
    assert sum(int(k.recomputed.sum()) for k in result.kv if k is not None) == recomputed
    assert np.all(~np.isnan(result.finish_time[served]))
    assert np.all(~np.isnan(result.job_exit_time) | result.job_rejected)
    for j, k in enumerate(result.kv):
        if k is not None:
            assert k.batch_blocks.max() <= k.blocks - 1
            assert len(k.batch_blocks) == len(result.batches[j]["end_time"])


def test_unset_changes_nothing():
    net = _net(text=NETWORK.replace("kv_blocks = 40\n", ""))
    assert all(e.kv is None for e in net.engines)
    fast = simulate_network(net, horizon_s=20.0, drain=False)
    ref = simulate_network(net, horizon_s=20.0, drain=False, method="reference")
    assert fast.meta["method"] == "fast" and ref.kv == [] and fast.kv == []
    _same_run(fast, ref)
    s = summarize_network(ref)
    assert "kv" not in s["network"] and all("kv" not in e for e in s["engines"])


@pytest.mark.parametrize("policy", ["fcfs", "priority", "max-pressure"])
def test_cache_that_never_binds_changes_nothing(policy):
    sets = _policy(policy)
    off = _net(*sets, text=NETWORK.replace("kv_blocks = 40\n", ""))
    on = _net(*sets, "engines.A.kv_blocks=10000000", "engines.B.kv_blocks=10000000")
    a = simulate_network(off, horizon_s=20.0, drain=False, method="reference")
    b = simulate_network(on, horizon_s=20.0, drain=False)
    assert b.meta["method"].startswith("reference (KV memory: network runs with kv_blocks use the reference loop")
    _same_run(a, b)
    assert all(k.preemptions.sum() == 0 and k.memory_limited == 0 for k in b.kv)
    assert sum(e.violations for e in a.engines) == sum(e.violations for e in b.engines)


@pytest.mark.parametrize("policy", ["fcfs", "priority", "max-pressure"])
def test_binding_cache_preempts_and_conserves_tokens(policy, checks):
    sets = _policy(policy)
    result = simulate_network(_net(*sets))
    assert all(e.checks for e in result.engines)
    _conserved(result)
    s = summarize_network(result)
    kv = [e["kv"] for e in s["engines"]]
    assert sum(k["preemptions"] for k in kv) > 0 and sum(k["recomputed_tokens"] for k in kv) > 0
    assert all(k["memory_limited_batches"] > 0 and 0 < k["mean_utilisation"] <= 1 for k in kv)
    assert s["network"]["kv"]["preemptions"] == sum(k["preemptions"] for k in kv)
    assert s["network"]["jobs_completed"] == s["network"]["jobs_arrived"] > 20
    assert s["network"]["work_conserving_violations"] == 0


def test_reserve_never_preempts(checks):
    result = simulate_network(_net("engines.A.kv_policy=reserve", "engines.B.kv_policy=reserve",
                                   "engines.B.policy=priority", 'engines.B.class_priority=["chat"]'))
    _conserved(result)
    for k in result.kv:
        assert k.policy == "reserve" and k.preemptions.sum() == 0 and k.batch_recomputed.sum() == 0
        assert k.memory_limited > 0


def test_visits_larger_than_the_cache_are_rejected_and_reported(checks):
    # a review visit (20 + the act output + 30 tokens) can exceed 7 blocks of 32 tokens; its mean (200.5) does not
    net = _net("engines.A.kv_blocks=8", "engines.A.block_size=32",
               'classes.agent.hops.act.output={dist = "uniform", low = 1, high = 300}')
    result = simulate_network(net)
    _conserved(result)
    s = summarize_network(result)
    agent = s["classes"][0]
    assert s["engines"][0]["kv"]["rejected_larger_than_cache"] == s["engines"][0]["rejected"] > 0
    assert agent["rejected"] == s["engines"][0]["rejected"]
    assert agent["completed"] + agent["rejected"] == agent["arrived"]


@pytest.mark.parametrize("sets,field", [
    (["engines.A.kv_blocks=0"], "engines[0].kv_blocks"),
    (["engines.B.kv_blocks=-4"], "engines[1].kv_blocks"),
    (["engines.B.kv_blocks=1"], "engines[1].kv_blocks"),
    (["engines.B.kv_blocks=2.5"], "engines[1].kv_blocks"),
    (["engines.A.block_size=0"], "engines[0].block_size"),
    (["engines.A.block_size=100000"], "engines[0].block_size"),
    (["engines.B.kv_policy=lru"], "engines[1].kv_policy"),
])
def test_bad_input_names_the_engine(sets, field):
    with pytest.raises(ConfigError) as err:
        _net(*sets)
    assert err.value.field == field and "engine." not in str(err.value)


def test_block_size_without_kv_blocks():
    with pytest.raises(ConfigError) as err:
        _net("engines.B.block_size=32", text=NETWORK.replace("kv_blocks = 40\n", ""))
    assert err.value.field == "engines[1].block_size" and "engines[1].kv_blocks" in str(err.value)


def test_cache_smaller_than_a_visit():
    net = _net("engines.B.kv_blocks=8")   # 7 x 16 = 112 tokens; act visits 40 + 60 + 80 = 180
    with pytest.raises(ConfigError) as err:
        simulate_network(net)
    assert err.value.field == "engines[1].kv_blocks"
    assert "'act'" in str(err.value) and "at least 13 blocks" in str(err.value)


ONE_ENGINE = f"""
[[engines]]
name = "E"
token_budget = 512
batch_time = {STAIRCASE}
kv_blocks = 300

[[classes]]
name = "c"
rate = 2.5

[[classes.hops]]
engine = "E"
prompt = {{ dist = "uniform", low = 50, high = 200 }}
output = {{ dist = "uniform", low = 1, high = 150 }}
"""


def test_memory_bounds_of_one_engine_are_the_single_engines():
    from llmqueue.model.workload import make_length

    net = _net(text=ONE_ENGINE)
    m = engine_memory(net, analyze_network(net))[0]
    prompt = make_length({"dist": "uniform", "low": 50, "high": 200}, field="p", minimum=1)
    output = make_length({"dist": "uniform", "low": 1, "high": 150}, field="o", minimum=0)
    single = memory_analysis(net.engines[0].batch_time, 512, 300, (prompt, output), arrival_rate=2.5)
    assert m["work_blocks_exact"] and m["work_blocks"] == pytest.approx(single.work_blocks)
    assert m["work_tokens"] == pytest.approx(single.work_tokens)
    assert m["memory_necessary_blocks_visits_per_s"] == pytest.approx(single.memory_necessary_blocks_rps)
    assert m["memory_necessary_visits_per_s"] == pytest.approx(single.memory_necessary_rps)
    assert m["memory_sufficient_isolated_visits_per_s"] == pytest.approx(single.memory_sufficient_blocks_rps)
    assert m["memory_rho"] == pytest.approx(single.memory_rho)
    assert m["token_bound_visits_per_s"] == pytest.approx(single.token_bound_rps)


def test_memory_bounds_with_growing_prompts():
    from llmqueue.network.analysis import _visits_of
    from llmqueue.network.sim import generate_jobs

    net = _net()
    mem = engine_memory(net, analyze_network(net), samples=3000)
    jobs = generate_jobs(net, 1, 2000.0)   # other jobs than the estimate's (seed 0)
    for j, m in enumerate(mem):
        assert not m["work_blocks_exact"] and m["work_blocks_se"] is not None
        assert m["sufficient_reason"].startswith("not computed")
        # E[w] exact from the traffic equations, E[w_B] estimated: against sampled visits
        hops = {h.index for c in net.classes for h in c.hops if h.engine == j}
        visits = []
        for stream in jobs:
            out = {h: [] for h in hops}
            for _, segment, _ in stream:
                _visits_of(segment, j, hops, out)
            visits += [v for rows in out.values() for v in rows]
        l, o = np.array(visits).T
        assert token_iterations(l, o).mean() == pytest.approx(m["work_tokens"], rel=0.02)
        assert block_iterations(l, o, 16).mean() == pytest.approx(m["work_blocks"], rel=0.02)
        assert m["work_tokens"] / 16 <= m["work_blocks"] <= m["work_tokens"] / 16 + m["mean_visit_tokens"]
        assert m["visit_rate"] == pytest.approx(sum(h["visit_rate"] for h in m["hops"]))
    assert math.isclose(mem[1]["hops"][1]["work_tokens"], 80 * 60 + (60 + 60 + 60**2) / 2)  # chat: exact, no growth


def test_cli_prints_memory(capsys, tmp_path):
    path = tmp_path / "net.toml"
    path.write_text(NETWORK)
    assert main(["network", "capacity", str(path)]) == 0
    out = capsys.readouterr().out
    assert "KV-cache memory per engine" in out and "λ_mem visits/s" in out and "est." in out
    assert main(["network", "capacity", str(path), "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert [m["engine"] for m in memory] == ["A", "B"]
    assert main(["network", "simulate", str(path), "--set", "run.horizon_s=10"]) == 0
    out = capsys.readouterr().out
    assert "KV-cache memory (reference loop" in out and "preemptions (visits)" in out


def test_unknown_engine_key_lists_every_key_an_engine_takes(capsys):
    from llmqueue.cli import main

    assert main(["simulate", "fork-join", "--set", "engines.0.foo=1"]) == 2
    err = capsys.readouterr().err
    assert "engines[0].foo = 1 is not allowed" in err and "kv_blocks" in err and "token_budget" in err


def test_the_shipped_kv_example_runs(capsys):
    from pathlib import Path

    from llmqueue.cli import main

    example = Path(__file__).resolve().parents[1] / "examples" / "network_kv.toml"
    assert main(["network", "capacity", str(example)]) == 0
    assert "kv" in capsys.readouterr().out.lower()
