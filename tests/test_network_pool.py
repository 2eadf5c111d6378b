"""Pools as engines of a network (issue 19; docs/network.md, "Pools as engines"; arXiv 2504.07347 §5).

A node of a network can be N replicas behind a router (the routers of docs/cluster.md).  These tests
check that a pool of one replica is exactly the plain engine under every router, that random routing
to identical replicas splits the load as the analysis says, that affinity keeps a job's hops on one
replica, that the network's pool analysis agrees with the stand-alone cluster's, and that bad input
stops with one line naming the key.
"""

from __future__ import annotations

import collections
import copy
import csv
from pathlib import Path

import numpy as np
import pytest

from llmqueue.cli import main
from llmqueue.errors import ConfigError
from llmqueue.network import analyze_network, load_network, parse_network, simulate_network, summarize_network
from llmqueue.network.fast import reason

PREFIX = Path(__file__).resolve().parents[1] / "examples" / "network_prefix.toml"
ROUTERS = ("round-robin", "random", "jsq", "least-tokens", "power-of-d", "affinity")
POOL_KEYS = {"router", "router_kind", "report_delay_s", "replicas_count", "pooled_capacity_tokens_per_s",
             "pool_reason", "replicas_unstable", "replicas"}
ARRAYS = ("sub_engine", "sub_class", "sub_hop", "sub_job", "arrival_time", "num_prompt_tokens", "num_output_tokens",
          "first_token_time", "finish_time", "rejected", "job_entry_time", "job_exit_time", "job_tokens",
          "job_rejected")


def data_of(name: str, *sets: str) -> dict:
    return copy.deepcopy(load_network(name, list(sets)).data)


def pooled(data: dict, engine: int = 0, **pool) -> dict:
    data = copy.deepcopy(data)
    data["engines"][engine].update(pool)
    return data


def plain_summary(s: dict) -> dict:
    """A summary without what only a pool has (its router and replicas) and without wall times."""
    s = copy.deepcopy(s)
    s.pop("wall_s")
    s["engines"] = [{k: v for k, v in e.items() if k not in POOL_KEYS} for e in s["engines"]]
    s["analysis"].pop("pools", None)
    return s


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


def check_equal(plain, pool) -> None:
    for name in ARRAYS:
        assert np.array_equal(getattr(plain, name), getattr(pool, name), equal_nan=True), name
    for a, b in zip(plain.batches, pool.batches):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    sa, sb = summarize_network(plain), summarize_network(pool)
    assert same(plain_summary(sa), plain_summary(sb))


# ---- a pool of one replica is the plain engine ------------------------------------------------

@pytest.mark.parametrize("router", ROUTERS)
def test_pool_of_one_is_the_plain_engine_under_every_router(router):
    base = data_of("agent-loop", "run.horizon_s=200")
    plain = simulate_network(parse_network(base))     # the compiled core where it is built
    pool = simulate_network(parse_network(pooled(base, replicas=1, router=router, report_delay_s=0.5)))
    assert pool.meta["method"].startswith("reference (pools run on the reference network simulator")
    assert len(plain.sub_job) > 1500
    check_equal(plain, pool)
    assert set(pool.sub_phys.tolist()) == {0}


def test_pool_of_one_in_a_larger_network_and_with_memory():
    base = data_of("fork-join", "run.horizon_s=40")
    plain = simulate_network(parse_network(base))
    for j in range(2):   # either engine as a pool of one
        check_equal(plain, simulate_network(parse_network(pooled(base, j, replicas=[{"count": 1}], router="jsq"))))
    mem = data_of("agent-loop", "run.horizon_s=150", "engines.llm.kv_blocks=300")
    plain = simulate_network(parse_network(mem))
    assert summarize_network(plain)["engines"][0]["kv"]["preemptions"] > 0    # memory binds
    for router in ("least-kv", "round-robin"):
        check_equal(plain, simulate_network(parse_network(pooled(mem, replicas=1, router=router))))


# ---- N identical replicas ---------------------------------------------------------------------

def chat(load: float, horizon: float = 600.0) -> dict:
    return {"network": {"load": load},
            "engines": [{"name": "llm", "scheduler": "sarathi", "token_budget": 512}],
            "classes": [{"name": "chat", "rate": 1.0, "hops": [
                {"engine": "llm", "prompt": {"dist": "poisson", "mean": 129},
                 "output": {"dist": "poisson", "mean": 112}}]}],
            "run": {"horizon_s": horizon, "seed": 1}}


