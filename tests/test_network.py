"""Networks of engines (paper §5): conservation, routes, the traffic equations, policies, the CLI.

The long seeded stability checks (Rybko–Stolyar table, fork-join/DAG at and above capacity)
are in test_network_stability.py (marked slow).
"""

from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest

from llmqueue.model.batch_time import make_batch_time
from llmqueue.cli import main
from llmqueue.core.engine import Engine
from llmqueue.errors import ConfigError
from llmqueue.network import (
    analyze_network,
    load_network,
    parse_network,
    run_network,
    simulate_network,
)
from llmqueue.network.routes import Segment, Visit
from llmqueue.network.sim import SubRequest, buffers_of, build_engines, generate_jobs
from llmqueue.schedulers import make_scheduler
from llmqueue.core.simulator import simulate
from llmqueue.model.workload import PoissonArrivals, Workload, make_length

LENGTHS = {"prompt": {"dist": "poisson", "mean": 129}, "output": {"dist": "poisson", "mean": 112}}


def one_engine(scheduler: str, budget: int = 256, **engine) -> dict:
    return {"engines": [{"name": "E", "scheduler": scheduler, "token_budget": budget, **engine}],
            "classes": [{"name": "c", "rate": 5.0, "hops": [{"engine": "E", **LENGTHS}]}],
            "run": {"horizon_s": 120.0}}


def chain_jobs(net, requests) -> list:
    """One single-hop job per request, with exactly the request's lengths."""
    hop = net.classes[0].hops[0]
    jobs = []
    for t, p, o in zip(requests.arrival_time.tolist(), requests.num_prompt_tokens.tolist(),
                       requests.num_output_tokens.tolist()):
        seg = Segment()
        seg.visits.append(Visit(hop, p, o, 0.0))
        jobs.append((t, seg, p + o))
    return [jobs]


# ---- the network of one engine is the single-engine simulator -----------------------------

@pytest.mark.parametrize("scheduler, drain", [(name, False) for name in ("sarathi", "orca", "vllm", "fastertransformer",
                                                                            "vllm-v1")]
                         + [(name, True) for name in ("sarathi", "orca", "vllm", "vllm-v1")])
def test_one_engine_network_matches_single_engine_simulator(scheduler, drain):
    net = parse_network(one_engine(scheduler))
    workload = Workload(PoissonArrivals(5.0), make_length(LENGTHS["prompt"], field="p", minimum=1),
                        make_length(LENGTHS["output"], field="o", minimum=0))
    requests = workload.generate(3, horizon_s=120.0)
    engine = Engine(make_scheduler(scheduler), 256, net.engines[0].batch_time)
    single = simulate(engine, requests, horizon_s=120.0, drain=drain, record_batches=True)
    net_result = simulate_network(net, jobs=chain_jobs(net, requests), drain=drain)
    assert len(net_result.arrival_time) == len(requests) > 500
    np.testing.assert_array_equal(net_result.arrival_time, requests.arrival_time)
    np.testing.assert_array_equal(net_result.first_token_time, single.first_token_time)
    np.testing.assert_array_equal(net_result.finish_time, single.finish_time)
    np.testing.assert_array_equal(net_result.batches[0]["end_time"], single.batch_end_time)
    np.testing.assert_array_equal(net_result.batches[0]["bound"], single.batches["bound"])
    assert net_result.engines[0].violations == single.violations
    assert net_result.end_time == single.end_time


# ---- conservation: forks, joins, tokens ----------------------------------------------------

