"""The KV-cache memory bounds (docs/memory.md): Dong & Cao's example, exact moments and block rounding,
the batch-time fixed point by hand, monotonicity, bad input, and the ``capacity`` command's rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from llmqueue.analysis.capacity import analyze
from llmqueue.analysis.memory import (
    block_iterations,
    length_stats,
    lengths_of,
    mean_batch_time,
    memory_analysis,
    memory_rate,
    rate_under_load_cap,
    reserved_iterations,
    token_iterations,
)
from llmqueue.errors import ConfigError
from llmqueue.model.batch_time import Constant, PiecewiseLinear, Staircase, Table, make_batch_time
from llmqueue.model.workload import Fixed, Geometric, LogNormal, Poisson, Uniform, Workload, make_arrivals

STAIR = Staircase(0.01128, 0.03547, 128)   # the paper's fit (seconds)
FIG1 = (Poisson(129, minimum=1), Poisson(112, minimum=0))


# ---- Dong & Cao's example ---------------------------------------------------------------------

def test_dong_cao_three_classes_exactly():
    """(l, o) = (10, 20), (10, 40), (10, 60) at equal rates, M = 16,492 tokens, t̄ = 1 iteration:
    w = 410 + 1220 + 2430 = 4060, so λ* = 16492 / 4060 = 4.0621 per class per iteration."""
    assert token_iterations([10, 10, 10], [20, 40, 60]).tolist() == [410, 1220, 2430]
    r = memory_rate(16492, [10, 10, 10], [20, 40, 60])
    per_class = r.necessary_rate / 3
    assert per_class == pytest.approx(16492 / 4060, rel=1e-15)
    assert round(per_class, 4) == 4.0621
    assert r.iteration_time == 1.0 and r.mean_work == pytest.approx(4060 / 3)
    assert r.delta == pytest.approx(70 / 16492)                 # ess sup (l + o) = 70 tokens
    assert r.sufficient_rate == pytest.approx(r.necessary_rate * (1 - 70 / 16492))
    # weights are the classes' shares of the arrivals: unequal shares move the total rate
    skewed = memory_rate(16492, [10, 10, 10], [20, 40, 60], weights=[2, 1, 1])
    assert skewed.necessary_rate == pytest.approx(16492 / ((2 * 410 + 1220 + 2430) / 4))
    # the engine-level function with one-second iterations gives the same numbers
    a = memory_analysis(Constant(1.0), 10**6, 16492 + 1, ([10, 10, 10], [20, 40, 60]), block_size=1)
    assert a.memory_necessary_rps / 3 == pytest.approx(16492 / 4060, rel=1e-12)
    assert a.memory_necessary_blocks_rps == pytest.approx(a.memory_necessary_rps, rel=1e-12)


def test_iteration_time_scales_the_rate():
    assert memory_rate(1000, [5], [10], iteration_time=0.5).necessary_rate == pytest.approx(
        2 * memory_rate(1000, [5], [10]).necessary_rate)


# ---- per-request memory ----------------------------------------------------------------------

@pytest.mark.parametrize("b", [1, 3, 16, 128])
def test_block_and_reserve_iterations_match_brute_sums(b):
    rng = np.random.default_rng(b)
    l, o = rng.integers(0, 400, 300), rng.integers(0, 300, 300)
    brute_blocks = [sum(math.ceil((li + j) / b) for j in range(1, oi + 1)) for li, oi in zip(l, o)]
    brute_tokens = [sum(li + j for j in range(1, oi + 1)) for li, oi in zip(l, o)]
    assert block_iterations(l, o, b).tolist() == brute_blocks
    assert token_iterations(l, o).tolist() == brute_tokens
    assert reserved_iterations(l, o).tolist() == (o * (l + o)).tolist()
    assert reserved_iterations(l, o, b).tolist() == [oi * math.ceil((li + oi) / b) for li, oi in zip(l, o)]
    assert (block_iterations(l, o, b) * b >= token_iterations(l, o)).all()   # blocks round up


def test_block_iterations_are_exact_for_huge_lengths():
    l, o = 2**40, 3
    assert block_iterations([l], [o], 16)[0] == sum(math.ceil((l + j) / 16) for j in range(1, 4))


# ---- exact moments of the length laws --------------------------------------------------------

def _brute(pmf, k, lo, hi, power):
    x = np.clip(k, lo, np.inf if hi is None else hi).astype(float)
    return float(x**power @ pmf(k))


@pytest.mark.parametrize("law,pmf", [
    (Poisson(129, minimum=1), lambda k: stats.poisson.pmf(k, 129)),
    (Poisson(0.5, minimum=1), lambda k: stats.poisson.pmf(k, 0.5)),
    (Poisson(112, minimum=0, maximum=100), lambda k: stats.poisson.pmf(k, 112)),
    (Geometric(112, minimum=0), lambda k: np.where(k >= 1, (1 / 112) * (1 - 1 / 112) ** np.maximum(k - 1, 0), 0)),
    (Geometric(20, minimum=1, maximum=30), lambda k: np.where(k >= 1, 0.05 * 0.95 ** np.maximum(k - 1, 0), 0)),
    (Uniform(5, 9, minimum=1, maximum=6), lambda k: np.where((k >= 5) & (k <= 9), 0.2, 0)),
    (Fixed(100, minimum=1, maximum=50), lambda k: (k == 100).astype(float)),
])
def test_second_moment_matches_pmf_sum(law, pmf):
    k = np.arange(0, 20_000)
    assert law.second_moment == pytest.approx(_brute(pmf, k, law.minimum, law.maximum, 2), rel=1e-12)


@pytest.mark.parametrize("mean,sigma,lo,hi", [(129, 0.8, 1, None), (129, 0.8, 1, 300), (3, 1.5, 0, None)])
def test_lognormal_second_moment_matches_rounded_pmf_sum(mean, sigma, lo, hi):
    law = stats.lognorm(s=sigma, scale=math.exp(math.log(mean) - sigma**2 / 2))
    k = np.arange(0, 4_000_000)
    exact = _brute(lambda x: law.cdf(x + 0.5) - law.cdf(x - 0.5), k, lo, hi, 2)
    assert LogNormal(mean, sigma, minimum=lo, maximum=hi).second_moment == pytest.approx(exact, rel=1e-7)


def test_empirical_second_moment(tmp_path):
    from llmqueue.model.workload import Empirical

    path = tmp_path / "lengths.csv"
    path.write_text("n\n3\n5\n100\n")
    d = Empirical(str(path), "n", minimum=1, maximum=50)
    assert d.second_moment == pytest.approx((9 + 25 + 2500) / 3)


# ---- statistics of laws: exact against joint enumeration --------------------------------------

def _joint(p_vals, p_prob, o_vals, o_prob, b, policy):
    l, o = np.meshgrid(p_vals, o_vals, indexing="ij")
    w = np.outer(p_prob, o_prob).ravel()
    l, o = l.ravel(), o.ravel()
    tokens = token_iterations(l, o) if policy == "recompute" else reserved_iterations(l, o)
    blocks = block_iterations(l, o, b) if policy == "recompute" else reserved_iterations(l, o, b)
    return float(w @ tokens), float(w @ blocks)


@pytest.mark.parametrize("policy", ["recompute", "reserve"])
@pytest.mark.parametrize("b", [1, 7, 16])
def test_length_stats_of_laws_equal_the_joint_sum(policy, b):
    cases = [
        (Fixed(10, minimum=1), Fixed(20, minimum=0), [10], [1.0], [20], [1.0]),
        (Uniform(1, 40, minimum=1), Uniform(0, 70, minimum=0, maximum=50),
         np.arange(1, 41), np.full(40, 1 / 40), np.arange(0, 51), np.r_[np.full(50, 1 / 71), 21 / 71]),
    ]
    k = np.arange(0, 400)
    pp, po = stats.poisson.pmf(k, 7), stats.poisson.pmf(k, 20)
    pp = np.r_[pp[0] + pp[1], pp[2:]]            # Poisson(7) clipped at 1
    cases.append((Poisson(7, minimum=1), Poisson(20, minimum=0), k[1:], pp, k, po))
    for p, o, pv, pw, ov, ow in cases:
        s = length_stats(p, o, block_size=b, kv_policy=policy)
        tokens, blocks = _joint(np.asarray(pv), np.asarray(pw), np.asarray(ov), np.asarray(ow), b, policy)
        assert s.exact
        assert s.work_tokens == pytest.approx(tokens, rel=1e-12)
        assert s.work_blocks == pytest.approx(blocks, rel=1e-12)
        assert s.mean_request_tokens == pytest.approx(p.mean + o.mean)


def test_length_stats_of_rows_are_weighted_means():
    l, o = np.array([1, 50, 200]), np.array([0, 7, 90])
    s = length_stats(l, o, weights=[1, 2, 1], block_size=16)
    w = np.array([0.25, 0.5, 0.25])
    assert s.work_tokens == pytest.approx(w @ token_iterations(l, o))
    assert s.work_blocks == pytest.approx(w @ block_iterations(l, o, 16))
    assert s.max_request_tokens == 290 and s.mean_request_tokens == pytest.approx(w @ (l + o))


def test_unbounded_laws_have_no_sufficient_bound_and_bounded_ones_do():
    a = memory_analysis(STAIR, 512, 1000, FIG1)
    assert a.memory_sufficient_rps is None and "unbounded" in a.sufficient_reason
    bounded = (Poisson(129, minimum=1, maximum=300), Uniform(1, 200, minimum=0))
    b = memory_analysis(STAIR, 512, 1000, bounded)
    assert b.delta == pytest.approx(500 / 15984) and b.delta_blocks == pytest.approx(32 / 999)
    assert 0 < b.memory_sufficient_blocks_rps <= b.memory_necessary_blocks_rps
    assert b.memory_sufficient_rps <= b.memory_necessary_rps
    reserve = memory_analysis(STAIR, 512, 1000, bounded, kv_policy="reserve")
    assert reserve.memory_sufficient_rps is None and "reserv" in reserve.sufficient_reason
    assert reserve.memory_necessary_blocks_rps <= b.memory_necessary_blocks_rps   # reservations hold more


# ---- the fixed point t̄ = t_b(b̄), by hand --------------------------------------------------

def test_fixed_point_on_affine_batch_time():
    """t_b = c + a·b: t̄ = c + a·D·t̄, so t̄ = c / (1 − a·D) (D = λ·E[l + o] tokens/s)."""
    c, a, m = 0.01, 0.0002, 241.0
    bt = PiecewiseLinear(c, a, 0)
    for lam in (2.0, 10.0, 15.0):
        t, b = mean_batch_time(bt, 10_000, lam, m)
        assert t == pytest.approx(c / (1 - a * lam * m), rel=1e-12)
        assert b == pytest.approx(lam * m * t, rel=1e-12)
    # memory: b / t_b(b) increases, so λ_mem = b_mem / (m · t_b(b_mem))
    assert rate_under_load_cap(bt, 10_000, 300.0, m) == pytest.approx(300 / (m * (c + a * 300)), rel=1e-12)


def test_fixed_point_on_the_staircase():
    m = 241.0
    t, b = mean_batch_time(STAIR, 512, 2000 / m, m)     # one step: b = 2000 · 46.75 ms = 93.5 <= 128
    assert t == pytest.approx(0.04675) and b == pytest.approx(93.5)
    t, b = mean_batch_time(STAIR, 512, 3000 / m, m)     # 140.25 > 128, two steps: 3000 · 82.22 ms = 246.66
    assert t == pytest.approx(0.08222) and b == pytest.approx(246.66)
    t, b = mean_batch_time(STAIR, 512, 3400 / m, m)     # above capacity 3342.9 tokens/s: full batches
    assert t == pytest.approx(0.15316) and b == 512
    t, b = mean_batch_time(STAIR, 512, 1e-3, m)         # almost idle: one-token batches
    assert t == pytest.approx(0.04675) and b == 1.0
    # between steps the best load under a cap of 200 tokens is a full first step (128 / 46.75 ms)
    assert rate_under_load_cap(STAIR, 512, 200.0, m) == pytest.approx(128 / 0.04675 / m)
    assert rate_under_load_cap(STAIR, 512, 370.0, m) == pytest.approx(370 / 0.11769 / m)
    assert rate_under_load_cap(STAIR, 512, 512.0, m) == pytest.approx(analyze(STAIR, 512, 1, 129, 112)
                                                                      .max_stable_rate_rps)


def test_fixed_point_on_a_table_and_a_constant():
    table = Table(np.array([1.0, 100.5, 600.0]), np.array([0.01, 0.02, 0.08]))
    t, b = mean_batch_time(table, 512, 10.0, 241.0)
    assert b == pytest.approx(2410.0 * t, rel=1e-12) and t == pytest.approx(float(table.seconds(np.array([b]))[0]))
    t, b = mean_batch_time(Constant(0.05), 512, 10.0, 241.0)
    assert t == 0.05 and b == pytest.approx(120.5)


def test_fixed_point_is_monotone_in_the_rate():
    for bt in (STAIR, PiecewiseLinear(0.01, 0.0001, 64), make_batch_time({"model": "staircase", "b0": 100})):
        rates = np.linspace(0.01, 20, 400)
        t = [mean_batch_time(bt, 512, r, 241.0)[0] for r in rates]
        b = [mean_batch_time(bt, 512, r, 241.0)[1] for r in rates]
        assert np.all(np.diff(t) >= 0) and np.all(np.diff(b) >= 0)


# ---- the engine's bounds -----------------------------------------------------------------------

def test_fig1_memory_bounds_by_hand():
    """Fig. 1 workload: E[l + o] = 241, E[w] = 129·112 + (112 + 112 + 112²)/2 = 20,832."""
    a = memory_analysis(STAIR, 512, 1000, FIG1, arrival_rate=10.0)
    assert a.mean_request_tokens == pytest.approx(241.0)
    assert a.work_tokens == pytest.approx(20832.0)
    assert a.memory_tokens == 999 * 16
    assert a.memory_load_cap_tokens == pytest.approx(15984 * 241 / 20832)
    assert a.memory_necessary_rps == pytest.approx(128 / 0.04675 / 241)   # b_mem 184.9: a full first step
    assert a.binding == "memory" and a.max_stable_rate_rps == a.memory_necessary_blocks_rps
    assert a.token_bound_rps == pytest.approx(512 / 0.15316 / 241)
    # block rounding adds (B − 1)·E[o]/2 token-iterations (up to residue terms that vanish here)
    assert a.work_blocks * 16 == pytest.approx(20832 + 15 * 112 / 2, rel=1e-6)
    assert a.memory_rho == pytest.approx(10 * a.work_blocks * a.batch_time_s / 999)
    big = memory_analysis(STAIR, 512, 4000, FIG1)
    assert big.binding == "tokens" and big.max_stable_rate_rps == pytest.approx(big.token_bound_rps)
    assert big.memory_necessary_rps == pytest.approx(3999 * 16 / (20832 * 0.15316))   # b_mem > b_max


def test_memory_bounds_are_monotone():
    prev = prev_b = 0.0
    for kv in (50, 200, 500, 1000, 1500, 2000, 3000, 5000, 10_000):
        a = memory_analysis(STAIR, 512, kv, FIG1)
        assert a.memory_necessary_blocks_rps <= a.memory_necessary_rps      # blocks hold more than tokens
        assert a.memory_necessary_rps >= prev and a.memory_necessary_blocks_rps >= prev_b
        assert a.max_stable_rate_rps == min(a.token_bound_rps, a.memory_necessary_blocks_rps)
        prev, prev_b = a.memory_necessary_rps, a.memory_necessary_blocks_rps
    # at the memory bound the cache is exactly full at balance (affine t_b: no steps to jump)
    bt = PiecewiseLinear(0.01, 0.0002, 0)
    a = memory_analysis(bt, 4096, 1000, FIG1)
    lam = a.memory_necessary_blocks_rps
    t, b = mean_batch_time(bt, 4096, lam, 241.0)
    assert lam * a.work_blocks * t == pytest.approx(999, rel=1e-9)


def test_workloads_and_traces_give_their_lengths():
    w = Workload(make_arrivals({"arrival": "poisson", "rate": 5.0}), *FIG1)
    assert lengths_of(w) == FIG1
    a = memory_analysis(STAIR, 512, 1000, w)
    assert a.arrival_rate == 5.0 and a.batch_time_s is not None


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("call,field", [
    (lambda: memory_analysis(STAIR, 512, 1, FIG1), "engine.kv_blocks"),
    (lambda: memory_analysis(STAIR, 512, 100, FIG1, block_size=0), "engine.block_size"),
    (lambda: memory_analysis(STAIR, 512, 100, FIG1, kv_policy="evict"), "engine.kv_policy"),
    (lambda: memory_analysis(STAIR, 512, 100, "lengths"), "memory.lengths"),
    (lambda: memory_rate(0, [1], [1]), "memory"),
    (lambda: memory_rate(100, [1], [1], iteration_time=-1), "iteration_time"),
    (lambda: memory_rate(100, [1, 2], [1]), "memory.output"),
    (lambda: memory_rate(100, [1.5], [1]), "memory.prompt"),
    (lambda: memory_rate(100, [-1], [1]), "memory.prompt"),
    (lambda: memory_rate(100, [], []), "memory.prompt"),
    (lambda: memory_rate(100, [1, 2], [1, 2], weights=[1]), "memory.weights"),
    (lambda: memory_rate(100, [1, 2], [1, 2], weights=[0, 0]), "memory.weights"),
])
def test_bad_input_names_the_key(call, field):
    with pytest.raises(ConfigError) as exc:
        call()
    assert exc.value.field == field


def test_a_request_longer_than_the_cache_is_noted():
    a = memory_analysis(STAIR, 512, 3, ([40], [20]))
    assert a.memory_sufficient_rps is None and "longest request" in a.sufficient_reason
    assert any("never finish" in n for n in a.notes)


# ---- the capacity command ---------------------------------------------------------------------

def _capacity(monkeypatch, capsys, tmp_path, *extra, engine=None):
    """``llmqueue capacity`` on the Fig. 1 scenario, with ``engine`` keys set on the parsed config (the
    config schema's KV keys are another change; this runs the command's own path)."""
    from llmqueue.cli import main, single
    from llmqueue.scenarios import scenario_data
    from llmqueue.config import parse_config

    cfg = parse_config(scenario_data("fig1"))
    cfg.engine.update(engine or {})
    monkeypatch.setattr(single, "config_from", lambda source, overrides: cfg)
    code = main(["capacity", "fig1", *extra])
    return code, capsys.readouterr().out


def test_capacity_prints_the_memory_bounds(monkeypatch, capsys, tmp_path):
    code, plain = _capacity(monkeypatch, capsys, tmp_path)
    assert code == 0 and "KV cache" not in plain and "memory" not in plain
    code, out = _capacity(monkeypatch, capsys, tmp_path, engine={"kv_blocks": 1000})
    assert code == 0 and out.startswith(plain)                     # Theorem 2's rows as before, then memory
    assert "memory bound λ_mem (necessary)    11.3609 requests/s" in out
    assert "binding bound" in out and "memory: λ ≤ 11.3609" in out
    code, out = _capacity(monkeypatch, capsys, tmp_path, "--json", engine={"kv_blocks": 4000, "block_size": 16,
                                                                         "kv_policy": "recompute"})
    d = json.loads(out)
    assert d["memory"]["binding"] == "tokens" and d["memory"]["kv_blocks"] == 4000
    assert d["memory"]["token_bound_rps"] == pytest.approx(d["max_stable_rate_rps"])
    assert set(d["memory"]["sources"]) >= {"token_bound_rps", "memory_necessary_rps", "memory_sufficient_rps"}
    code, out = _capacity(monkeypatch, capsys, tmp_path, "--json")
    assert "memory" not in json.loads(out)


def test_capacity_with_kv_keys_in_the_config(capsys, tmp_path):
    from llmqueue.cli import main
    from llmqueue.config import parse_config
    from llmqueue.scenarios import scenario_data

    data = scenario_data("fig1")
    data["engine"]["kv_blocks"] = 2000
    try:
        parse_config(data)
    except ConfigError:
        pytest.skip("the config schema has no engine.kv_blocks yet")
    code = main(["capacity", "fig1", "--set", "engine.kv_blocks=2000", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert code == 0 and d["memory"]["kv_blocks"] == 2000 and d["memory"]["binding"] == "memory"


def test_a_trace_uses_its_joint_lengths(tmp_path):
    from llmqueue.model.workload import load_trace

    path = tmp_path / "trace.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,100,5\n0.5,20,300\n1.0,64,64\n")
    trace = load_trace(path)
    l, o = np.array([100, 20, 64]), np.array([5, 300, 64])
    a = memory_analysis(STAIR, 512, 500, Workload(trace))
    assert a.work_tokens == pytest.approx(token_iterations(l, o).mean())      # E[l·o] of the rows, not E[l]·E[o]
    assert a.work_blocks == pytest.approx(block_iterations(l, o, 16).mean())
    assert a.delta == pytest.approx(320 / (499 * 16)) and a.arrival_rate == pytest.approx(3.0)
    half = Workload(trace, output=Fixed(10, minimum=0))                     # a law replaces the outputs
    assert memory_analysis(STAIR, 512, 500, half).work_tokens == pytest.approx(l.mean() * 10 + (10 + 100) / 2)