def test_random_to_identical_replicas_is_independent_engines_at_a_share_of_the_rate():
    """Random routing thins the Poisson stream: each of 4 replicas is one engine at λ/4 (issue 19, item 5)."""
    pool_data = pooled(chat(0.8), replicas=4, router="random")
    net = parse_network(pool_data)
    a = analyze_network(net)
    one = analyze_network(parse_network(chat(0.8)))
    assert a.capacity_tokens_per_s[0] == pytest.approx(4 * one.capacity_tokens_per_s[0])   # pooled capacity
    assert a.rho[0] == pytest.approx(0.8) and net.rates[0] == pytest.approx(4 * one.rates[0])
    p = a.pools[0]
    assert p.kind == "static" and p.shares == pytest.approx((0.25,) * 4) and p.replica_rho == pytest.approx((0.8,) * 4)
    assert a.prediction() == "stable"
    s = summarize_network(simulate_network(net))
    single = summarize_network(simulate_network(parse_network(chat(0.8))))["engines"][0]
    e = s["engines"][0]
    assert e["rho"] == pytest.approx(0.8) and e["router"] == "random" and e["replicas_count"] == 4
    assert 0.0 < e["busy_fraction"] <= 1.0
    for r in e["replicas"]:
        x = r["summary"]
        assert r["share"] == pytest.approx(0.25, abs=0.01)
        assert x["rho"] == pytest.approx(0.8, abs=0.03) and x["verdict"] == "stable"
        assert x["e2e_s"]["mean"] == pytest.approx(single["e2e_s"]["mean"], rel=0.1)
        assert x["ttft_s"]["mean"] == pytest.approx(single["ttft_s"]["mean"], rel=0.25)
    assert s["network"]["verdict"] == "stable" and s["network"]["predicted"] == "stable"


def test_static_router_overloading_a_replica_is_predicted_unstable_and_jsq_is_not():
    hetero = pooled(chat(0.8), replicas=[{"count": 2}, {"count": 2, "name": "slow",
                                                       "batch_time": {"model": "staircase", "c_ms": 22.56,
                                                                      "a_ms": 70.94, "b0": 128}}], router="random")
    a = analyze_network(parse_network(hetero))
    p = a.pools[0]
    assert p.replicas == ("r0", "r1", "slow.0", "slow.1") and p.binding == "llm.slow.0"
    assert p.replica_rho[2] == pytest.approx(1.2, rel=1e-3) and a.prediction() == "unstable"
    jsq = analyze_network(parse_network(pooled(hetero, router="jsq")))
    assert jsq.pools[0].kind == "pooled" and jsq.prediction() == "stable"


def test_pool_analysis_agrees_with_the_stand_alone_cluster():
    """The network's per-replica capacities, shares and ρ are llmqueue.cluster.capacity's for the same pool."""
    from llmqueue.cluster.capacity import pool_capacity
    from llmqueue.cluster.config import parse_cluster
    from llmqueue.cluster.run import generate_pool

    small = {"count": 1, "token_budget": 256}
    for router, options in (("random", {"weights": [1, 2, 1]}), ("affinity", {"virtual_nodes": 7}),
                            ("round-robin", {})):
        data = pooled(chat(0.7), replicas=[{"count": 2}, small], router=router, router_options=options)
        p = analyze_network(parse_network(data)).pools[0]
        cfg = parse_cluster({"engine": {"scheduler": "sarathi", "token_budget": 512},
                             "workload": {"load": 0.7, "prompt": {"dist": "poisson", "mean": 129},
                                          "output": {"dist": "poisson", "mean": 112}},
                             "cluster": {"replicas": [{"count": 2}, small], "router": router,
                                         "router_options": options}})
        workload, _ = generate_pool(cfg)
        c = pool_capacity(cfg, workload)
        assert p.capacity_tokens_per_s == pytest.approx(tuple(c.capacity_tokens_per_s))
        assert p.pooled_capacity_tokens_per_s == pytest.approx(c.pooled_capacity_tokens_per_s)
        assert p.shares == pytest.approx(tuple(c.shares))
        assert p.replica_rho == pytest.approx(tuple(c.replica_rho), rel=1e-6)


# ---- affinity, routing streams, the compiled path ----------------------------------------------

def replicas_per_job(r) -> collections.Counter:
    seen = collections.defaultdict(set)
    m = r.sub_engine == 0
    for job, p in zip(r.sub_job[m].tolist(), r.sub_phys[m].tolist()):
        seen[job].add(p)
    return collections.Counter(len(v) for v in seen.values())