def test_fork_join_every_fork_joined_once_and_tokens_conserved():
    net = load_network("fork-join", ["run.horizon_s=200", "run.drain=true"])
    r = simulate_network(net)
    jobs = len(r.job_entry_time)
    assert jobs > 500 and not np.isnan(r.job_exit_time).any()       # every job left the network
    hop_ids = {h.index: h.id for h in net.classes[0].hops}
    per_job = Counter(zip(r.sub_job.tolist(), (hop_ids[h] for h in r.sub_hop.tolist())))
    for j in range(jobs):
        assert (per_job[(j, "plan")], per_job[(j, "work")], per_job[(j, "summarise")]) == (1, 3, 1)
    assert len(per_job) == 3 * jobs                                   # no stray visit
    assert np.array_equal(np.sort(r.sub_job), np.repeat(np.arange(jobs), 5))   # none lost or duplicated
    assert not np.isnan(r.finish_time).any()
    batch_tokens = sum(int((b["num_prefill_tokens"] + b["num_decode_tokens"]).sum()) for b in r.batches)
    sub_tokens = int((r.num_prompt_tokens + r.num_output_tokens).sum())
    assert batch_tokens == sub_tokens == int(r.job_tokens.sum())
    # the join runs when the last worker finishes; prompts grow by what the previous hops produced
    plan, work, summ = (r.sub_hop == i for i in range(3))
    for j in range(0, jobs, 37):
        mine = r.sub_job == j
        w = mine & work
        assert r.arrival_time[mine & summ][0] == r.finish_time[w].max()
        assert np.all(r.arrival_time[w] == r.finish_time[mine & plan][0])
        assert np.all(r.num_prompt_tokens[w] >= r.num_output_tokens[mine & plan][0] + 1)
        assert r.num_prompt_tokens[mine & summ][0] >= r.num_output_tokens[w].sum() + 1
        assert r.job_exit_time[j] == r.finish_time[mine & summ][0]


def test_agent_loop_tool_delays_and_bounded_rounds():
    net = load_network("agent-loop", ["run.horizon_s=300", "run.drain=true"])
    r = simulate_network(net)
    think = (r.sub_class == 0) & (r.sub_hop == 0)
    rounds = np.bincount(r.sub_job[think])
    rounds = rounds[rounds > 0]
    assert rounds.max() <= 10 and rounds.min() >= 1
    for j in np.unique(r.sub_job[think])[:50]:
        idx = np.flatnonzero(think & (r.sub_job == j))
        gaps = r.arrival_time[idx[1:]] - r.finish_time[idx[:-1]]      # the tool call between two rounds
        assert np.all(gaps >= 0)
    done = ~np.isnan(r.job_exit_time)
    assert done.all()


def test_traffic_equations_exact_token_loads():
    a = analyze_network(load_network("fork-join"))
    # plan (200+60) + 3 workers (100+60+120) + summarise (50 + 3*120 + 100)
    assert a.tokens_per_job[0].sum() == pytest.approx(1610.0, rel=1e-9)
    assert a.visits_per_job[0].tolist() == pytest.approx([2.0, 3.0])
    assert a.bottleneck == "W" and a.max_rho == pytest.approx(0.9)
    t = analyze_network(load_network("tandem"))
    assert t.tokens_per_job[0].tolist() == pytest.approx([241.0, 376.0, 248.0], rel=1e-9)
    assert not t.cyclic and t.prediction() == "stable"
    rs = analyze_network(load_network("rybko-stolyar"))
    assert rs.offered_tokens_per_s.tolist() == pytest.approx([691.2, 691.2], rel=1e-6)
    assert rs.rates[0] == pytest.approx(0.9 * 768 / 608) and rs.cyclic
    assert rs.max_scaling == pytest.approx(1 / 0.9)


def loop_net(**loop) -> dict:
    return {"engines": [{"name": "E"}], "delays": [{"name": "tool", "dist": "fixed", "value_s": 0.5}],
            "classes": [{"name": "a", "rate": 1.0, "add_previous_output": True, "hops": [
                {"id": "think", "engine": "E", "prompt": {"dist": "fixed", "value": 100},
                 "output": {"dist": "fixed", "value": 10}},
                {"id": "tool", "delay": "tool", "loop": "think", **loop},
                {"id": "answer", "engine": "E", "prompt": {"dist": "fixed", "value": 5},
                 "output": {"dist": "poisson", "mean": 50}}]}]}


def test_loop_rounds_bounded_geometric_and_sampled_means():
    fixed = analyze_network(parse_network(loop_net(rounds=3)))
    # 3 rounds; prompts: 100, 110, 110 (growth), answer 5 + 10
    assert fixed.classes[0].visits.tolist() == pytest.approx([3, 3, 1])
    assert fixed.tokens_per_job[0, 0] == pytest.approx(100 + 110 + 110 + 3 * 10 + 15 + 50)
    net = parse_network(loop_net(continue_p=0.7, max_rounds=10))
    geo = analyze_network(net)
    mean_rounds = (1 - 0.7**10) / 0.3
    assert geo.classes[0].visits[0] == pytest.approx(mean_rounds)
    jobs = generate_jobs(net, 1, 4000.0)[0]
    visits = np.array([len(seg.visits) for _, seg, _ in jobs])      # 2 per round + the answer
    assert (visits - 1).max() <= 20 and np.all((visits - 1) % 2 == 0)
    rounds = (visits - 1) / 2
    assert abs(rounds.mean() - mean_rounds) < 4 * rounds.std() / np.sqrt(len(rounds))
    tokens = np.array([t for *_, t in jobs])
    expected = geo.tokens_per_job[0].sum()
    assert abs(tokens.mean() - expected) < 4 * tokens.std() / np.sqrt(len(tokens))


