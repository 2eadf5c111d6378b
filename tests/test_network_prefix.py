"""Full agent context and prefix caching in networks (docs/network.md, "Prefix caching in networks";
issue 21, item 6).

Checks: without the new keys nothing changes; ``add_previous_context`` gives the prompts the traffic
equations say (mean tokens per visit and per engine, loops and forks), on both loops; with
``prefix_caching`` a visit finds the previous visit's blocks cached (exact hit tokens when memory
does not bind), the backlogs leave found tokens out, the engines' and groups' invariants hold under
fcfs, priority and max-pressure with binding memory; ``network capacity`` gives the load with every
context block cached and the simulation respects it; bad input is one ConfigError naming the field.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

import llmqueue.core.engine as engine_module
from llmqueue.cli import main
from llmqueue.errors import ConfigError
from llmqueue.network import (
    analyze_network,
    engine_prefix,
    parse_network,
    prefix_scaling,
    simulate_network,
    summarize_network,
)
from llmqueue.network.sim import generate_jobs

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "network_prefix.toml"
STAIRCASE = {"model": "staircase", "c_ms": 11.28, "a_ms": 35.47, "b0": 128}


def agent(prefix: bool = False, kv_blocks: int | None = 4000, rate: float = 0.3, policy: str = "fcfs",
          context: bool = True) -> dict:
    """An agent loop that re-sends its context (task -> tool -> think, looped -> answer) and chat."""
    engine = {"name": "llm", "scheduler": "sarathi", "token_budget": 512, "batch_time": dict(STAIRCASE),
              "policy": policy}
    if policy == "priority":
        engine["class_priority"] = ["chat", "agent"]
    if kv_blocks is not None:
        engine["kv_blocks"] = kv_blocks
        if prefix:
            engine["prefix_caching"] = True
    return {
        "engines": [engine],
        "delays": [{"name": "tool", "dist": "exponential", "mean_s": 1.0}],
        "classes": [
            {"name": "agent", "rate": rate, "hops": [
                {"id": "task", "engine": "llm", "prompt": {"dist": "poisson", "mean": 200},
                 "output": {"dist": "poisson", "mean": 30}},
                {"id": "tool", "delay": "tool"},
                {"id": "think", "engine": "llm", "add_previous_context": context,
                 "prompt": {"dist": "poisson", "mean": 60}, "output": {"dist": "poisson", "mean": 30}},
                {"id": "tool2", "delay": "tool", "loop": "think", "continue_p": 0.6, "max_rounds": 6},
                {"id": "answer", "engine": "llm", "add_previous_context": context,
                 "prompt": {"dist": "poisson", "mean": 20}, "output": {"dist": "poisson", "mean": 80}},
            ]},
            {"name": "chat", "rate": 2 * rate, "hops": [
                {"engine": "llm", "prompt": {"dist": "poisson", "mean": 129},
                 "output": {"dist": "poisson", "mean": 112}}]},
        ],
        "run": {"horizon_s": 300.0, "seed": 1},
    }


def fork_join(prefix: bool = False) -> dict:
    """Plan on P, three workers on W and one on P (all with the plan's context), summarise on P."""
    def eng(name):
        e = {"name": name, "scheduler": "sarathi", "token_budget": 512, "batch_time": dict(STAIRCASE)}
        if prefix:
            e.update(kv_blocks=2000, prefix_caching=True)
        return e
    return {
        "engines": [eng("P"), eng("W")],
        "classes": [{"name": "task", "rate": 0.5, "add_previous_context": True, "hops": [
            {"id": "plan", "engine": "P", "prompt": {"dist": "poisson", "mean": 200},
             "output": {"dist": "poisson", "mean": 60}, "fork": ["work", "work", "work", "self"]},
            {"id": "work", "engine": "W", "prompt": {"dist": "poisson", "mean": 100},
             "output": {"dist": "poisson", "mean": 120}, "next": "summarise"},
            {"id": "self", "engine": "P", "prompt": {"dist": "poisson", "mean": 40},
             "output": {"dist": "poisson", "mean": 20}, "next": "summarise"},
            {"id": "summarise", "engine": "P", "join": True, "prompt": {"dist": "poisson", "mean": 50},
             "output": {"dist": "poisson", "mean": 100}},
        ]}],
        "run": {"horizon_s": 300.0, "seed": 0},
    }


@pytest.fixture
def checks(monkeypatch):
    """LLMQUEUE_CHECKS=1 for engines built in this test (the flag is read when engine.py is imported)."""
    monkeypatch.setenv("LLMQUEUE_CHECKS", "1")
    monkeypatch.setattr(engine_module, "CHECKS", True)


def _same(a, b) -> None:
    for key in ("sub_engine", "sub_hop", "arrival_time", "num_prompt_tokens", "num_output_tokens",
                "first_token_time", "finish_time", "job_exit_time", "job_tokens"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
    for x, y in zip(a.batches, b.batches, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ---- nothing changes without the new keys ---------------------------------------------------------

def test_unset_keys_change_nothing():
    base = agent(context=False)
    for hop in base["classes"][0]["hops"]:
        hop.pop("add_previous_context", None)
    explicit = copy.deepcopy(base)
    explicit["engines"][0]["prefix_caching"] = False
    explicit["classes"][0]["add_previous_context"] = False
    a = simulate_network(parse_network(base), method="reference")
    b = simulate_network(parse_network(explicit), method="reference")
    _same(a, b)
    assert a.kv[0].hit_tokens is None and "prefix_caching" not in summarize_network(a)["engines"][0]["kv"]
    no_kv = copy.deepcopy(base)
    del no_kv["engines"][0]["kv_blocks"]
    fast = simulate_network(parse_network(no_kv))
    assert fast.meta["method"] == "fast"


def test_context_without_prefix_runs_on_the_compiled_core_with_the_same_jobs():
    data = agent(kv_blocks=None)
    fast = simulate_network(parse_network(data))
    ref = simulate_network(parse_network(data), method="reference")
    assert fast.meta["method"] == "fast"
    _same(fast, ref)


# ---- add_previous_context: sampling and the traffic equations -------------------------------------

def _hop_prompts(net, k: int, jobs: int, seed: int = 0) -> np.ndarray:
    route = net.routes[k]
    _, seq = np.random.SeedSequence([seed, k]).spawn(2)
    streams = route.streams(seq)
    sums = np.zeros((jobs, len(route.hops)))

    def walk(seg, row):
        for v in seg.visits:
            sums[row, v.hop.index] += v.num_prompt_tokens
        for b in seg.branches:
            walk(b, row)
        if seg.join is not None:
            walk(seg.join, row)

    for i in range(jobs):
        seg, _ = route.sample(streams)
        walk(seg, i)
    return sums


@pytest.mark.parametrize("make", [agent, fork_join])
def test_traffic_equations_give_the_sampled_context(make):
    net = parse_network(make())
    a = analyze_network(net)
    sums = _hop_prompts(net, 0, 6000)
    mean, se = sums.mean(axis=0), sums.std(axis=0, ddof=1) / np.sqrt(len(sums))
    expected = a.classes[0].prompt_tokens
    assert np.all(np.abs(mean - expected) <= 4 * se + 1e-9), (mean, expected, se)
    assert a.classes[0].context_tokens is not None and a.classes[0].context_tokens.max() > 0


def test_context_rules_by_hand():
    """Deterministic lengths: the context is the previous visit's prompt + output; after a join the
    branches' contexts one after another; the equations give the same numbers."""
    data = fork_join()
    for hop in data["classes"][0]["hops"]:
        for key in ("prompt", "output"):
            hop[key] = {"dist": "fixed", "value": int(hop[key]["mean"])}
    net = parse_network(data)
    seg, total = net.routes[0].sample(net.routes[0].streams(np.random.SeedSequence(0)))
    assert [v.num_prompt_tokens for v in seg.visits] == [200]            # the first visit: no context yet
    assert [b.visits[0].num_prompt_tokens for b in seg.branches] == [360, 360, 360, 300]   # 260 + own
    # join: 3 x (360 + 120) + (300 + 20) = 1760 of context, + its own 50
    assert seg.join.visits[0].num_prompt_tokens == 1810
    a = analyze_network(net)
    np.testing.assert_allclose(a.classes[0].prompt_tokens, [200, 3 * 360, 300, 1810])
    assert total == 260 + 3 * 480 + 320 + 1910
    np.testing.assert_allclose(a.tokens_per_job.sum(), total)


def test_simulated_tokens_match_the_equations():
    net = parse_network({**agent(kv_blocks=None), "run": {"horizon_s": 2000.0, "seed": 2}})
    r = simulate_network(net)
    a = r.analysis
    for k in range(2):
        tokens = r.job_tokens[r.job_class == k]
        expected = a.tokens_per_job[k].sum()
        se = tokens.std(ddof=1) / np.sqrt(len(tokens))
        assert abs(tokens.mean() - expected) <= 4 * se, (k, tokens.mean(), expected)
    s = summarize_network(r)
    c = s["classes"][0]
    assert c["expected_tokens_per_job"] == pytest.approx(a.tokens_per_job[0].sum())


# ---- prefix caching: the next visit finds the previous one ---------------------------------------

def _chain(prefix=True, blocks=20000):
    e = {"name": "llm", "scheduler": "sarathi", "token_budget": 512, "batch_time": dict(STAIRCASE)}
    if blocks:
        e["kv_blocks"] = blocks
        e["prefix_caching"] = prefix
    fixed = lambda n: {"dist": "fixed", "value": n}
    return {"engines": [e], "delays": [{"name": "tool", "dist": "fixed", "value_s": 0.5}],
            "classes": [{"name": "a", "rate": 0.5, "arrival": "deterministic", "hops": [
                {"id": "h1", "engine": "llm", "prompt": fixed(100), "output": fixed(20)},
                {"id": "t", "delay": "tool"},
                {"id": "h2", "engine": "llm", "prompt": fixed(10), "output": fixed(5), "add_previous_context": True},
                {"id": "h3", "engine": "llm", "prompt": fixed(7), "output": fixed(3), "add_previous_context": True},
            ]}], "run": {"horizon_s": 100.0, "seed": 0}}


def test_next_visit_hits_the_previous_visits_blocks(checks):
    r = simulate_network(parse_network(_chain()))
    assert r.meta["method"].startswith("reference (prefix caching")
    kv = r.kv[0]
    hop = r.sub_hop[r.sub_engine == 0]
    # h2's prompt 130 starts with h1's 120 tokens: 7 full blocks of 16; h3's 142 with h2's 135: 8 blocks
    assert set(kv.first_hit_tokens[hop == 0]) == {0}
    assert set(kv.first_hit_tokens[hop == 2]) == {112}
    assert set(kv.first_hit_tokens[hop == 3]) == {128}
    s = summarize_network(r)
    p = s["engines"][0]["kv"]["prefix_caching"]
    visits = int((hop == 2).sum())
    assert p["hits"] == visits * (112 + 128) and p["evictions"] == 0
    assert s["network"]["kv"]["prefix_caching"]["hits"] == p["hits"]
    # the backlog leaves the found tokens out: everything done at the end is no backlog
    assert s["engines"][0]["peak_backlog_tokens"] >= 0
    done = r.total_result()
    work = r.job_tokens - np.bincount(r.sub_job, kv.first_hit_tokens, minlength=len(r.job_tokens)).astype(np.int64)
    np.testing.assert_array_equal(done.num_prompt_tokens, work)
    finished = r.job_exit_time <= r.end_time
    batches = sum(int(b["num_prefill_tokens"].sum() + b["num_decode_tokens"].sum()) for b in r.batches)
    in_flight = int(work[~finished].sum())
    assert batches <= int(work.sum()) and batches >= int(work[finished].sum())
    assert in_flight >= 0
    # without caching the same jobs compute every token
    plain = simulate_network(parse_network(_chain(prefix=False)), method="reference")
    np.testing.assert_array_equal(plain.num_prompt_tokens, r.num_prompt_tokens)
    assert plain.kv[0].hit_tokens is None


def test_other_engine_between_visits_is_no_hit(checks):
    """A context whose previous visit ran at another engine hits only what this engine computed."""
    data = _chain()
    data["engines"].append({**data["engines"][0], "name": "other"})
    data["classes"][0]["hops"][2]["engine"] = "other"     # h2 elsewhere: h3 at llm starts with h2's sequence
    r = simulate_network(parse_network(data))
    first = r.kv[0].first_hit_tokens
    hop = r.sub_hop[r.sub_engine == 0]
    # h3's prompt starts with h2's 135 tokens, whose first 120 are h1's, computed here: 7 blocks
    assert set(first[hop == 3]) == {112}
    assert set(r.kv[1].first_hit_tokens) == {0}


@pytest.mark.parametrize("policy", ["fcfs", "priority", "max-pressure"])
def test_invariants_with_binding_memory(checks, policy):
    data = agent(prefix=True, kv_blocks=150, rate=0.5, policy=policy)
    data["run"]["horizon_s"] = 80.0
    r = simulate_network(parse_network(data))
    s = summarize_network(r)
    kv = s["engines"][0]["kv"]
    p = kv["prefix_caching"]
    assert p["hits"] > 0 and p["evictions"] > 0 and kv["preemptions"] > 0
    assert kv["peak_blocks"] <= 149
    done = r.finish_time <= r.end_time
    assert np.all(r.kv[0].first_hit_tokens <= r.num_prompt_tokens - 1)
    assert done.sum() > 0


def test_fork_join_branches_share_the_plan(checks):
    data = fork_join(prefix=True)
    data["run"]["horizon_s"] = 60.0
    r = simulate_network(parse_network(data))
    assert r.engines[0].preemptions == 0
    first = r.kv[0].first_hit_tokens
    hop = r.sub_hop[r.sub_engine == 0]
    prompt = r.num_prompt_tokens[r.sub_engine == 0]
    # the branch on P starts with the plan's whole sequence: its full blocks are found
    plan = r.num_prompt_tokens[(r.sub_engine == 0) & (r.sub_hop == 0)]
    assert np.all(first[hop == 2] > 0) and np.all(first[hop == 2] <= prompt[hop == 2] - 1)
    assert first[hop == 2].mean() > 0.8 * (plan.mean() + 60)
    # the summary starts with the first branch's context, a W visit whose prompt starts with the plan's
    # sequence: the plan's full blocks (computed on P) are found, W's own tokens are not on P
    on_p = r.sub_engine == 0
    job = r.sub_job[on_p]
    seq = (r.num_prompt_tokens + r.num_output_tokens)[on_p]
    plan_seq = dict(zip(job[hop == 0].tolist(), seq[hop == 0].tolist()))
    summarised = [(j, f) for j, f in zip(job[hop == 3].tolist(), first[hop == 3].tolist())]
    assert summarised and all(f == 16 * (plan_seq[j] // 16) for j, f in summarised)


def test_priority_and_max_pressure_match_fcfs_when_one_group():
    """With one class and one hop per group order the grouped policies plan as the plain scheduler."""
    data = _chain()
    base = simulate_network(parse_network(data))
    for policy in ("priority", "max-pressure"):
        other = copy.deepcopy(data)
        other["engines"][0]["policy"] = policy
        other["engines"][0]["class_priority"] = ["a"]
        r = simulate_network(parse_network(other))
        np.testing.assert_array_equal(r.kv[0].first_hit_tokens, base.kv[0].first_hit_tokens)
        assert r.engines[0].violations == 0


# ---- capacity ------------------------------------------------------------------------------------

def test_capacity_with_every_context_block_cached():
    net = parse_network(agent(prefix=True, rate=0.6))
    a = analyze_network(net)
    p = engine_prefix(net, a)[0]
    ctx = sum(a.rates[0] * a.classes[0].context_tokens[h] for h in (2, 4))
    assert p["context_tokens_per_s"] == pytest.approx(ctx)
    assert p["min_offered_tokens_per_s"] == pytest.approx(a.offered_tokens_per_s[0] - ctx)
    assert prefix_scaling(a, engine_prefix(net, a)) == pytest.approx(p["prefix_scaling"])
    assert p["prefix_scaling"] > a.max_scaling
    # the simulation computes at least the bound's tokens (every hit is inside a context)
    r = simulate_network(net)
    s = summarize_network(r)
    computed = s["engines"][0]["token_throughput"]
    assert computed >= 0.95 * p["min_offered_tokens_per_s"]
    assert int(r.kv[0].first_hit_tokens.sum()) > 0
    assert engine_prefix(parse_network(agent()), analyze_network(parse_network(agent()))) == [None]


def test_cli(capsys):
    path = str(EXAMPLE)
    assert main(["network", "capacity", path]) == 0
    out = capsys.readouterr().out
    assert "Prefix caching per engine" in out and "all cached" in out
    assert main(["network", "capacity", path, "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["prefix"][0]["engine"] == "llm" and js["memory"] == [None] and js["prefix_scaling"] > js["max_scaling"]
    assert main(["network", "simulate", path, "--set", "run.horizon_s=40"]) == 0
    out = capsys.readouterr().out
    assert "Prefix caching (first admissions" in out and "hit rate" in out
    assert main(["network", "capacity", path, "--set", "engines.llm.prefix_caching=false"]) == 0
    assert "Prefix caching per engine" not in capsys.readouterr().out


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("change, field, match", [
    (lambda d: d["engines"][0].pop("kv_blocks"), "engines[0].prefix_caching", "kv_blocks"),
    (lambda d: d["engines"][0].update(kv_policy="reserve"), "engines[0].prefix_caching", "recompute"),
    (lambda d: d["engines"][0].update(prefix_caching="yes"), "engines[0].prefix_caching", "true or false"),
    (lambda d: d["classes"][0]["hops"][1].update(add_previous_context=True), "classes[0].hops[1].add_previous_context",
     "delay hop"),
    (lambda d: d["classes"][0]["hops"][2].update(add_previous_output=True), "classes[0].hops[2].add_previous_context",
     "add_previous_output"),
    (lambda d: d["classes"][0]["hops"][2].update(add_previous_context=1), "classes[0].hops[2].add_previous_context",
     "true or false"),
    (lambda d: d["classes"][0].update(add_previous_context="x"), "classes[0].add_previous_context", "true or false"),
])
def test_bad_input(change, field, match):
    data = agent(prefix=True)
    change(data)
    with pytest.raises(ConfigError, match=match) as err:
        parse_network(data)
    assert err.value.field == field


def test_jobs_are_the_same_with_and_without_caching():
    a = generate_jobs(parse_network(agent(prefix=True)), 3, 100.0)
    b = generate_jobs(parse_network(agent(kv_blocks=None)), 3, 100.0)
    assert [t for t, _, _ in a[0]] == [t for t, _, _ in b[0]]
    assert [n for _, _, n in a[0]] == [n for _, _, n in b[0]]