def test_affinity_keeps_each_jobs_hops_on_one_replica():
    base = data_of("agent-pool", "run.horizon_s=200")
    r = simulate_network(parse_network(base))
    counts = replicas_per_job(r)
    assert set(counts) == {1} and sum(counts.values()) > 2000
    assert len(set(r.sub_phys.tolist())) == 4
    spread = replicas_per_job(simulate_network(parse_network(pooled(base, router="jsq", router_options={}))))
    assert sum(n for k, n in spread.items() if k > 1) > 100      # jsq moves a job's hops between replicas


def test_routing_is_deterministic_per_seed_with_a_stream_of_its_own():
    base = data_of("agent-pool", "run.horizon_s=100")
    for router in ("random", "power-of-d"):
        d = pooled(base, router=router, router_options={}, report_delay_s=1.0)
        one, two = simulate_network(parse_network(d)), simulate_network(parse_network(d))
        assert np.array_equal(one.sub_phys, two.sub_phys) and np.array_equal(one.finish_time, two.finish_time,
                                                                              equal_nan=True)
        other = simulate_network(parse_network(d), seed=5)
        assert not np.array_equal(one.sub_phys[:500], other.sub_phys[:500])
    # the jobs do not depend on the router (common random numbers): the routing draws from its own stream
    a = simulate_network(parse_network(pooled(base, router="random", router_options={})))
    b = simulate_network(parse_network(pooled(base, router="round-robin", router_options={})))
    assert np.array_equal(a.job_entry_time, b.job_entry_time) and np.array_equal(a.job_tokens, b.job_tokens)
    assert b.sub_phys[b.sub_engine == 0][:8].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]   # in order of arrival


def test_the_compiled_path_says_pools_run_on_the_reference_loop():
    net = load_network("agent-pool")
    assert reason([], net) == ("pools run on the reference network simulator (llm: 4 replicas, router affinity)")
    assert reason([], load_network("agent-loop")) is None or "pools" not in reason([], load_network("agent-loop"))


def test_router_file_and_report_delay_in_a_network(tmp_path):
    (tmp_path / "first.py").write_text(
        "from llmqueue.cluster import Router\n\n"
        "class First(Router):\n"
        "    name = 'first'\n"
        "    def choose(self, view, prompt, output, session):   # the first replica with under 30 in flight\n"
        "        return next((j for j, n in enumerate(view.in_flight) if n < 30), self.replicas - 1)\n")
    base = data_of("agent-pool", "run.horizon_s=60", "network.load=0.3")
    r = simulate_network(parse_network(pooled(base, router="first.py:First", router_options={},
                                              report_delay_s=0.2), tmp_path))
    share = np.bincount(r.sub_phys, minlength=4) / len(r.sub_phys)
    assert share[0] > 0.4 and share[0] > share[1] > share[2] >= share[3]
    assert analyze_network(parse_network(pooled(base, router="first.py:First", router_options={}),
                                         tmp_path)).pools[0].kind == "unknown"