def test_probabilistic_branch_and_revisit_visits():
    data = loop_net(rounds=1)
    hops = data["classes"][0]["hops"]
    del hops[1]["loop"], hops[1]["rounds"]
    hops[1].update(next=["think", "answer"], p=[0.25, 0.75])
    a = analyze_network(parse_network(data))
    assert a.classes[0].visits.tolist() == pytest.approx([4 / 3, 4 / 3, 1])
    assert a.cyclic


# ---- bad configs stop before any simulation --------------------------------------------------

def base() -> dict:
    return copy.deepcopy(load_network("fork-join").data)


def edit(fn):
    data = base()
    data["delays"] = [{"name": "tool", "dist": "fixed", "value_s": 1.0}]
    fn(data)
    return data


def hop(data, i):
    return data["classes"][0]["hops"][i]


BAD = [
    (lambda d: hop(d, 1).update(engine="S9"), "classes[0].hops[1].engine = 'S9'"),
    (lambda d: hop(d, 2).update(join=False), "classes[0].hops[2].next"),          # branches never joined
    (lambda d: (hop(d, 0).pop("fork"), hop(d, 0).update(next="summarise")), "classes[0].hops[2].join"),
    (lambda d: hop(d, 2).update(next="plan"), "classes[0].hops[2].next = 'plan' is not allowed: a way out"),
    (lambda d: hop(d, 2).update(next=["plan", "plan"], p=[0.3, 0.7]), "after hop 'summarise' the job can never leave"),
    (lambda d: hop(d, 2).update(loop="plan", continue_p=1.0), "classes[0].hops[2].continue_p"),
    (lambda d: d["delays"][0].update(value_s=-1.0), "delays[0].value_s = -1.0"),
    (lambda d: d["delays"].__setitem__(0, {"name": "tool", "dist": "exponential", "mean_s": -2}), "delays[0].mean_s"),
    (lambda d: hop(d, 1).update(next="exit"), "may not leave before it is joined"),
    (lambda d: hop(d, 1).update(delay="nope", engine=None) or hop(d, 1).pop("engine"), "classes[0].hops[1]"),
    (lambda d: hop(d, 0).update(fork=["work"]), "classes[0].hops[0].fork"),
    (lambda d: hop(d, 2).update(next=["exit", "plan"], p=[0.5, 0.4]), "sum to 1"),
    (lambda d: d["engines"][1].update(name="P"), "engines[1].name = 'P'"),
    (lambda d: d["engines"][0].update(policy="lifo"), "engines[0].policy"),
    (lambda d: d["engines"][0].update(policy="priority", class_priority=["nobody"]), "engines[0].class_priority"),
    (lambda d: d["engines"][0].update(policy="priority"), "engines[0].class_priority"),
    (lambda d: hop(d, 1).update(bogus=1), "classes[0].hops[1].bogus"),
    (lambda d: hop(d, 0).update(next="exit") or hop(d, 0).pop("fork"), "never reached"),
    (lambda d: d["engines"][0].update(token_budget=0), "engines[0].token_budget"),
    (lambda d: d["classes"][0].update(rate=-1), "classes[0].rate"),
]


@pytest.mark.parametrize("mutate, message", BAD)
def test_bad_network_configs_raise_clear_errors(mutate, message):
    data = edit(mutate)
    with pytest.raises(ConfigError) as err:
        parse_network(data)
    assert message in str(err.value)


