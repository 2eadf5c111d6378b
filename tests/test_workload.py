"""Workload: length laws, arrival processes, trace loading and replay (arXiv 2504.07347 §3.1).

Statistical checks are seeded (so they are deterministic) and use a tolerance of 5 standard
errors: were the seed drawn at random, a correct implementation would fail one such check with
probability below 1e-6, while a wrong mean (e.g. clipping left out of ``.mean``) is off by many.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from llmqueue.errors import ConfigError, TraceError
from llmqueue.model.workload import (ArrivalProcess, DeterministicArrivals, Empirical, Fixed, GammaArrivals, Geometric,
                               LengthDist, LogNormal, Poisson, PoissonArrivals, Requests, Trace, Uniform,
                               Workload, load_trace, make_arrivals, make_length)

TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
ARXIV = "vidur_arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"
VIDUR_HEADER = "arrived_at,num_prefill_tokens,num_decode_tokens\n"
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def shared(name: str) -> Path:
    path = TRACES / name
    if not path.exists():
        pytest.skip(f"shared trace {path} not present")
    return path


def write(tmp_path: Path, text: str | bytes, name: str = "trace.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- length distributions: exact means -------------------------------------------------

def brute_mean(pmf, support: np.ndarray, lo: int, hi: int | None) -> float:
    """E[clip(Y, lo, hi)] summed over a support that holds all but ~1e-15 of the mass."""
    return float(np.sum(np.clip(support, lo, hi if hi is not None else np.inf) * pmf(support)))


def test_poisson_clipped_at_one_has_mean_m_plus_p0():
    d = make_length({"dist": "poisson", "mean": 0.5}, field="workload.prompt", minimum=1)
    assert d.mean == pytest.approx(0.5 + math.exp(-0.5), rel=1e-14)
    assert make_length({"dist": "poisson", "mean": 0.5}, field="w", minimum=0).mean == pytest.approx(0.5, rel=1e-14)


@pytest.mark.parametrize("m,lo,hi", [(129, 1, None), (129, 1, 130), (3.5, 2, 4), (0.2, 1, 1)])
def test_poisson_mean_matches_pmf_sum(m, lo, hi):
    d = Poisson(m, minimum=lo, maximum=hi)
    k = np.arange(0, 1000)
    assert d.mean == pytest.approx(brute_mean(lambda x: stats.poisson.pmf(x, m), k, lo, hi), rel=1e-12)


@pytest.mark.parametrize("m,lo,hi", [(112, 0, None), (112, 1, 50), (1, 0, None), (4.0, 3, 10), (2.5, 0, 1)])
def test_geometric_mean_matches_pmf_sum(m, lo, hi):
    d = Geometric(m, minimum=lo, maximum=hi)
    p = 1 / m
    k = np.arange(1, 10_000)
    assert d.mean == pytest.approx(brute_mean(lambda x: p * (1 - p) ** (x - 1), k, lo, hi), rel=1e-12)
    if hi is None and lo <= 1:
        assert d.mean == pytest.approx(m, rel=1e-14)


def test_uniform_and_fixed_means():
    assert Uniform(1, 10, minimum=1).mean == 5.5
    assert Uniform(1, 10, minimum=1, maximum=5).mean == (1 + 2 + 3 + 4 + 5 * 6) / 10
    assert Uniform(4, 4, minimum=0).mean == 4
    assert Fixed(100, minimum=1).mean == 100
    assert Fixed(100, minimum=1, maximum=50).mean == 50   # clipped above
    assert Fixed(0, minimum=0).mean == 0


@pytest.mark.parametrize("mean,sigma,lo,hi", [(129, 0.8, 1, None), (129, 0.8, 1, 300), (3, 1.5, 0, None),
                                              (3, 1.5, 1, 20), (0.4, 0.5, 1, None)])
def test_lognormal_mean_matches_rounded_pmf_sum(mean, sigma, lo, hi):
    d = LogNormal(mean, sigma, minimum=lo, maximum=hi)
    law = stats.lognorm(s=sigma, scale=math.exp(math.log(mean) - sigma**2 / 2))
    k = np.arange(0, int(law.isf(1e-16)) + 2)
    exact = brute_mean(lambda x: law.cdf(x + 0.5) - law.cdf(x - 0.5), k, lo, hi)
    assert d.mean == pytest.approx(exact, rel=1e-9)


# ---- length distributions: sampling ------------------------------------------------------

SPECS = [
    ({"dist": "fixed", "value": 7}, 1),
    ({"dist": "poisson", "mean": 129}, 1),
    ({"dist": "poisson", "mean": 0.5}, 1),
    ({"dist": "poisson", "mean": 112, "max": 100}, 0),
    ({"dist": "geometric", "mean": 112}, 0),
    ({"dist": "geometric", "mean": 20, "max": 30}, 1),
    ({"dist": "uniform", "low": 1, "high": 1000}, 1),
    ({"dist": "uniform", "low": 5, "high": 50, "max": 20}, 1),
    ({"dist": "lognormal", "mean": 129, "sigma": 0.8}, 1),
    ({"dist": "lognormal", "mean": 2, "sigma": 1.0, "max": 10}, 1),
]


@pytest.mark.parametrize("spec,minimum", SPECS)
def test_sample_mean_within_five_standard_errors(spec, minimum):
    d = make_length(spec, field="w", minimum=minimum)
    x = d.sample(rng(1), 200_000)
    assert x.dtype == np.int64 and len(x) == 200_000
    assert x.min() >= minimum and (d.maximum is None or x.max() <= d.maximum)
    se = x.std() / math.sqrt(len(x))
    assert abs(x.mean() - d.mean) <= 5 * se + 1e-12


def test_geometric_support_starts_at_one():
    x = Geometric(4.0, minimum=0).sample(rng(2), 200_000)
    assert x.min() == 1
    # P(1) = p = 0.25; binomial standard error sqrt(p(1-p)/n) ~ 0.001, 5 SE = 0.005.
    assert abs(np.mean(x == 1) - 0.25) < 0.005


def test_poisson_clipping_moves_zeros_to_one():
    x = Poisson(0.5, minimum=1).sample(rng(3), 1000)
    assert x.min() == 1 and set(np.unique(x)) <= set(range(1, 20))


@pytest.mark.parametrize("spec,minimum", SPECS)
def test_to_dict_round_trip(spec, minimum):
    d = make_length(spec, field="w", minimum=minimum)
    again = make_length(d.to_dict(), field="w", minimum=minimum)
    assert again.to_dict() == d.to_dict()
    assert again.mean == d.mean
    assert {k: float(v) if isinstance(v, (int, float)) else v for k, v in d.to_dict().items()} == \
        {k: float(v) if isinstance(v, (int, float)) else v for k, v in spec.items()}


def test_same_rng_state_same_lengths():
    d = make_length({"dist": "lognormal", "mean": 50, "sigma": 1.0}, field="w", minimum=1)
    assert np.array_equal(d.sample(rng(5), 1000), d.sample(rng(5), 1000))
    assert not np.array_equal(d.sample(rng(5), 1000), d.sample(rng(6), 1000))


BAD_SPECS = [
    ({"dist": "zipf", "mean": 3}, "workload.prompt.dist", "one of fixed, poisson"),
    ({"mean": 3}, "workload.prompt.dist", "one of"),
    ({"dist": "poisson"}, "workload.prompt.mean", "required"),
    ({"dist": "poisson", "mean": -3}, "workload.prompt.mean", "> 0"),
    ({"dist": "poisson", "mean": 0}, "workload.prompt.mean", "> 0"),
    ({"dist": "poisson", "mean": "129"}, "workload.prompt.mean", "finite number"),
    ({"dist": "poisson", "mean": True}, "workload.prompt.mean", "finite number"),
    ({"dist": "poisson", "mean": math.nan}, "workload.prompt.mean", "finite number"),
    ({"dist": "poisson", "mean": math.inf}, "workload.prompt.mean", "finite number"),
    ({"dist": "poisson", "mean": 3, "sigma": 1}, "workload.prompt.sigma", "dist, mean, max"),
    ({"dist": "poisson", "mean": 3, "max": 0}, "workload.prompt.max", "integer >= 1"),
    ({"dist": "poisson", "mean": 3, "max": 10.5}, "workload.prompt.max", "integer"),
    ({"dist": "geometric", "mean": 0.5}, "workload.prompt.mean", ">= 1"),
    ({"dist": "fixed", "value": 0}, "workload.prompt.value", "integer >= 1"),
    ({"dist": "fixed", "value": 2.5}, "workload.prompt.value", "integer"),
    ({"dist": "fixed", "value": False}, "workload.prompt.value", "integer"),
    ({"dist": "uniform", "low": 5, "high": 4}, "workload.prompt.high", "integer >= 5"),
    ({"dist": "uniform", "low": 0, "high": 4}, "workload.prompt.low", "integer >= 1"),
    ({"dist": "uniform", "low": 1}, "workload.prompt.high", "required"),
    ({"dist": "lognormal", "mean": 100, "sigma": 0}, "workload.prompt.sigma", "> 0"),
    ({"dist": "lognormal", "mean": 100}, "workload.prompt.sigma", "required"),
    ({"dist": "empirical", "trace": 3, "column": "x"}, "workload.prompt.trace", "string"),
    ("poisson", "workload.prompt", "a table"),
]


@pytest.mark.parametrize("spec,field,allowed", BAD_SPECS)
def test_bad_length_spec_names_field_value_and_allowed(spec, field, allowed):
    with pytest.raises(ConfigError) as info:
        make_length(spec, field="workload.prompt", minimum=1)
    assert info.value.field == field
    assert str(info.value).startswith(field + " ") and allowed in str(info.value)


def test_integral_floats_are_integers():
    assert make_length({"dist": "fixed", "value": 12.0}, field="w", minimum=1).to_dict() == {"dist": "fixed",
                                                                                            "value": 12}


# ---- empirical ---------------------------------------------------------------------------

def test_empirical_from_vidur_length_only_file():
    path = shared(ARXIV)
    column = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1), dtype=np.int64)
    prompt = make_length({"dist": "empirical", "trace": str(path), "column": "prompt"}, field="w", minimum=1)
    output = make_length({"dist": "empirical", "trace": str(path), "column": "num_decode_tokens", "max": 100},
                         field="w", minimum=0)
    assert prompt.mean == pytest.approx(column[:, 0].mean(), rel=1e-12)
    assert np.median(prompt.values) == 2730   # the README's median
    assert output.mean == pytest.approx(np.minimum(column[:, 1], 100).mean(), rel=1e-12)
    x = prompt.sample(rng(4), 100_000)
    assert set(np.unique(x)) <= set(column[:, 0])
    assert abs(x.mean() - prompt.mean) <= 5 * x.std() / math.sqrt(len(x))
    assert make_length(prompt.to_dict(), field="w", minimum=1).mean == prompt.mean


def test_empirical_azure_alias_and_relative_path(tmp_path):
    write(tmp_path, AZURE_HEADER + "2023-11-16 18:17:03.9799600,10,0\n2023-11-16 18:17:04.0,30,5\n")
    d = make_length({"dist": "empirical", "trace": "trace.csv", "column": "output"}, field="w", minimum=1,
                    base_dir=tmp_path)
    assert isinstance(d, Empirical) and list(d.values) == [0, 5] and d.mean == 3.0  # 0 clipped up to 1


def test_empirical_errors(tmp_path):
    path = write(tmp_path, "a,b\n1,2\n3,x\n")
    with pytest.raises(ConfigError, match="w.column") as info:
        make_length({"dist": "empirical", "trace": str(path), "column": "c"}, field="w", minimum=1)
    assert "a, b" in str(info.value)
    with pytest.raises(ConfigError, match="w.column"):   # aliases need a recognised trace format
        make_length({"dist": "empirical", "trace": str(path), "column": "prompt"}, field="w", minimum=1)
    with pytest.raises(TraceError, match=r"trace.csv: 1 malformed row: line 3: b 'x' is not an integer"):
        make_length({"dist": "empirical", "trace": str(path), "column": "b"}, field="w", minimum=1)
    with pytest.raises(TraceError, match="missing.csv"):
        make_length({"dist": "empirical", "trace": str(tmp_path / "missing.csv"), "column": "b"}, field="w",
                    minimum=1)


# ---- arrival processes ---------------------------------------------------------------------

def test_poisson_arrivals_rate_and_exponential_gaps():
    rate, horizon = 50.0, 4000.0
    t = make_arrivals({"arrival": "poisson", "rate": rate}).sample(rng(7), horizon_s=horizon)
    assert 0 < t[0] and t[-1] <= horizon and np.all(np.diff(t) >= 0)
    # The count is Poisson(λT): standard error sqrt(λT) = 447 on 200,000.
    assert abs(len(t) - rate * horizon) <= 5 * math.sqrt(rate * horizon)
    gaps = np.diff(np.concatenate(([0.0], t)))
    # Exponential gaps: CV 1; the sample CV of 200k gaps has standard error ~ 0.0022 (delta method).
    assert abs(gaps.std() / gaps.mean() - 1) < 0.011


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_arrivals_have_requested_cv(cv):
    t = make_arrivals({"arrival": "gamma", "rate": 10.0, "cv": cv}).sample(rng(8), num_requests=200_000)
    gaps = np.diff(np.concatenate(([0.0], t)))
    # Mean gap 1/rate within 5 SE (SE = cv / rate / sqrt(n)); sample CV within 5 % (its relative SE
    # is sqrt((kurtosis + 2) / 4n) <= 0.8 % for shape 1/cv^2 >= 0.25).
    assert abs(gaps.mean() - 0.1) <= 5 * cv * 0.1 / math.sqrt(len(gaps))
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_deterministic_arrivals_exact_spacing():
    a = make_arrivals({"arrival": "deterministic", "rate": 10.0})
    t = a.sample(rng(), num_requests=1_000_000)
    assert t[0] == 0.1 and t[-1] == 100_000.0 and np.array_equal(t, np.arange(1, 1_000_001) / 10.0)
    assert np.array_equal(a.sample(rng(), horizon_s=1.0), np.arange(1, 11) / 10.0)  # arrival at t = horizon kept
    assert len(make_arrivals({"arrival": "deterministic", "rate": 3.0}).sample(rng(), horizon_s=1.0)) == 3
    assert len(a.sample(rng(), horizon_s=0.05)) == 0


@pytest.mark.parametrize("spec", [{"arrival": "poisson", "rate": 5.0}, {"arrival": "gamma", "rate": 5.0, "cv": 3.0}])
def test_horizon_stream_is_a_prefix_of_the_count_stream(spec):
    a = make_arrivals(spec)
    by_horizon = a.sample(rng(9), horizon_s=2000.0)
    by_count = a.sample(rng(9), num_requests=len(by_horizon) + 50)
    assert np.array_equal(by_horizon, by_count[: len(by_horizon)])
    assert by_count[len(by_horizon)] > 2000.0


def test_ten_million_arrivals_are_vectorised():
    t = make_arrivals({"arrival": "poisson", "rate": 1000.0}).sample(rng(), horizon_s=10_000.0)
    assert abs(len(t) - 10_000_000) <= 5 * math.sqrt(1e7)


def test_arrival_to_dict_round_trip():
    for spec in ({"arrival": "poisson", "rate": 2.0}, {"arrival": "deterministic", "rate": 2.0},
                 {"arrival": "gamma", "rate": 2.0, "cv": 1.5}):
        assert make_arrivals(spec).to_dict() == spec
    assert isinstance(make_arrivals({"arrival": "gamma", "rate": 1, "cv": 1, "load": 0.9}), GammaArrivals)
    assert isinstance(make_arrivals({"arrival": "poisson", "rate": 1}), PoissonArrivals)
    assert isinstance(make_arrivals({"arrival": "deterministic", "rate": 1}), DeterministicArrivals)


@pytest.mark.parametrize("spec,field", [
    ({"arrival": "weibull", "rate": 1.0}, "workload.arrival"),
    ({"rate": 1.0}, "workload.arrival"),
    ({"arrival": "poisson"}, "workload.rate"),
    ({"arrival": "poisson", "rate": 0}, "workload.rate"),
    ({"arrival": "poisson", "rate": -2.0}, "workload.rate"),
    ({"arrival": "poisson", "rate": "fast"}, "workload.rate"),
    ({"arrival": "poisson", "rate": 1.0, "cv": 2.0}, "workload.cv"),
    ({"arrival": "gamma", "rate": 1.0}, "workload.cv"),
    ({"arrival": "gamma", "rate": 1.0, "cv": 0}, "workload.cv"),
])
def test_bad_arrival_spec(spec, field):
    with pytest.raises(ConfigError) as info:
        make_arrivals(spec)
    assert info.value.field == field and field in str(info.value)


@pytest.mark.parametrize("kwargs", [{}, {"horizon_s": 1.0, "num_requests": 3}, {"horizon_s": -1.0},
                                    {"num_requests": 2.5}, {"horizon_s": math.inf}])
def test_bad_sample_arguments(kwargs):
    with pytest.raises(ConfigError):
        PoissonArrivals(1.0).sample(rng(), **kwargs)


# ---- workload composition ----------------------------------------------------------------

def fig1() -> Workload:
    return Workload(make_arrivals({"arrival": "poisson", "rate": 12.0}),
                    make_length({"dist": "poisson", "mean": 129}, field="p", minimum=1),
                    make_length({"dist": "poisson", "mean": 112}, field="o", minimum=0))


def test_generate_is_deterministic_and_seed_dependent():
    w = fig1()
    a, b, c = w.generate(3, horizon_s=100.0), w.generate(3, horizon_s=100.0), w.generate(4, horizon_s=100.0)
    assert isinstance(a, Requests) and len(a) == len(a.num_prompt_tokens) == len(a.num_output_tokens) > 0
    for name in ("arrival_time", "num_prompt_tokens", "num_output_tokens"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
        assert not np.array_equal(getattr(a, name)[:100], getattr(c, name)[:100])
    assert a.num_prompt_tokens.dtype == np.int64 and a.arrival_time.dtype == np.float64
    assert len(w.generate(3, num_requests=77)) == 77


def test_common_random_numbers_across_length_laws():
    w = fig1()
    other = Workload(w.arrivals, w.prompt, make_length({"dist": "fixed", "value": 5}, field="o", minimum=0))
    a, b = w.generate(11, num_requests=500), other.generate(11, num_requests=500)
    assert np.array_equal(a.arrival_time, b.arrival_time)
    assert np.array_equal(a.num_prompt_tokens, b.num_prompt_tokens)
    assert np.all(b.num_output_tokens == 5)


def test_workload_means_and_errors():
    w = fig1()
    assert w.arrival_rate == 12.0
    assert w.mean_prompt_len == pytest.approx(129 + math.exp(-129))
    assert w.mean_output_len == pytest.approx(112)
    for kwargs in ({}, {"horizon_s": 1.0, "num_requests": 5}):
        with pytest.raises(ConfigError, match="horizon_s"):
            w.generate(0, **kwargs)
    with pytest.raises(ConfigError, match="seed"):
        w.generate(-1, num_requests=5)
    with pytest.raises(ConfigError, match="workload.output"):
        Workload(w.arrivals, w.prompt, None)


# ---- traces: the real shared files -------------------------------------------------------

@pytest.mark.parametrize("kind,rows", [("code", 8819), ("conv", 19366)])
def test_azure_and_vidur_versions_agree(kind, rows):
    azure = load_trace(shared(f"AzureLLMInferenceTrace_{kind}.csv"))
    vidur = load_trace(shared(f"vidur_splitwise_{kind}.csv"))
    assert (azure.format, vidur.format) == ("azure", "vidur")
    for t in (azure, vidur):
        assert t.rows_read == len(t.requests) == rows
        assert t.rows_skipped_bad == t.rows_clipped == t.rows_dropped_long == t.rows_reordered == 0
        assert t.requests.arrival_time[0] == 0.0 and np.all(np.diff(t.requests.arrival_time) >= 0)
    assert np.array_equal(azure.requests.num_prompt_tokens, vidur.requests.num_prompt_tokens)
    assert np.array_equal(azure.requests.num_output_tokens, vidur.requests.num_output_tokens)
    np.testing.assert_allclose(azure.requests.arrival_time, vidur.requests.arrival_time, atol=1e-6)
    assert Workload(azure).arrival_rate == pytest.approx({"code": 2.57, "conv": 5.53}[kind], abs=0.005)


def test_real_trace_max_tokens_counts():
    path = shared("vidur_splitwise_code.csv")
    full = load_trace(path).requests
    clip = load_trace(path, max_tokens=4096)
    drop = load_trace(path, max_tokens=4096, cap_mode="drop")
    assert clip.rows_clipped == drop.rows_dropped_long == 1257   # the README's count
    assert len(clip.requests) == 8819 and len(drop.requests) == 8819 - 1257
    total = clip.requests.num_prompt_tokens + clip.requests.num_output_tokens
    assert total.max() == 4096 and clip.requests.num_prompt_tokens.min() >= 1
    assert np.array_equal(clip.requests.num_output_tokens, full.num_output_tokens)  # no output >= 4096 here
    assert (drop.requests.num_prompt_tokens + drop.requests.num_output_tokens).max() <= 4096


def test_length_only_file_is_not_a_trace():
    with pytest.raises(TraceError, match="no arrival column 'arrived_at'") as info:
        load_trace(shared(ARXIV))
    assert ARXIV in str(info.value)


def test_trace_replay_truncation_and_replaced_lengths():
    trace = load_trace(shared("vidur_splitwise_conv.csv"))
    w = Workload(trace)
    assert len(w.generate(0)) == 19366
    first = w.generate(0, horizon_s=60.0)
    assert first.arrival_time[-1] <= 60.0 < trace.requests.arrival_time[len(first)]
    assert np.array_equal(w.generate(0, num_requests=10).num_prompt_tokens, trace.requests.num_prompt_tokens[:10])
    assert w.mean_output_len == pytest.approx(trace.requests.num_output_tokens.mean())
    fixed = Workload(trace, output=make_length({"dist": "fixed", "value": 3}, field="o", minimum=0))
    r = fixed.generate(5, num_requests=100)
    assert np.all(r.num_output_tokens == 3) and fixed.mean_output_len == 3
    assert np.array_equal(r.num_prompt_tokens, trace.requests.num_prompt_tokens[:100])
    with pytest.raises(ValueError):   # the trace's arrays are shared by every replay: read-only
        trace.requests.arrival_time[0] = 1.0


def test_time_scale(tmp_path):
    path = write(tmp_path, VIDUR_HEADER + "0.5,10,1\n1.5,20,2\n2.5,30,3\n")
    base, slow = load_trace(path), load_trace(path, time_scale=2.0)
    assert list(slow.requests.arrival_time) == [1.0, 3.0, 5.0]
    assert Workload(slow).arrival_rate == Workload(base).arrival_rate / 2 == 0.75   # 3 rows / 4 s


# ---- traces: small files ------------------------------------------------------------------

def test_azure_times_are_seconds_since_first_row(tmp_path):
    path = write(tmp_path, AZURE_HEADER + "2023-11-16 18:17:03.9799600,4808,10\n"
                 "2023-11-16 18:17:04.0319600,3180,8\n2023-11-16 18:18:03.9799600,12.0,0\n")
    r = load_trace(path, time_scale=0.5).requests
    np.testing.assert_allclose(r.arrival_time, [0.0, 0.026, 30.0], atol=1e-12)
    assert list(r.num_prompt_tokens) == [4808, 3180, 12] and list(r.num_output_tokens) == [10, 8, 0]


def test_max_tokens_clip_rule(tmp_path):
    path = write(tmp_path, VIDUR_HEADER + "0,100,10\n1,5,200\n2,50,50\n")
    t = load_trace(path, max_tokens=100)
    assert t.rows_clipped == 2
    assert list(t.requests.num_prompt_tokens) == [90, 1, 50]     # output >= cap: prompt 1, output cap - 1
    assert list(t.requests.num_output_tokens) == [10, 99, 50]
    d = load_trace(path, max_tokens=100, cap_mode="drop")
    assert d.rows_dropped_long == 2 and list(d.requests.num_prompt_tokens) == [50]
    with pytest.raises(TraceError, match="every row"):
        load_trace(path, max_tokens=20, cap_mode="drop")


def test_reordered_rows_are_counted_and_stably_sorted(tmp_path):
    path = write(tmp_path, VIDUR_HEADER + "1.0,1,0\n0.5,2,0\n0.5,3,0\n2.0,4,0\n1.5,5,0\n")
    t = load_trace(path)
    assert t.rows_reordered == 2
    assert list(t.requests.num_prompt_tokens) == [2, 3, 1, 5, 4]
    assert list(t.requests.arrival_time) == [0.5, 0.5, 1.0, 1.5, 2.0]
    summary = t.summary()
    assert summary["rows_reordered"] == 2 and summary["format"] == "vidur" and summary["path"] == str(path)
    assert all(isinstance(v, (int, str)) for v in summary.values())


BAD_ROWS = [
    (VIDUR_HEADER + "0,10,1\n0.5,abc,5\n", "line 3: num_prefill_tokens 'abc' is not an integer"),
    (VIDUR_HEADER + "0,10,1\n0.5,12.5,5\n", "line 3: num_prefill_tokens '12.5' is not an integer"),
    (VIDUR_HEADER + "0,10,1\n0.5,,5\n", "line 3: num_prefill_tokens '' is not an integer"),
    (VIDUR_HEADER + "0,10,1\n0.5,10,-1\n", "line 3: num_decode_tokens '-1' is not an integer >= 0"),
    (VIDUR_HEADER + "0,10,1\n0.5,0,1\n", "line 3: num_prefill_tokens '0' is not an integer >= 1"),
    (VIDUR_HEADER + "0,10,1\n1.0,10\n", "line 3: expected 3 fields, got 2"),
    (VIDUR_HEADER + "0,10,1\n1.0,10,1,7\n", "line 3: expected 3 fields, got 4"),
    (VIDUR_HEADER + "0,10,1\n-1,10,1\n", "line 3: arrived_at '-1' is not a finite number >= 0"),
    (VIDUR_HEADER + "0,10,1\nnan,10,1\n", "line 3: arrived_at 'nan' is not a finite number >= 0"),
    (AZURE_HEADER + "2023-11-16 18:17:03.97,10,1\n2023-11-16 25:17:03.97,10,1\n",
     "line 3: TIMESTAMP '2023-11-16 25:17:03.97' is not a date-time"),
    (AZURE_HEADER + "2023-11-16 18:17:03.97,10,1\n\nyesterday,10,1\n", "line 4: TIMESTAMP 'yesterday'"),
]


@pytest.mark.parametrize("text,reason", BAD_ROWS)
def test_malformed_row_names_file_line_and_reason(tmp_path, text, reason):
    path = write(tmp_path, text)
    with pytest.raises(TraceError) as info:
        load_trace(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 1 malformed row ") and 'on_bad_row = "skip"' in message
    assert reason in message and "\n" not in message
    t = load_trace(path, on_bad_row="skip")
    assert (t.rows_read, t.rows_skipped_bad, len(t.requests)) == (2, 1, 1)


def test_many_malformed_rows_show_five_and_the_total(tmp_path):
    rows = "".join(f"{i},x,1\n" for i in range(8))
    path = write(tmp_path, VIDUR_HEADER + "0,1,1\n" + rows)
    with pytest.raises(TraceError) as info:
        load_trace(path)
    message = str(info.value)
    assert "8 malformed rows" in message and "line 7:" in message and "line 8:" not in message
    assert message.endswith("; ...")
    t = load_trace(path, on_bad_row="skip")
    assert t.rows_skipped_bad == 8 and len(t.requests) == 1


@pytest.mark.parametrize("content,reason", [
    ("", "empty file"),
    ("\n\n", "empty file"),
    ("time,prompt,output\n1,2,3\n", "unrecognised header"),
    (VIDUR_HEADER, "no valid data rows"),
    (b"arrived_at,num_prefill_tokens,num_decode_tokens\n0,\xff\xfe,1\n", "not UTF-8"),
    (VIDUR_HEADER + "0," + "1" * 200_000 + ",1\n", "line 2: not valid CSV"),  # over csv's field size limit
])
def test_unreadable_trace_files(tmp_path, content, reason):
    path = write(tmp_path, content, name="bad_trace.csv")
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert "bad_trace.csv" in str(info.value) and reason in str(info.value)


def test_missing_file_directory_and_forced_format(tmp_path):
    with pytest.raises(TraceError, match="nope.csv: no such trace file"):
        load_trace(tmp_path / "nope.csv")
    with pytest.raises(TraceError, match="is a directory"):
        load_trace(tmp_path)
    path = write(tmp_path, VIDUR_HEADER + "0,1,1\n")
    with pytest.raises(TraceError, match="is not a azure trace"):
        load_trace(path, format="azure")
    assert load_trace(path, format="vidur").format == "vidur"


@pytest.mark.parametrize("kwargs,field", [
    ({"format": "csv"}, "format"), ({"time_scale": 0}, "time_scale"), ({"time_scale": -1.0}, "time_scale"),
    ({"time_scale": "2"}, "time_scale"), ({"max_tokens": 1}, "max_tokens"), ({"max_tokens": 100.5}, "max_tokens"),
    ({"cap_mode": "truncate"}, "cap_mode"), ({"on_bad_row": "ignore"}, "on_bad_row"),
])
def test_bad_trace_options(tmp_path, kwargs, field):
    path = write(tmp_path, VIDUR_HEADER + "0,1,1\n")
    with pytest.raises(ConfigError) as info:
        load_trace(path, **kwargs)
    assert info.value.field == field


def test_single_row_trace_has_no_rate(tmp_path):
    w = Workload(load_trace(write(tmp_path, VIDUR_HEADER + "3.0,1,1\n")))
    assert len(w.generate(0)) == 1
    with pytest.raises(TraceError, match="cannot compute an arrival rate"):
        _ = w.arrival_rate


# ---- module hygiene ---------------------------------------------------------------------

def test_workload_imports_only_numpy_scipy_stdlib_and_errors():
    import llmqueue.model.workload as module
    tree = ast.parse(Path(module.__file__).read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    third_party = {n.split(".")[0] for n in names} - {"__future__", "abc", "collections", "csv", "dataclasses",
                                                        "datetime", "functools", "io", "math", "numbers",
                                                        "pathlib", "typing"}
    assert third_party == {"numpy", "scipy", "llmqueue"}
    assert {n for n in names if n.startswith("llmqueue")} == {"llmqueue.errors", "llmqueue.checks"}
    assert issubclass(Poisson, LengthDist) and issubclass(PoissonArrivals, ArrivalProcess)
    assert "arXiv 2504.07347 §3.1" in (module.__doc__ or "") and Trace.__doc__