def test_cli_prints_each_replica_and_writes_its_column(capsys, tmp_path):
    assert main(["network", "simulate", "agent-pool", "--set", "run.horizon_s=60", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("llm.r0", "llm.r3", "affinity", "predicted"):
        assert name in out
    rows = list(csv.DictReader((tmp_path / "requests.csv").open()))
    assert {row["replica"] for row in rows} == {"r0", "r1", "r2", "r3"}
    header = (tmp_path / "timeseries.csv").read_text().splitlines()[0]
    assert "llm.r0_backlog_tokens" in header
    assert main(["network", "capacity", "agent-pool"]) == 0
    assert "llm.r0" in capsys.readouterr().out


# ---- bad input: one line naming the key and what is allowed -------------------------------------

BAD = [
    ({"replicas": 0}, "engines[0].replicas", "at least 1 replica"),
    ({"replicas": "four"}, "engines[0].replicas", "at least 1 replica"),
    ({"replicas": []}, "engines[0].replicas", "at least 1 replica"),
    ({"replicas": [{"count": 0}]}, "engines[0].replicas[0].count", ">= 1"),
    ({"replicas": [{"token_budget": 0}]}, "engines[0].replicas[0].token_budget", ">= 1"),
    ({"replicas": [{"warp": 1}]}, "engines[0].replicas[0].warp", "a known key"),
    ({"replicas": [{"router": "jsq"}]}, "engines[0].replicas[0].router", "a key of one engine"),
    ({"replicas": 2, "router": "fastest"}, "engines[0].router", "one of round-robin, random, jsq"),
    ({"router": "jsq"}, "engines[0].router", "set together with engines[0].replicas"),
    ({"replicas": 2, "router": "power-of-d", "router_options": {"d": 2.5}}, "engines[0].router_options.d",
     "an integer from 1 to the number of replicas"),
    ({"replicas": 2, "router": "power-of-d", "router_options": {"d": 3}}, "engines[0].router_options.d",
     "an integer from 1 to 2"),
    ({"replicas": 2, "router": "jsq", "router_options": {"d": 2}}, "engines[0].router_options.d",
     "its options: none"),
    ({"replicas": 2, "router": "random", "router_options": {"weights": [1]}}, "engines[0].router_options.weights",
     "a list of 2 non-negative numbers"),
    ({"replicas": 2, "router": "affinity", "router_options": {"virtual_nodes": "many"}},
     "engines[0].router_options.virtual_nodes", "an integer"),
    ({"replicas": 2, "router_options": 3}, "engines[0].router_options", "a table"),
    ({"replicas": 2, "router": "least-kv"}, "engines[0].router", "kv_blocks set for every replica"),
    ({"replicas": 2, "report_delay_s": -1}, "engines[0].report_delay_s", ">= 0"),
]


def inline(v) -> str:
    """A value as inline TOML (for --set)."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {inline(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(inline(x) for x in v) + "]"
    return f'"{v}"' if isinstance(v, str) else repr(v)


@pytest.mark.parametrize(("pool", "field", "allowed"), BAD, ids=[b[1] + ":" + repr(b[0])[:30] for b in BAD])
def test_bad_pool_input_is_one_line_naming_the_key(capsys, tmp_path, pool, field, allowed):
    data = pooled(data_of("agent-loop"), **pool)
    with pytest.raises(ConfigError) as exc:
        parse_network(data)
    assert exc.value.field == field, str(exc.value)
    assert allowed in str(exc.value), str(exc.value)
    # and on the command line (--set on the scenario): one line, exit 2
    sets = [x for k, v in pool.items() for x in ("--set", f"engines.llm.{k}={inline(v)}")]
    assert main(["network", "simulate", "agent-loop", *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmqueue: ") and field in err[0] and "Traceback" not in err[0]


# ---- memory and prefix caching per replica -----------------------------------------------------

def test_pool_replicas_with_memory_report_their_own_kv_and_least_kv_reads_it():
    data = data_of("agent-loop", "run.horizon_s=120", "engines.llm.kv_blocks=300")
    r = simulate_network(parse_network(pooled(data, replicas=2, router="least-kv", report_delay_s=0.1)))
    s = summarize_network(r)
    e = s["engines"][0]
    assert "kv" not in e and all("kv" in x["summary"] for x in e["replicas"])
    assert s["network"]["kv"]["engines"] == ["llm.r0", "llm.r1"]
    assert s["network"]["kv"]["preemptions"] == sum(x["summary"]["kv"]["preemptions"] for x in e["replicas"])
    assert min(x["share"] for x in e["replicas"]) > 0.3


def test_affinity_keeps_each_agents_context_cached_on_its_replica():
    """With prefix caching, session affinity finds the previous step's context on the job's replica;
    jsq and round robin scatter the steps and almost never do (docs/network.md, "Pools as engines")."""
    sets = ["engines.llm.replicas=4", "run.horizon_s=200", "network.load=1.2"]
    hit = {}
    for router in ("affinity", "jsq"):
        s = summarize_network(simulate_network(load_network(PREFIX,
                                                            [*sets, f"engines.llm.router={router}"])))
        hit[router] = s["network"]["kv"]["prefix_caching"]["hit_rate"]
    assert hit["affinity"] > 0.6 and hit["jsq"] < 0.15, hit


def test_heterogeneous_pool_runs_each_replica_with_its_own_engine():
    data = pooled(chat(0.6, horizon=200.0), replicas=[{"count": 1}, {"count": 1, "name": "small", "token_budget": 256,
                                                                     "scheduler": "orca"}], router="jsq")
    s = summarize_network(simulate_network(parse_network(data)))
    reps = s["engines"][0]["replicas"]
    assert [(x["replica"], x["scheduler"], x["token_budget"]) for x in reps] == [("r0", "sarathi", 512),
                                                                                ("small", "orca", 256)]
    assert reps[0]["share"] > reps[1]["share"] > 0.1 and s["engines"][0]["scheduler"] == "pool"