def test_cli_rejects_bad_network_with_one_line(capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[engines]]\nname = "E"\n[[classes]]\nname = "c"\nrate = 1.0\n'
                    '[[classes.hops]]\nengine = "F"\nprompt = {dist = "fixed", value = 1}\n'
                    'output = {dist = "fixed", value = 1}\n')
    for argv in (["simulate", str(path)], ["capacity", str(path)], ["network", "simulate", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "classes[0].hops[0].engine = 'F' is not allowed: an engine name: E" in err
    assert main(["simulate", "rybko-stolyar", "--set", "engines.S9.token_budget=5"]) == 2
    assert "engines.NAME with NAME one of S1, S2" in capsys.readouterr().err


# ---- policies ------------------------------------------------------------------------------

def two_class_engine(policy: str, **extra) -> dict:
    hop_ = {"engine": "E", "prompt": {"dist": "fixed", "value": 64}, "output": {"dist": "fixed", "value": 0}}
    return {"engines": [{"name": "E", "token_budget": 64, "policy": policy,
                         "batch_time": {"model": "constant", "duration_ms": 1000.0}, **extra}],
            "classes": [{"name": "lo", "rate": 1.0, "hops": [dict(hop_)]},
                        {"name": "hi", "rate": 1.0, "hops": [dict(hop_)]}]}


@pytest.mark.parametrize("scheduler", ["sarathi", "orca", "vllm", "fastertransformer"])
def test_strict_class_priority_serves_the_high_class_first(scheduler):
    def first_tokens(policy, **extra):
        net = parse_network(two_class_engine(policy, scheduler=scheduler, **extra))
        jobs = []
        for k in range(2):  # lo's job arrives first, both at t = 0.5
            seg = Segment()
            seg.visits.append(Visit(net.classes[k].hops[0], 64, 0, 0.0))
            jobs.append([(0.5, seg, 64)])
        r = simulate_network(net, jobs=jobs, drain=True)
        return dict(zip(r.sub_class.tolist(), r.first_token_time.tolist()))

    assert first_tokens("fcfs") == {0: 1.5, 1: 2.5}
    assert first_tokens("priority", class_priority=["hi", "lo"]) == {0: 2.5, 1: 1.5}
    assert first_tokens("priority", class_priority=["lo"]) == {0: 1.5, 1: 2.5}   # unlisted classes last


@pytest.mark.parametrize("policy", ["priority", "max-pressure"])
@pytest.mark.parametrize("scheduler", ["sarathi", "orca"])
def test_class_policies_keep_work_conservation_and_mirror_engine_queues(policy, scheduler):
    sets = [f"engines.{e}.{k}={v}" for e in ("S1", "S2") for k, v in (("policy", policy), ("scheduler", scheduler))]
    net = load_network("rybko-stolyar", [*sets, "run.horizon_s=400"])
    r = simulate_network(net, method="reference")  # the reference's bookkeeping: groups mirror the engine
    assert r.meta["method"] == "reference (selected)"
    for engine in r.engines:
        assert engine.violations == 0
        assert len(engine.state.prefilling) + len(engine.state.decoding) > 0
        grouped = engine.scheduler
        assert sorted(x.rid for q in grouped.prefilling for x in q) == sorted(x.rid for x in engine.state.prefilling)
        assert [x.rid for d in grouped.decoding for x in d] == sorted(x.rid for x in engine.state.decoding) or \
            sorted(x.rid for d in grouped.decoding for x in d) == [x.rid for x in engine.state.decoding]
        assert sum(grouped.prefill_left) == engine.state.total_prefill_left
        for d in grouped.decoding:
            assert [x.rid for x in d] == sorted(x.rid for x in d)


def test_max_pressure_ranks_buffers_by_downstream_queues():
    net = load_network("rybko-stolyar", ["engines.S1.policy=max-pressure", "engines.S2.policy=max-pressure"])
    buffers = buffers_of(net)  # (class, hop) -> id: A.short, A.long, B.short, B.long
    counts = [0] * len(buffers)
    s1 = build_engines(net, analyze_network(net), counts)[0].scheduler
    for k, h in ((0, 0), (1, 1)):  # one request in each of S1's buffers: A.short and B.long
        r = SubRequest(k, 0.0, 32, 32)
        r.group = s1.group_of[(k, h)]
        s1.admitted(r)
    a_short, b_long = s1.group_of[(0, 0)], s1.group_of[(1, 1)]
    counts[buffers[(0, 0)]], counts[buffers[(1, 1)]] = 10, 5
    counts[buffers[(0, 1)]] = 50          # A's long hop at S2 is congested: A.short's pressure < 0
    assert s1.order() == [b_long, a_short]
    counts[buffers[(0, 1)]] = 0           # S2 starved of A's work: feed it first
    assert s1.order() == [a_short, b_long]
    assert s1.pressure(a_short) == pytest.approx(10 / 64, rel=1e-3)


def test_same_seed_same_jobs_across_policies_and_deterministic():
    base_ = load_network("rybko-stolyar", ["run.horizon_s=300"])
    fcfs = load_network("rybko-stolyar", ["run.horizon_s=300", "engines.S1.policy=fcfs", "engines.S2.policy=fcfs"])
    a, b = simulate_network(base_), simulate_network(fcfs)
    np.testing.assert_array_equal(a.job_entry_time, b.job_entry_time)
    np.testing.assert_array_equal(a.job_tokens, b.job_tokens)
    assert not np.array_equal(a.finish_time[:500], b.finish_time[:500])
    one, two = run_network(base_), run_network(base_)
    one.pop("wall_s"), two.pop("wall_s")
    assert all("wall_s" not in e for s in (one, two) for e in s["engines"])   # only the network's wall time
    assert json.dumps(one, default=float) == json.dumps(two, default=float)


def test_rybko_stolyar_short_run_priority_diverges_reverse_does_not():
    bad = run_network(load_network("rybko-stolyar", ["run.horizon_s=2000"]))["network"]
    good = run_network(load_network("rybko-stolyar-reverse", ["run.horizon_s=2000"]))["network"]
    assert bad["verdict"] == "unstable" and bad["backlog_slope_tokens_per_s"] > 300
    assert good["verdict"] == "stable" and bad["peak_backlog_tokens"] > 10 * good["peak_backlog_tokens"]


# ---- the command line ----------------------------------------------------------------------

def test_cli_simulate_and_capacity_dispatch_to_network(capsys, tmp_path):
    assert main(["simulate", "fork-join", "--set", "run.horizon_s=60", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["horizon_s"] == 60 and {"network", "engines", "classes"} <= set(s)
    assert [e["engine"] for e in s["engines"]] == ["P", "W"] and s["classes"][0]["hops"][1]["hop"] == "work"
    assert main(["capacity", "rybko-stolyar", "--set", "engines.S1.token_budget=1536", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert [round(e["rho"], 3) for e in a["engines"]] == [0.45, 0.9] and a["bottleneck"] == "S2"
    assert main(["capacity", "tandem"]) == 0
    out = capsys.readouterr().out
    assert "bottleneck E2" in out and "prediction: stable" in out
    assert main(["network", "simulate", "agent-loop", "--set", "run.horizon_s=60", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "agent.think" in out and "network:" in out
    for name in ("config.json", "summary.json", "timeseries.csv", "requests.csv"):
        assert (tmp_path / name).stat().st_size > 100
    header = (tmp_path / "requests.csv").read_text().splitlines()[0]
    assert header.startswith("rid,job,class,hop,engine")


def test_cli_compare_policies_same_jobs(capsys, tmp_path):
    assert main(["network", "compare", "rybko-stolyar", "--set", "run.horizon_s=300", "--policies",
                 "config,fcfs,max-pressure", "--json", "--out", str(tmp_path)]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["policy"] for r in runs] == ["config", "fcfs", "max-pressure"]
    assert len({r["network"]["jobs_arrived"] for r in runs}) == 1
    assert [e["policy"] for e in runs[1]["engines"]] == ["fcfs", "fcfs"]
    assert len(json.loads((tmp_path / "summary.json").read_text())["runs"]) == 3
    assert main(["network", "compare", "tandem", "--policies", "fifo"]) == 2
    assert "--policies = 'fifo' is not allowed" in capsys.readouterr().err


def test_docs_complete_example_is_a_valid_network(tmp_path, capsys):
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "network.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "agents.toml"
    path.write_text(example)
    net = load_network(path, ["run.horizon_s=60"])
    assert [c.name for c in net.classes] == ["agent", "chat"] and net.engines[0].class_priority == (1, 0)
    assert analyze_network(net).max_rho == pytest.approx(0.9)
    assert main(["simulate", str(path), "--set", "run.horizon_s=60", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["network"]["jobs_arrived"] > 0


def test_engine_priority_via_set_and_scenarios_listed(capsys):
    assert main(["scenarios"]) == 0
    out = capsys.readouterr().out
    for name in ("rybko-stolyar", "rybko-stolyar-reverse", "fork-join", "agent-loop", "tandem"):
        assert name in out
    net = load_network("agent-loop", ["engines.llm.policy=priority", 'engines.llm.class_priority=["chat"]',
                                      "classes.agent.hops.think.prompt.mean=100"])
    assert net.engines[0].class_priority == (1,)
    assert net.classes[0].hops[0].prompt.mean == pytest.approx(100)
    assert make_batch_time(net.data["engines"][0]["batch_time"]).name == "staircase"
