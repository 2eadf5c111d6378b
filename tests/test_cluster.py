"""Replica pools behind a router (docs/cluster.md): exactness against one engine, the event loop
against one simulate() per replica, determinism, config errors, the CLI, and known results of
routing theory (random = independent engines; power of two near JSQ and far below random;
static routing overloads a slow replica that JSQ spares)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmqueue import cli
from llmqueue.cluster import Router, compare_routers, load_cluster, parse_cluster, pool_capacity, run_pool
from llmqueue.cluster.routers import ROUTERS, View, stable_hash
from llmqueue.cluster.sim import simulate_pool
from llmqueue.errors import ConfigError
from llmqueue.runner import build_workload, run_config
from tests.test_plots import check_figure, drawn  # noqa: F401  (drawn: the fixture that keeps figures)

FIG1 = {"engine": {"scheduler": "sarathi", "token_budget": 512},
        "workload": {"arrival": "poisson", "rate": 12.0},
        "run": {"horizon_s": 60.0, "seed": 3}}


def pool(replicas=1, router="jsq", options=None, base=FIG1, **cluster):
    data = {**{k: dict(v) for k, v in base.items()}, "cluster": {"replicas": replicas, "router": router, **cluster}}
    if options:
        data["cluster"]["router_options"] = options
    return parse_cluster(data)


def without_wall(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "wall_s"}


@pytest.mark.parametrize("router", ["round-robin", "random", "jsq", "least-tokens", "power-of-d", "affinity"])
def test_a_pool_of_one_replica_is_exactly_one_engine(router):
    cfg = pool(1, router)
    single = run_config(cfg.base)
    run = run_pool(cfg)
    assert without_wall(run.summary["replicas"][0]["summary"]) == without_wall(single.summary)
    assert run.summary["pool"]["verdict"] == single.summary["verdict"]
    assert run.summary["pool"]["e2e_s"] == single.summary["e2e_s"]


@pytest.mark.parametrize("router", ["least-kv", "jsq", "round-robin"])
def test_a_pool_of_one_with_memory_is_exactly_one_engine(router):
    # 300 blocks at 0.9 of λ*: memory binds and vLLM-style admission preempts
    base = {**FIG1, "engine": {"scheduler": "vllm-v1", "token_budget": 512, "kv_blocks": 300},
            "workload": {"arrival": "poisson", "rate": 12.5}}
    cfg = pool(1, router, base=base)
    single = run_config(cfg.base)
    run = run_pool(cfg)
    r = run.result.results[0]
    assert single.summary["kv"]["preemptions"] > 0
    np.testing.assert_array_equal(r.batch_end_time, single.result.batch_end_time)
    np.testing.assert_array_equal(r.finish_time, single.result.finish_time)
    np.testing.assert_array_equal(r.kv.batch_blocks, single.result.kv.batch_blocks)
    np.testing.assert_array_equal(r.kv.preemptions, single.result.kv.preemptions)
    np.testing.assert_array_equal(r.kv.recomputed, single.result.kv.recomputed)
    assert without_wall(run.summary["replicas"][0]["summary"]) == without_wall(single.summary)


def test_least_kv_spreads_by_reported_memory():
    base = {**FIG1, "engine": {**FIG1["engine"], "kv_blocks": 400}, "workload": {"rate": 30.0},
            "run": {"horizon_s": 30.0, "seed": 3}}
    run = run_pool(pool(3, "least-kv", base=base))
    shares = [r["share"] for r in run.summary["replicas"]]
    assert min(shares) > 0.25 and all("kv" in r["summary"] for r in run.summary["replicas"])
    assert run.summary["pool"]["predicted"] == "not predicted"   # memory: Theorem 2 only bounds


class TurnByTurn(Router):
    """A dynamic router that decides as round robin does: the event loop must then give exactly
    one simulate() per replica of its requests."""

    name = "turn-by-turn"

    def __init__(self, replicas, rng, **options):
        super().__init__(replicas, rng, **options)
        self.i = -1

    def choose(self, view, prompt, output, session):
        self.i += 1
        return self.i % self.replicas


@pytest.mark.parametrize("delay", [0.0, 0.5])
@pytest.mark.parametrize("scheduler", ["sarathi", "vllm", "orca"])
def test_the_event_loop_gives_each_replica_the_run_simulate_gives(scheduler, delay):
    base = {**FIG1, "engine": {"scheduler": scheduler, "token_budget": 512}, "workload": {"rate": 30.0}}
    cfg = pool(3, "round-robin", base=base, report_delay_s=delay)
    requests = build_workload(cfg.base).generate(3, horizon_s=60.0)
    static = simulate_pool(cfg, requests)
    stepped = simulate_pool(cfg, requests, router=TurnByTurn(3, None))
    np.testing.assert_array_equal(static.replica, stepped.replica)
    for a, b in zip(static.results, stepped.results):
        np.testing.assert_array_equal(a.batch_end_time, b.batch_end_time)
        np.testing.assert_array_equal(a.batch_tokens, b.batch_tokens)
        np.testing.assert_array_equal(a.first_token_time, b.first_token_time)
        np.testing.assert_array_equal(a.finish_time, b.finish_time)
        assert a.end_time == b.end_time


# ---- the compiled pool loop (_fastcore.run_pool) against the Python loop over steppers -------

HETERO_REPLICAS = [{"name": "fast", "count": 1},
                   {"name": "slow", "count": 1, "scheduler": "vllm", "token_budget": 256,
                    "batch_time": {"model": "staircase", "c_ms": 22.56, "a_ms": 70.94, "b0": 128}},
                   {"name": "capped", "count": 1, "scheduler": "orca", "max_batch_requests": 3}]


def assert_same_pool_run(a, b) -> None:
    np.testing.assert_array_equal(a.replica, b.replica)
    for x, y in zip(a.results, b.results, strict=True):
        for f in ("arrival_time", "first_token_time", "finish_time", "rejected", "batch_end_time", "batch_tokens"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f), err_msg=f)
        assert (x.end_time, x.violations, x.scheduler, x.token_budget) == (y.end_time, y.violations, y.scheduler,
                                                                           y.token_budget)


def check_compiled_pool(router, replicas, scheduler, budget, cap, delay, drain, hetero, load, seed, d=None):
    engine = {"scheduler": scheduler, "token_budget": budget, **({"max_batch_requests": cap} if cap else {})}
    cluster = {"router": router, "report_delay_s": delay,
               "replicas": HETERO_REPLICAS + [{"name": "more", "count": replicas}] if hetero else replicas}
    if d is not None:
        cluster["router_options"] = {"d": min(d, replicas + 3 * hetero)}
    cfg = parse_cluster({"engine": engine, "workload": {"arrival": "poisson", "load": load},
                         "run": {"horizon_s": 15.0, "seed": seed, "drain": drain}, "cluster": cluster})
    requests = build_workload(cfg.base).generate(seed, horizon_s=15.0)
    compiled = simulate_pool(cfg, requests)
    assert compiled.meta["method"] == ["fast"]
    assert_same_pool_run(compiled, simulate_pool(cfg, requests, compiled=False))
    return compiled


@pytest.mark.filterwarnings("ignore::llmqueue.model.batch_time.AssumptionWarning")
@pytest.mark.parametrize("router", ["jsq", "least-tokens", "power-of-d"])
@pytest.mark.parametrize("scheduler, budget, cap", [("sarathi", 512, None), ("vllm", 128, None),
                                                    ("fastertransformer", 300, 4), ("maxweight", 256, None)])
def test_the_compiled_pool_loop_decides_and_runs_as_the_python_loop(router, scheduler, budget, cap):
    # every decision and batch identical, rejections included (prompts over a non-splitting budget)
    runs = [check_compiled_pool(router, replicas, scheduler, budget, cap, delay, drain, hetero, load, seed)
            for replicas, delay, drain, hetero, load, seed in [(1, 0.0, False, False, 0.9, 1), (4, 0.3, False, True, 1.2, 2),
                                                               (3, 0.0, True, False, 0.7, 3)]]
    if scheduler == "vllm":
        assert any(r.rejected.any() for run in runs for r in run.results)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::llmqueue.model.batch_time.AssumptionWarning")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["jsq", "least-tokens", "power-of-d"]), st.integers(1, 6),
       st.sampled_from([("sarathi", 512), ("vllm", 200), ("orca", 256), ("fastertransformer", 400), ("vllm-v1", 512),
                        ("maxweight", 128)]),
       st.sampled_from([None, 2, 8]), st.sampled_from([0.0, 0.05, 2.0]), st.booleans(), st.booleans(),
       st.floats(0.3, 1.5), st.integers(0, 50), st.integers(1, 4))
def test_the_compiled_pool_loop_decides_and_runs_as_the_python_loop_many(router, replicas, policy, cap, delay, drain,
                                                                         hetero, load, seed, d):
    check_compiled_pool(router, replicas, *policy, cap, delay, drain, hetero, load, seed,
                        d if router == "power-of-d" else None)


@pytest.mark.parametrize("router, compiled", [("jsq", None), ("power-of-d", False), ("round-robin", None)])
def test_a_pool_run_reports_its_progress_and_the_same_result(router, compiled):
    cfg = pool(3, router, base={**FIG1, "workload": {"rate": 60.0}, "run": {"horizon_s": 200.0, "seed": 2}})
    requests = build_workload(cfg.base).generate(2, horizon_s=200.0)
    seen: list[float] = []
    with_progress = simulate_pool(cfg, requests, compiled=compiled, progress=seen.append)
    assert len(seen) >= 2 and seen == sorted(seen) and 0 <= seen[0] and seen[-1] <= 1
    assert_same_pool_run(with_progress, simulate_pool(cfg, requests, compiled=compiled))


def test_the_compiled_pool_loop_takes_hundreds_of_replicas():
    # (its spec buffers were a fixed array of 128 replicas' worth)
    cfg = pool(300, "jsq", base={**FIG1, "workload": {"arrival": "poisson", "load": 0.9}, "run": {"horizon_s": 2.0,
                                                                                                    "seed": 1}})
    requests = build_workload(cfg.base).generate(1, horizon_s=2.0)
    compiled = simulate_pool(cfg, requests)
    assert compiled.meta["method"] == ["fast"] and len(compiled.results) == 300
    assert_same_pool_run(compiled, simulate_pool(cfg, requests, compiled=False))


def test_power_of_d_draws_its_picks_at_once_as_one_by_one():
    from llmqueue.cluster.routers import PowerOfD

    one, bulk = (PowerOfD(7, np.random.default_rng(5), d=3) for _ in range(2))
    seq = []
    for _ in range(5000):
        seq.append(one.candidates())
        one.choose(View([1.0] * 7), 1, 1, 0)
    mixed = [bulk.candidates()]   # a block begun one by one, then the rest at once, then one by one
    bulk.choose(View([1.0] * 7), 1, 1, 0)
    rest = bulk.picks(4998).tolist()
    assert seq == mixed + rest + [bulk.candidates()]


def test_the_compiled_pool_loop_runs_where_it_can_and_says_why_not():
    cfg = pool(2, "jsq", base={**FIG1, "run": {**FIG1["run"], "method": "reference"}})
    requests = build_workload(cfg.base).generate(3, horizon_s=60.0)
    assert simulate_pool(cfg, requests).meta["method"] == ["reference (selected)"]
    with pytest.raises(ConfigError, match="run.method = 'reference'"):
        simulate_pool(cfg, requests, compiled=True)
    with pytest.raises(ConfigError, match="decides in Python"):
        simulate_pool(pool(2, "jsq"), requests, router=TurnByTurn(2, None), compiled=True)


@pytest.mark.parametrize("router", ["random", "jsq", "power-of-d", "affinity"])
def test_routing_is_deterministic_per_seed_and_changes_with_it(router):
    cfg = pool(4, router, base={**FIG1, "workload": {"rate": 40.0}, "run": {"horizon_s": 30.0, "seed": 1}}, sessions=50)
    requests = build_workload(cfg.base).generate(1, horizon_s=30.0)
    a, b = simulate_pool(cfg, requests), simulate_pool(cfg, requests)
    np.testing.assert_array_equal(a.replica, b.replica)
    assert set(np.unique(a.replica)) == {0, 1, 2, 3}
    if router in ("random", "power-of-d"):
        other = pool(4, router, base={**FIG1, "workload": {"rate": 40.0}, "run": {"horizon_s": 30.0, "seed": 2}})
        assert not np.array_equal(simulate_pool(other, requests).replica, a.replica)


def test_power_of_d_refreshing_only_its_sampled_replicas_decides_as_refreshing_all():
    from llmqueue.cluster.routers import PowerOfD
    from llmqueue.cluster.sim import build_router

    class Eager(PowerOfD):
        def candidates(self):
            return None   # every replica brought up to date before each decision

    cfg = pool(6, "power-of-d", {"d": 2}, base={**FIG1, "workload": {"rate": 70.0}, "run": {"horizon_s": 30.0,
                                                                                            "seed": 4}})
    requests = build_workload(cfg.base).generate(4, horizon_s=30.0)
    lazy = simulate_pool(cfg, requests)
    ref = build_router(cfg)
    eager = Eager(6, ref.rng, d=2)
    eager.capacities = ref.capacities
    full = simulate_pool(cfg, requests, router=eager)
    np.testing.assert_array_equal(lazy.replica, full.replica)
    for a, b in zip(lazy.results, full.results):
        np.testing.assert_array_equal(a.finish_time, b.finish_time)


def test_session_affinity_keeps_each_session_on_one_replica():
    cfg = pool(5, "affinity", base={**FIG1, "workload": {"rate": 40.0}}, sessions=30)
    run = run_pool(cfg)
    seen: dict[int, int] = {}
    for s, j in zip(run.result.session.tolist(), run.result.replica.tolist()):
        assert seen.setdefault(s, j) == j
    assert len(set(seen.values())) > 1
    # consistent hashing: adding a replica moves only the sessions the new one takes over
    grown = pool(6, "affinity", base={**FIG1, "workload": {"rate": 40.0}}, sessions=30)
    keys = np.arange(1000)
    old = cfg.router_cls(5, None, virtual_nodes=100).assign(keys, keys, keys)
    new = grown.router_cls(6, None, virtual_nodes=100).assign(keys, keys, keys)
    moved = old != new
    assert np.all(new[moved] == 5) and 0.05 < moved.mean() < 0.35


def test_stable_hash_is_fixed():
    assert stable_hash(np.array([0, 1, 2])).tolist() == stable_hash(np.array([0, 1, 2])).tolist()
    assert int(stable_hash(np.array([0]))[0]) == 0xE220A8397B1DCDAF   # splitmix64(0): the same on every machine


def test_random_weights_route_the_given_shares():
    base = {**FIG1, "workload": {"rate": 30.0}, "run": {"horizon_s": 100.0, "seed": 0}}
    cfg = pool(3, "random", {"weights": [1, 2, 1]}, base=base)
    run = run_pool(cfg)
    shares = [r["share"] for r in run.summary["replicas"]]
    assert shares == pytest.approx([0.25, 0.5, 0.25], abs=0.02)
    assert run.capacity.shares == pytest.approx([0.25, 0.5, 0.25])
    assert run.capacity.binding == "r1"


HETERO = {"cluster": {"router": "random", "replicas": [
    {"name": "fast", "count": 2},
    {"name": "slow", "count": 2, "batch_time": {"model": "staircase", "c_ms": 22.56, "a_ms": 70.94, "b0": 128}}]},
    "engine": {"scheduler": "sarathi", "token_budget": 512},
    "workload": {"arrival": "poisson", "load": 0.8},
    "run": {"horizon_s": 1200.0, "seed": 0}}


def test_pool_capacity_sums_the_replicas_and_names_the_binding_one():
    cfg = parse_cluster(HETERO)
    cap = pool_capacity(cfg, build_workload(cfg.base))
    fast, slow = cap.capacity_tokens_per_s[0], cap.capacity_tokens_per_s[2]
    assert fast == pytest.approx(2 * slow, rel=1e-9)
    assert cap.pooled_capacity_tokens_per_s == pytest.approx(2 * fast + 2 * slow)
    assert cap.rho == pytest.approx(0.8)
    assert cap.binding == "slow.0" and cap.replica_rho[2] == pytest.approx(1.2)
    assert cap.predicted == "unstable"
    jsq = parse_cluster({**HETERO, "cluster": {**HETERO["cluster"], "router": "jsq"}})
    assert pool_capacity(jsq, build_workload(jsq.base)).predicted == "stable"
    weighted = parse_cluster({**HETERO, "cluster": {**HETERO["cluster"], "router_options": {"weights": "capacity"}}})
    c = pool_capacity(weighted, build_workload(weighted.base))
    assert c.predicted == "stable" and max(c.replica_rho) == pytest.approx(0.8)


@pytest.mark.parametrize("cluster, key, allowed", [
    ({"replicas": 0}, "cluster.replicas", "at least 1 replica"),
    ({"replicas": []}, "cluster.replicas", "at least 1 replica"),
    ({"replicas": "four"}, "cluster.replicas", "an integer"),
    ({"replicas": 2, "router": "fastest"}, "cluster.router", "one of round-robin"),
    ({"replicas": 2, "router": "power-of-d", "router_options": {"d": "two"}}, "cluster.router_options.d",
     "an integer from 1"),
    ({"replicas": 2, "router": "power-of-d", "router_options": {"d": 3}}, "cluster.router_options.d", "from 1 to 2"),
    ({"replicas": 2, "router": "jsq", "router_options": {"d": 2}}, "cluster.router_options.d", "its options: none"),
    ({"replicas": 2, "router": "random", "router_options": {"weights": [1]}}, "cluster.router_options.weights",
     "a list of 2"),
    ({"replicas": 2, "router": "random", "router_options": {"weights": "fast"}}, "cluster.router_options.weights",
     '"capacity"'),
    ({"replicas": 2, "router": "least-kv"}, "cluster.router", "engine.kv_blocks set for every replica"),
    ({"replicas": 2, "report_delay_s": -1}, "cluster.report_delay_s", ">= 0"),
    ({"replicas": 2, "sessions": 0}, "cluster.sessions", "an integer >= 1"),
    ({"replicas": 2, "routers": "jsq"}, "cluster.routers", "a known key"),
    ({"replicas": [{"count": 1}, {"token_budget": 0}]}, "cluster.replicas[1].token_budget", "an integer >= 1"),
    ({"replicas": [{"count": 0}]}, "cluster.replicas[0].count", "an integer >= 1"),
    ({"replicas": [{"speed": 2}]}, "cluster.replicas[0].speed", "a known key"),
])
def test_bad_cluster_input_is_one_error_naming_the_key(cluster, key, allowed):
    with pytest.raises(ConfigError) as exc:
        parse_cluster({**FIG1, "cluster": cluster})
    assert exc.value.field == key and allowed in str(exc.value) and "\n" not in str(exc.value)


def test_a_config_without_cluster_table_is_refused():
    with pytest.raises(ConfigError, match=r"cluster is missing: a \[cluster\] table"):
        parse_cluster(FIG1)


def test_a_router_of_ones_own_in_one_file(tmp_path):
    (tmp_path / "mine.py").write_text(
        "from llmqueue.cluster import Router\n\n"
        "class FirstFree(Router):\n"
        "    name = 'first-free'\n"
        "    options = {'limit': (int, 4, 'an integer')}\n"
        "    def choose(self, view, prompt, output, session):\n"
        "        for j, n in enumerate(view.in_flight):\n"
        "            if n < self.limit:\n"
        "                return j\n"
        "        return min(range(self.replicas), key=view.in_flight.__getitem__)\n")
    data = {**FIG1, "cluster": {"replicas": 3, "router": "mine.py:FirstFree", "router_options": {"limit": 1000}}}
    cfg = parse_cluster(data, tmp_path)
    run = run_pool(cfg)
    assert run.summary["router"] == "first-free"
    assert run.summary["replicas"][0]["share"] > 0.9
    with pytest.raises(ConfigError, match="cluster.router_options.limit"):
        parse_cluster({**data, "cluster": {**data["cluster"], "router_options": {"limit": "x"}}}, tmp_path)
    with pytest.raises(ConfigError, match="a Router subclass named 'Nope'"):
        parse_cluster({**data, "cluster": {"replicas": 3, "router": "mine.py:Nope"}}, tmp_path)
    with pytest.raises(ConfigError, match=r"an existing router file: path/to/router.py:ClassName \(docs/cluster.md\)"):
        parse_cluster({**data, "cluster": {"replicas": 3, "router": "gone.py:X"}}, tmp_path)
    (tmp_path / "broken.py").write_text("import nosuchmodule\n")
    with pytest.raises(ConfigError, match="a router file that imports: .*broken.py:1: ModuleNotFoundError"):
        parse_cluster({**data, "cluster": {"replicas": 3, "router": "broken.py:X"}}, tmp_path)


def test_every_scenario_loads_and_names_a_registered_router():
    from llmqueue.cluster.scenarios import CLUSTER_SCENARIOS

    from llmqueue.cluster.disagg import load_disagg

    for name in CLUSTER_SCENARIOS:
        if name.startswith("pd-"):
            cfg = load_disagg(name)
            assert cfg.prefill.size + cfg.decode.size == 8 and cfg.decode.router in ROUTERS
            continue
        cfg = load_cluster(name)
        assert cfg.router in ROUTERS and cfg.size >= 4
    with pytest.raises(ConfigError, match="cluster.prefill = 'a table' is not allowed: a pool of replicas here"):
        load_cluster("pd-4-4")


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_capacity_simulate_compare_and_scenarios(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "cluster", "capacity", "pool-heterogeneous")
    assert code == 0 and "replica slow.0 binds" in out and "prediction (random): unstable" in out
    code, out, _ = run_cli(capsys, "cluster", "simulate", "pool-jsq", "--set", "run.horizon_s=20", "--set",
                           "cluster.replicas=2", "--json", "--out", str(tmp_path / "o"))
    s = json.loads(out)
    assert code == 0 and s["router"] == "jsq" and len(s["replicas"]) == 2
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["pool"]["arrived"] == s["pool"]["arrived"]
    code, out, _ = run_cli(capsys, "cluster", "compare", "pool-jsq", "--set", "run.horizon_s=20", "--set",
                           "cluster.replicas=2", "--routers", "round-robin,jsq")
    assert code == 0 and "round-robin" in out and "jsq" in out
    code, out, _ = run_cli(capsys, "cluster", "simulate", "pool-heterogeneous", "--set", "run.horizon_s=30",
                           "--plot", str(tmp_path / "pool.png"))
    assert code == 0 and (tmp_path / "pool.png").stat().st_size > 10_000 and "pool verdict" in out
    code, _, err = run_cli(capsys, "cluster", "simulate", "pool-jsq", "--plot", str(tmp_path / "pool.txt"))
    assert code == 2 and err.startswith("llmqueue: error: --plot = ")
    code, out, _ = run_cli(capsys, "cluster", "scenarios")
    assert code == 0 and "pool-agents" in out
    code, out, _ = run_cli(capsys, "cluster", "scenarios", "pool-agents")
    assert code == 0 and "[cluster]" in out


def test_cli_compare_names_a_bad_router_as_the_flag(capsys):
    code, _, err = run_cli(capsys, "cluster", "compare", "pool-jsq", "--routers", "jsq,fastest")
    assert code == 2 and err.startswith("llmqueue: error: --routers = 'fastest' is not allowed: one of round-robin")


@pytest.mark.parametrize("argv, key", [
    (["--set", "cluster.replicas=0"], "cluster.replicas"),
    (["--set", "cluster.router=fastest"], "cluster.router"),
    (["--set", "cluster.router_options.d=2.5"], "cluster.router_options.d"),
])
def test_cli_bad_input_is_one_line_and_exit_2(capsys, argv, key):
    code, out, err = run_cli(capsys, "cluster", "simulate", "pool-power-of-two", *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"llmqueue: error: {key} = ")


# ---- known results ---------------------------------------------------------------------------

UNBATCHED = {"engine": {"scheduler": "orca", "token_budget": 1,
                        "batch_time": {"model": "constant", "duration_ms": 10.0}},
             "workload": {"arrival": "poisson", "load": 0.9, "prompt": {"dist": "fixed", "value": 1},
                          "output": {"dist": "geometric", "mean": 9}},
             "run": {"horizon_s": 150.0, "seed": 1}}


def test_power_of_two_is_near_jsq_and_far_below_random_unbatched():
    # Budget 1: each replica serves one request at a time, ~geometric service of mean 10 batches
    # (an M/M/1-like server): the supermarket model at ρ = 0.9.
    cfg = pool(4, "random", base=UNBATCHED)
    runs = {r.summary["router"]: r.summary["pool"]["e2e_s"]["mean"] for r in compare_routers(cfg, ["random", "jsq",
                                                                                                     "power-of-d"])}
    assert runs["power-of-d"] < 0.5 * runs["random"]
    assert runs["jsq"] <= runs["power-of-d"] < 2.0 * runs["jsq"]


def test_a_reporting_delay_costs_jsq_latency():
    # Finishes reported 1 s late (10 services): the router still counts its own sends at once, so it
    # balances what it sent, but not what the replicas have finished meanwhile.
    base = {**UNBATCHED, "run": {"horizon_s": 100.0, "seed": 1}}
    fresh = run_pool(pool(4, "jsq", base=base)).summary["pool"]["e2e_s"]["mean"]
    stale = run_pool(pool(4, "jsq", base=base, report_delay_s=1.0)).summary["pool"]["e2e_s"]["mean"]
    assert stale > 1.2 * fresh


@pytest.mark.slow
def test_power_of_two_matches_the_supermarket_model_and_random_the_mm1():
    # 16 replicas, ρ = 0.9: Mitzenmacher's limit for d = 2 is Σ_i ρ^(2^i − 2) = 2.61 mean services;
    # random routing is M/M/1: 1/(1 − ρ) = 10 (service ≈ 1 + geometric batches of 10 ms).
    cfg = pool(16, "random", base={**UNBATCHED, "run": {"horizon_s": 300.0, "seed": 2}})
    runs = {r.summary["router"]: r.summary["pool"]["e2e_s"]["mean"] for r in compare_routers(cfg, ["random", "jsq",
                                                                                                     "power-of-d"])}
    service = 0.1
    assert runs["random"] / service == pytest.approx(10.0, rel=0.25)
    assert runs["power-of-d"] / service == pytest.approx(2.61, rel=0.25)
    assert runs["jsq"] < runs["power-of-d"]


@pytest.mark.slow
def test_random_routing_to_identical_replicas_is_independent_engines_at_the_split_rate():
    n = 4
    cfg = pool(n, "random", base={**FIG1, "workload": {"rate": 4 * 12.0}, "run": {"horizon_s": 1200.0, "seed": 5}})
    run = run_pool(cfg)
    single = run_config(parse_cluster({**FIG1, "workload": {"rate": 12.0}, "run": {"horizon_s": 1200.0, "seed": 6},
                                       "cluster": {"replicas": 1}}).base)
    e2e = [r["summary"]["e2e_s"]["mean"] for r in run.summary["replicas"]]
    assert np.mean(e2e) == pytest.approx(single.summary["e2e_s"]["mean"], rel=0.05)
    ttft = [r["summary"]["ttft_s"]["mean"] for r in run.summary["replicas"]]
    assert np.mean(ttft) == pytest.approx(single.summary["ttft_s"]["mean"], rel=0.15)
    assert all(r["summary"]["verdict"] == "stable" for r in run.summary["replicas"])


@pytest.mark.slow
def test_heterogeneous_pool_random_overloads_the_slow_replicas_and_jsq_does_not():
    cfg = parse_cluster(HETERO)
    random_run, jsq_run = compare_routers(cfg, ["random", "jsq"])
    assert random_run.summary["pool"]["verdict"] == "unstable"
    slow = [r for r in random_run.summary["replicas"] if r["replica"].startswith("slow")]
    assert all(r["summary"]["verdict"] == "unstable" for r in slow)
    assert jsq_run.summary["pool"]["verdict"] == "stable"


# ---- prefill/decode disaggregation -----------------------------------------------------------

def pd(prefill=4, decode=4, horizon=40.0, **cluster):
    from llmqueue.cluster.disagg import parse_disagg

    return parse_disagg({**{k: dict(v) for k, v in FIG1.items() if k != "run"},
                         "workload": {"arrival": "poisson", "rate": 72.6}, "run": {"horizon_s": horizon, "seed": 0},
                         "cluster": {"prefill": {"replicas": prefill, "router": "jsq"},
                                     "decode": {"replicas": decode, "router": "round-robin"}, **cluster}})


def test_disaggregated_requests_prefill_then_move_then_decode():
    from llmqueue.cluster.disagg import run_disagg

    cfg = pd(transfer_s=0.25)
    run = run_disagg(cfg)
    s = run.summary
    workload = build_workload(cfg.prefill.base)
    assert s["binding_pool"] == "prefill"
    assert s["max_stable_rate_rps"] == pytest.approx(4 * 512 / ((11.28 + 4 * 35.47) / 1000) / 129, rel=1e-9)
    done = ~np.isnan(run.finish_time)
    assert np.all(run.finish_time[done] >= run.first_token_time[done])
    requests = workload.generate(0, horizon_s=40.0)
    decoded = done & (requests.num_output_tokens > 0)
    # v_d batches of at least c + a each after the transfer
    least = 0.25 + requests.num_output_tokens[decoded] * (11.28 + 35.47) / 1000
    assert np.all(run.finish_time[decoded] - run.first_token_time[decoded] >= least - 1e-9)
    assert s["ttft_s"]["mean"] < s["e2e_s"]["mean"] and s["tpot_s"]["mean"] > 0
    assert s["transfer_s"]["mean"] == 0.25
    by_bytes = pd(kv_bytes_per_token=1e6, link_bytes_per_s=1e9).transfer_durations(np.array([100.0, 129.0]))
    assert by_bytes.tolist() == pytest.approx([0.1, 0.129])


def test_plan_splits_gpus_by_the_pools_capacities():
    from llmqueue.cluster.disagg import plan

    rows = plan(pd(), 8)
    assert (rows[0]["prefill"], rows[0]["decode"]) == (4, 4) and len(rows) == 7
    cap = 512 / ((11.28 + 4 * 35.47) / 1000)
    assert rows[0]["max_stable_rate_rps"] == pytest.approx(4 * cap / 129)
    assert [r["binding"] for r in rows if r["prefill"] == 6] == ["decode"]


@pytest.mark.parametrize("cluster, key, allowed", [
    ({"transfer_s": 0.1, "kv_bytes_per_token": 1.0, "link_bytes_per_s": 1.0}, "cluster.transfer_s", "omitted when"),
    ({"kv_bytes_per_token": 1.0}, "cluster.link_bytes_per_s", "given with the other"),
    ({"link_bytes_per_s": 0, "kv_bytes_per_token": 1.0}, "cluster.link_bytes_per_s", "> 0"),
    ({"decode": {"replicas": 0}}, "cluster.decode.replicas", "at least 1 replica"),
    ({"prefill": {"replicas": [{"kv_blocks": 400}]}}, "cluster.prefill.replicas", "without engine.kv_blocks"),
    ({"prefill": {"replicas": 2, "router": "fastest"}}, "cluster.prefill.router", "one of round-robin"),
    ({"bandwidth": 1}, "cluster.bandwidth", "a known key"),
])
def test_bad_disaggregated_input_names_the_key(cluster, key, allowed):
    from llmqueue.cluster.disagg import parse_disagg

    data = {**FIG1, "cluster": {"prefill": {"replicas": 2}, "decode": {"replicas": 2}, **cluster}}
    with pytest.raises(ConfigError) as exc:
        parse_disagg(data)
    assert exc.value.field == key and allowed in str(exc.value)


def test_cli_runs_the_disaggregated_scenarios(capsys):
    code, out, _ = run_cli(capsys, "cluster", "plan", "pd-4-4", "--gpus", "8")
    assert code == 0 and "best split of 8 GPUs: 4 prefill : 4 decode" in out
    code, out, _ = run_cli(capsys, "cluster", "plan", "pd-4-4", "--gpus", "4", "--bisect", "1", "--json", "--set",
                           "cluster.prefill.router=round-robin", "--set", "cluster.decode.router=round-robin",
                           "--set", "run.horizon_s=200")
    best = json.loads(out)["splits"][0]
    assert code == 0 and (best["prefill"], best["decode"]) == (2, 2)
    # conservative: inconclusive near the boundary fails, so the passing rate is at most λ*_PD
    assert 0.85 * best["max_stable_rate_rps"] < best["simulated"]["passing_rps"] <= best["max_stable_rate_rps"]
    code, out, _ = run_cli(capsys, "cluster", "capacity", "pd-6-2")
    assert code == 0 and "decode pool binds" in out
    code, out, _ = run_cli(capsys, "cluster", "simulate", "pd-4-4", "--set", "run.horizon_s=20", "--json")
    assert code == 0 and json.loads(out)["binding_pool"] == "prefill"


def test_cli_plots_a_disaggregated_run(capsys, tmp_path, drawn):  # noqa: F811
    code, out, err = run_cli(capsys, "cluster", "simulate", "pd-6-2", "--set", "run.horizon_s=20", "--plot",
                           str(tmp_path / "pd.png"))
    assert code == 0, err
    (fig,) = drawn
    check_figure(fig)
    prefill, _, decode, _ = fig.axes
    assert len(prefill.get_lines()) == 6 and len(decode.get_lines()) == 2   # a line per replica of each pool
    assert "prefill pool" in prefill.get_title() and "decode pool" in decode.get_title()


def test_cli_prints_the_decode_pools_memory(capsys, tmp_path):
    from llmqueue.cluster.scenarios import scenario_text

    text = scenario_text("pd-4-4").replace('[cluster.decode]\nreplicas = 4\nrouter = "jsq"\n',
                                           '[cluster.decode]\nrouter = "jsq"\n\n[[cluster.decode.replicas]]\n'
                                           'count = 4\nkv_blocks = 1200\n')
    assert "kv_blocks = 1200" in text
    (tmp_path / "pd.toml").write_text(text)
    code, out, _ = run_cli(capsys, "cluster", "simulate", str(tmp_path / "pd.toml"), "--set", "run.horizon_s=15")
    assert code == 0 and "decode KV memory (4 replicas):" in out and "preemptions" in out
    code, out, _ = run_cli(capsys, "cluster", "simulate", "pd-4-4", "--set", "run.horizon_s=5")
    assert code == 0 and "decode KV memory" not in out


@pytest.mark.slow
def test_the_three_splits_are_stable_only_where_both_pools_keep_up():
    from llmqueue.cluster.disagg import load_disagg, run_disagg

    verdicts = {n: run_disagg(load_disagg(n)).summary for n in ("pd-2-6", "pd-4-4", "pd-6-2")}
    assert verdicts["pd-4-4"]["verdict"] == "stable"
    assert verdicts["pd-2-6"]["prefill"]["pool"]["verdict"] == "unstable"
    assert verdicts["pd-6-2"]["decode"]["pool"]["verdict"] == "unstable"
