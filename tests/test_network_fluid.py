"""Fluid model, virtual stations and the policy advisor of networks (arXiv 2504.07347 §5.4;
docs/network.md, "Fluid model and virtual stations"): closed forms against the exact fluid path,
and predictions against seeded simulations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmqueue.cli import main
from llmqueue.network import analyze_network, load_network, network_timeseries, run_network, simulate_network
from llmqueue.network.fluid import GROWS, decide, fluid_model
from llmqueue.network.overlay import fluid_from_run, wave_peaks
from llmqueue.network.stability import advise, advised_overrides, stability

LAM = 768 * 0.9 / 608          # λ per type at ρ = 0.9 (paper §5.4)
M = 544 / 768                  # a long visit, engine seconds


def _config(la: float, lb: float, three: bool = False, first: str = "B", second: str = "A") -> str:
    """An asymmetric Rybko–Stolyar network (long visits 400 + 32 at S2, 600 + 40 at S1), optionally with a
    third engine S3 that A visits first and class C alone."""
    eng = lambda n, order: (f'[[engines]]\nname = "{n}"\nscheduler = "sarathi"\ntoken_budget = 768\n'
                            'batch_time = { model = "constant", duration_ms = 1000.0 }\n'
                            f'policy = "priority"\nclass_priority = {order}\n\n')
    hop = lambda i, e, p, o: (f'[[classes.hops]]\nid = "{i}"\nengine = "{e}"\nprompt = {{ dist = "poisson", mean = {p} }}\n'
                              f'output = {{ dist = "poisson", mean = {o} }}\n\n')
    s = eng("S1", f'["{first}", "{second}"]') + eng("S2", f'["{second}", "{first}"]')
    if three:
        s += eng("S3", '["A", "C"]')
    s += f'[[classes]]\nname = "A"\nrate = {la}\n\n' + (hop("pre", "S3", 40, 40) if three else "")
    s += hop("short", "S1", 24, 24) + hop("long", "S2", 400, 32)
    s += f'[[classes]]\nname = "B"\nrate = {lb}\n\n' + hop("short", "S2", 24, 24) + hop("long", "S1", 600, 40)
    if three:
        s += '[[classes]]\nname = "C"\nrate = 1.0\n\n' + hop("only", "S3", 200, 100)
    return s


def test_rybko_stolyar_virtual_station_scaling_and_fluid_growth():
    net = load_network("rybko-stolyar")
    a = analyze_network(net)
    st = stability(net, a)
    assert st.verdict == "unstable" and st.predicted.startswith("unstable (virtual station")
    vs = st.virtual_stations[0]
    assert sorted(vs["visits"]) == ["A.long", "B.long"]
    assert vs["load"] == pytest.approx(LAM * (544 + 544) / 768) and round(vs["load"], 2) == 1.61
    assert st.max_scaling == pytest.approx(1 / vs["load"]) and round(st.max_scaling, 3) == 0.621
    assert st.traffic_max_scaling == pytest.approx(1 / 0.9)
    closed = LAM * M / (1 - LAM * M)
    assert closed == pytest.approx(4.135, abs=0.01)
    assert vs["half_cycle_factors"][0] == pytest.approx(closed)
    assert st.fluid["outcome"] == GROWS and st.fluid["growth_factor"] == pytest.approx(closed, rel=1e-6)
    rev = load_network("rybko-stolyar-reverse")
    r = stability(rev, analyze_network(rev))
    assert r.verdict == "stable" and not r.virtual_stations and r.max_scaling == pytest.approx(1 / 0.9)


def test_rybko_stolyar_fluid_growth_factor_matches_the_simulated_peaks():
    """The fluid's ×4.14 per half-cycle against the ratio of successive wave peaks of the simulation
    (each wave: the stretch where one engine holds the larger backlog), seeds 0–2, 20 000 s."""
    closed = LAM * M / (1 - LAM * M)
    ratios = []
    for seed in range(3):
        r = simulate_network(load_network("rybko-stolyar", [f"run.seed={seed}", "run.horizon_s=20000"]))
        waves = wave_peaks(network_timeseries(r, 4000), ["S1", "S2"], floor=50_000)
        assert [w[0] for w in waves[:-1]] != [w[0] for w in waves[1:]]   # they alternate
        ratios += [waves[i + 1][2] / waves[i][2] for i in range(len(waves) - 1)]
    assert len(ratios) >= 6
    mean = float(np.exp(np.mean(np.log(ratios))))
    assert abs(mean / closed - 1) < 0.15, (mean, ratios)


def test_capacity_cli_predicts_and_keeps_the_traffic_bound(capsys):
    assert main(["network", "capacity", "rybko-stolyar", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["predicted"].startswith("unstable (virtual station")
    assert js["max_scaling"] == pytest.approx(0.6209, abs=1e-4)
    assert js["traffic_max_scaling"] == pytest.approx(1 / 0.9)
    assert js["stability"]["virtual_stations"][0]["load"] == pytest.approx(1.6105, abs=1e-4)
    assert main(["network", "capacity", "rybko-stolyar-reverse"]) == 0
    out = capsys.readouterr().out
    assert "prediction: stable (the fluid model drains" in out and "α* = 1.1111" in out
    assert main(["network", "capacity", "rybko-stolyar", "--set", "engines.S1.policy=max-pressure"]) == 0
    assert "prediction: not predicted (max-pressure at S1" in capsys.readouterr().out


CASES = {   # name: (config kwargs, predicted)
    "asym-unstable": (dict(la=1.1, lb=0.75), "unstable"),
    "asym-stable": (dict(la=0.8, lb=0.45), "stable"),
    "three-unstable": (dict(la=1.1, lb=0.75, three=True), "unstable"),
    "three-stable": (dict(la=0.8, lb=0.45, three=True), "stable"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_prediction_and_simulation_agree_over_seeds(name, tmp_path):
    kw, want = CASES[name]
    path = tmp_path / f"{name}.toml"
    path.write_text(_config(**kw))
    net = load_network(path)
    a = analyze_network(net)
    assert a.max_rho < 0.8
    st = stability(net, a)
    assert st.verdict == want
    assert (st.virtual_stations[0]["load"] > 1) == (want == "unstable")
    for seed in range(3):
        n = run_network(load_network(path, [f"run.seed={seed}", "run.horizon_s=3000"]))["network"]
        if want == "unstable":
            assert n["verdict"] == "unstable" and n["peak_backlog_tokens"] > 400_000
        else:
            assert n["verdict"] == "stable" and n["peak_backlog_tokens"] < 100_000


def test_advisor_recommendation_is_bounded_where_the_configured_policy_diverges(tmp_path, capsys):
    path = tmp_path / "asym.toml"
    path.write_text(_config(1.1, 0.75))
    net = load_network(path)
    adv = advise(net, analyze_network(net))
    conf = next(r for r in adv["candidates"] if r["kind"] == "configured")
    best = adv["recommended"]
    assert conf["verdict"] == "unstable" and best["verdict"] == "stable"
    assert best["max_scaling"] > conf["max_scaling"]
    for seed in range(2):
        n = run_network(load_network(path, [*advised_overrides(net, best), f"run.seed={seed}",
                                            "run.horizon_s=3000"]))["network"]
        assert n["verdict"] == "stable" and n["peak_backlog_tokens"] < 100_000
    assert main(["network", "advise", str(path)]) == 0
    out = capsys.readouterr().out
    assert "recommended:" in out and "--set 'engines.S1.policy=" in out


def test_fluid_overlay_follows_the_simulated_backlog(tmp_path):
    r = simulate_network(load_network("rybko-stolyar", ["run.horizon_s=8000"]))
    model, path, t0 = fluid_from_run(r)
    ts = network_timeseries(r)
    t = ts["time_s"]
    late = (t > t0) & (t < t0 + path.times[-1])
    sim = ts["total_backlog_tokens"][late]
    fl = path.at(model, t[late] - t0)
    assert np.max(np.abs(fl - sim)) < 0.15 * sim.max()
    assert main(["network", "simulate", "rybko-stolyar", "--set", "run.horizon_s=3000",
                 "--plot", str(tmp_path / "rs.png")]) == 0
    assert (tmp_path / "rs.png").stat().st_size > 10_000
    assert main(["network", "simulate", "rybko-stolyar", "--plot", str(tmp_path / "rs.txt")]) == 2


def test_where_the_fluid_model_does_not_apply_nothing_is_claimed():
    orca = load_network("fork-join", ["engines.P.scheduler=orca", "engines.W.scheduler=orca"])
    s = stability(orca, analyze_network(orca))
    assert s.verdict == "not predicted" and "orca" in s.reason and s.max_scaling is None
    fj = load_network("fork-join")
    assert stability(fj, analyze_network(fj)).verdict == "stable"
    m = fluid_model(fj, analyze_network(fj))
    assert np.allclose(m.rho(), analyze_network(fj).rho)   # the fluid's loads are the traffic equations'
    assert decide(m).outcome == "drains"
