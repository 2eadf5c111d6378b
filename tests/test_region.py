"""The 2-D stability region under a request cap (arXiv 2504.07347 §6, Theorem 10).

Vertices are pinned for the paper's staircase, the region is checked against a brute-force
linear program over every feasible batch type, it reduces to Theorem 2's line without a cap,
and membership agrees with long simulations of a work-conserving scheduler.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from llmqueue.analysis import capacity
from llmqueue.model.batch_time import make_batch_time
from llmqueue.cli import main
from llmqueue.config import parse_config
from llmqueue.errors import ConfigError
from llmqueue.analysis.region import BOUNDARY, INSIDE, OUTSIDE, served_rates, stability_region
from llmqueue.runner import run_config

T128 = 0.04675  # the paper's staircase at 128 tokens: 11.28 + 35.47 ms
PIECEWISE = {"model": "piecewise_linear", "c_ms": 10.0, "a_ms_per_token": 0.05, "b0": 256}
TABLE = {"model": "table", "points_ms": [[1, 10.0], [100, 12.0], [500, 40.0], [1000, 90.0]]}
CONSTANT = {"model": "constant", "duration_ms": 5.0}


def types(region):
    return [(v.batch.num_prefill_tokens, v.batch.num_decode_tokens) if v.batch else None for v in region.vertices]


@pytest.mark.parametrize("budget", [128, 512, 1024])
def test_vertex_c_of_the_paper_staircase(budget):
    region = stability_region(None, budget, 100)
    c = region.vertices[1]
    assert (c.batch.num_prefill_tokens, c.batch.num_decode_tokens, c.batch.num_tokens) == (29, 99, 128)
    assert c.prefill_rate == pytest.approx(29 / T128, rel=1e-12)     # 0.6203 tokens/ms
    assert c.decode_rate == pytest.approx(99 / T128, rel=1e-12)      # 2.1176 tokens/ms
    assert region.vertices[0].batch.num_decode_tokens == 100 and region.vertices[0].prefill_rate == 0
    full = budget / (0.01128 + 0.03547 * budget / 128)
    assert region.vertices[-1].prefill_rate == pytest.approx(full, rel=1e-12)
    assert region.vertices[-1].decode_rate == 0


def test_vertices_for_budgets_128_512_1024():
    assert types(stability_region(None, 128, 100)) == [(0, 100), (29, 99), (128, 0)]
    # The mixed types (128j - 99, 99) are collinear, so only the two ends are vertices.
    assert types(stability_region(None, 512, 100)) == [(0, 100), (29, 99), (413, 99), (512, 0)]
    assert types(stability_region(None, 1024, 100)) == [(0, 100), (29, 99), (925, 99), (1024, 0)]


def test_point_c_lies_on_the_boundary():
    for budget in (128, 1024):
        pos = stability_region(None, budget, 100).locate(1 / 0.4675, 290, 990)
        assert pos.status == BOUNDARY and pos.rho == pytest.approx(1, abs=1e-12)
        assert pos.max_stable_rate_rps == pytest.approx(1 / 0.4675, rel=1e-12)
        assert pos.edge[1].batch.num_tokens == 128 and pos.edge_time_share == pytest.approx(0, abs=1e-9)
    region = stability_region(None, 1024, 100)
    assert region.locate(0.9 / 0.4675, 290, 990).status == INSIDE
    assert region.locate(1.1 / 0.4675, 290, 990).status == OUTSIDE
    assert region.contains(620, 2117) and not region.contains(621, 2118)


@pytest.mark.parametrize("spec", [None, PIECEWISE, TABLE, CONSTANT,
                                  {"model": "staircase", "c_ms": 11.28, "a_ms": 35.47, "b0": 128}])
@pytest.mark.parametrize("budget", [500, 512, 4096])
def test_no_cap_is_theorem2_line(spec, budget):
    bt = make_batch_time(spec)
    region = stability_region(bt, budget)
    _, cap, peak, _ = capacity(bt, budget)
    assert len(region.vertices) == 2
    assert region.max_prefill_rate == pytest.approx(peak, rel=1e-12)
    assert region.max_decode_rate == pytest.approx(peak, rel=1e-12)
    # Under Assumption 1 (b0 divides b_max) that is Theorem 2's b_max / t_{b_max}.
    if spec is None and budget % 128 == 0:
        assert peak == pytest.approx(cap, rel=1e-12)
    assert region.gauge(peak / 2, peak / 2) == pytest.approx(1, rel=1e-12)
    assert stability_region(bt, budget, budget).vertices == region.vertices   # cap = b_max never binds


@pytest.mark.parametrize("spec", [None, PIECEWISE, TABLE, CONSTANT])
@pytest.mark.parametrize("cap", [None, 1, 100, 4096])
def test_large_budgets(spec, cap):
    region = stability_region(spec, 65_536, cap)
    u = [v.prefill_rate for v in region.vertices]
    w = [v.decode_rate for v in region.vertices]
    assert u[0] == 0 and w[-1] == 0
    assert np.all(np.diff(u) > 0) and np.all(np.diff(w) < 0)
    slopes = np.diff(w) / np.diff(u)
    assert np.all(np.diff(slopes) < 0)   # strictly concave: no redundant vertex


def brute_force_rho(batch_time, budget, cap, z, chunk=None):
    """max s with s·z in conv(types ∪ {0}) closed downward, by an LP over every feasible type
    (x prefill tokens from ceil(x / chunk) requests, or one when chunk is None)."""
    t = batch_time.table(budget)
    k = budget if cap is None else cap
    slots = (lambda x: x > 0) if chunk is None else (lambda x: -(-x // chunk))
    pts = [(x / t[x + y], y / t[x + y]) for x in range(budget + 1) for y in range(budget + 1 - x)
           if x + y >= 1 and y + slots(x) <= k]
    r = np.array(pts).T                               # 2 x n
    n = r.shape[1]
    # variables: α_1..α_n, s; maximise s s.t. s·z <= R α, Σα <= 1, α >= 0.
    c = np.zeros(n + 1)
    c[-1] = -1
    a_ub = np.vstack([np.hstack([-r, np.array(z)[:, None]]), np.hstack([np.ones(n), [0]])])
    res = linprog(c, A_ub=a_ub, b_ub=[0, 0, 1], bounds=[(0, None)] * (n + 1), method="highs")
    return 1 / res.x[-1]


@settings(max_examples=80, deadline=None)
@given(budget=st.integers(1, 24), cap=st.none() | st.integers(1, 24),
       times=st.lists(st.floats(0.5, 5.0), min_size=24, max_size=24),
       direction=st.floats(0.02, 0.98), staircase=st.booleans(), chunk=st.none() | st.integers(1, 30))
def test_region_matches_brute_force_lp(budget, cap, times, direction, staircase, chunk):
    if cap is not None and cap > budget:
        cap = budget
    if staircase:
        bt = make_batch_time({"model": "staircase", "c_ms": times[0], "a_ms": times[1], "b0": 1 + int(times[2])})
    else:   # an arbitrary (even decreasing) measured table
        bt = make_batch_time({"model": "table", "points_ms": [[b + 1, times[b]] for b in range(24)]})
    z = (direction, 1 - direction)
    region = stability_region(bt, budget, cap, chunk)
    assert region.gauge(*z) == pytest.approx(brute_force_rho(bt, budget, cap, z, chunk), rel=1e-6)


def test_bad_inputs():
    with pytest.raises(ConfigError, match=r"engine.max_batch_requests = 0 is not allowed"):
        stability_region(None, 512, 0)
    with pytest.raises(ConfigError, match=r"engine.max_batch_requests = 513 is not allowed: at most engine.token_budget = 512"):
        stability_region(None, 512, 513)
    with pytest.raises(ConfigError, match=r"engine.batch_time.model = 'quadratic' is not allowed"):
        stability_region({"model": "quadratic"}, 512, 100)
    with pytest.raises(ConfigError, match=r"engine.token_budget = 0"):
        stability_region(None, 0, None)
    with pytest.raises(ConfigError, match=r"token load only"):
        stability_region({"model": "prefill_decode", "c_ms": 1.0, "prefill_ms_per_token": 0.1,
                          "decode_ms_per_token": 0.2}, 512, 100)


def test_cli_errors_are_one_line(capsys):
    for override in ("engine.max_batch_requests=0", "engine.max_batch_requests=129", "engine.batch_time.model=foo"):
        assert main(["region", "point-c", "--set", override]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("llmqueue: error: engine.")
    assert main(["region", "point-c", "--schedulers", "sarathi,nope"]) == 2  # checked even without --plot
    assert "'nope' is not a scheduler" in capsys.readouterr().err


def test_region_command_json_and_plot(capsys, tmp_path):
    assert main(["region", "point-c", "--set", "engine.token_budget=1024", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_batch_requests"] == 100 and len(out["vertices"]) == 4
    assert out["vertices"][1]["batch"]["num_tokens"] == 128
    assert out["position"]["status"] == "boundary" and out["achieved"] == []
    png = tmp_path / "region.png"
    assert main(["region", "point-c", "--set", "engine.token_budget=1024", "--set", "run.horizon_s=120",
                 "--plot", str(png), "--schedulers", "sarathi,maxweight"]) == 0
    text = capsys.readouterr().out
    assert png.stat().st_size > 10_000
    assert "vertex" in text and "maxweight served" in text and "sarathi served" in text


def test_capacity_uses_the_region_under_a_cap(capsys):
    assert main(["capacity", "point-c", "--set", "engine.token_budget=1024"]) == 0
    text = capsys.readouterr().out
    assert "basis: the 2-D stability region" in text and "29 + 99 = 128 tokens" in text
    assert main(["capacity", "point-c", "--set", "engine.token_budget=1024", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["basis"].startswith("region")
    assert out["rho"] == pytest.approx(1, abs=1e-12)            # on vertex C
    assert out["theorem2"]["rho"] == pytest.approx(2737.97 / 3470.72, rel=1e-4)   # Theorem 2 alone: 0.79
    assert out["max_stable_rate_rps"] == pytest.approx(1 / 0.4675, rel=1e-12)
    assert main(["capacity", "fig1", "--json"]) == 0   # no cap: Theorem 2 as before
    assert "basis" not in json.loads(capsys.readouterr().out)


def _sarathi_128(mean_prompt, mean_output, rho, horizon, seed=0, records=False):
    region = stability_region(None, 128, 100)
    rate = rho / region.gauge(mean_prompt, mean_output)
    return run_config(parse_config({
        "engine": {"scheduler": "sarathi", "token_budget": 128, "max_batch_requests": 100},
        "workload": {"arrival": "poisson", "rate": rate, "prompt": {"dist": "poisson", "mean": mean_prompt},
                     "output": {"dist": "poisson", "mean": mean_output}},
        "run": {"horizon_s": horizon, "seed": seed, "record_batches": records}}))


@pytest.mark.parametrize("shape", [(290, 990), pytest.param((2000, 100), marks=pytest.mark.slow)])
def test_membership_agrees_with_simulation(shape):
    """Sarathi-128 (work-conserving, and the region's types at b_max = 128 are full batches)
    keeps up clearly inside the region and falls behind clearly outside, on a decode-heavy and
    a prefill-heavy ray."""
    inside = _sarathi_128(*shape, 0.8, 1200.0)
    assert inside.summary["verdict"] == "stable", inside.summary["verdict_reason"]
    outside = _sarathi_128(*shape, 1.15, 900.0, records=True)
    assert outside.summary["verdict"] == "unstable", outside.summary["verdict_reason"]
    # Above the boundary the served rates sit on it (within the noise of one run).
    region = stability_region(None, 128, 100)
    assert region.gauge(*served_rates(outside.result)) == pytest.approx(1, abs=0.03)


def test_served_rates_needs_batch_records():
    run = _sarathi_128(290, 990, 0.5, 20.0, records=True)
    run.result.batches = None
    with pytest.raises(ConfigError, match="run.record_batches"):
        served_rates(run.result)


def test_prefill_chunk_limit(capsys):
    """Beyond Theorem 10: prompts of at most L tokens need ceil(x/L) slots for x prefill tokens."""
    plain = stability_region(None, 1024, 100)
    assert types(stability_region(None, 1024, 100, 2000)) == types(plain)   # L >= b_max: no effect
    assert types(stability_region(None, 1024, 100, 600)) == [(0, 100), (29, 99), (541, 99), (926, 98), (1024, 0)]
    assert main(["region", "fig1", "--set", "engine.max_batch_requests=64"]) == 0
    assert "needs one request to give 449 prefill tokens" in capsys.readouterr().out
    assert main(["region", "fig1", "--set", "engine.max_batch_requests=64", "--max-chunk", "129", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_prefill_chunk"] == 129
    assert [v["batch"]["num_prefill_tokens"] for v in out["vertices"]] == [0, 65, 452, 512]
