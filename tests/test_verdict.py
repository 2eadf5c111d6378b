"""The stability verdict (docs/model.md, "The stability verdict"): warm-up, relaxation time,
rejections, finite traces, and statistical checks over seeds that fail without the warm-up rule."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from llmqueue.cli import main
from llmqueue.cli.common import config_from
from llmqueue.config import load_config, parse_config, set_dotted
from llmqueue.metrics import (
    INCONCLUSIVE,
    MIN_BLOCKS,
    REJECTS,
    STABLE,
    UNSTABLE,
    Relaxation,
    Trend,
    mser5,
    relaxation_time,
    verdict,
)
from llmqueue.runner import run_config
from llmqueue.scenarios import scenario_data


def fig1(load: float, horizon: float, seed: int = 0, scheduler: str = "sarathi", **sets):
    d = scenario_data("fig1")
    for key, value in {"workload.load": load, "run.horizon_s": horizon, "run.seed": seed,
                       "engine.scheduler": scheduler, **sets}.items():
        set_dotted(d, key, value)
    return run_config(parse_config(d)).summary


# ---- MSER-5 and the relaxation time ----------------------------------------------------------

def test_mser5_drops_a_ramp_and_keeps_the_steady_part():
    rng = np.random.default_rng(0)
    y = np.concatenate((np.linspace(0, 100, 200), np.full(800, 100.0))) + rng.normal(0, 3, 1000)
    cut, settled = mser5(y)
    assert settled and 180 <= cut <= 260


def test_mser5_finds_no_steady_level_in_a_growing_series():
    y = np.linspace(0, 1000, 1000) + np.random.default_rng(1).normal(0, 5, 1000)
    cut, settled = mser5(y)
    assert not settled and cut == 500          # the first half dropped: the whole search range


def test_mser5_keeps_a_flat_series():
    cut, settled = mser5(np.random.default_rng(2).normal(50, 3, 1000))
    assert settled and cut < 250


def test_variance_rate_of_poisson_arrivals_is_lambda_times_second_moment():
    rate = 0.5 * 13.87
    second = 241 + 241 ** 2                    # Poisson(129) + Poisson(112) tokens of work
    run = run_config(config_from("fig1", ["workload.load=0.5"]))
    relax = relaxation_time(run.result, 1000.0)
    assert relax.variance_rate == pytest.approx(rate * second, rel=0.35)
    assert relax.queueing_s == pytest.approx(2 * relax.variance_rate / 1000.0 ** 2)
    assert run.summary["relaxation_s"] > relax.passage_s > 5   # 112 output tokens at tens of ms a batch


def test_a_window_shorter_than_the_relaxation_times_is_inconclusive_with_a_horizon():
    trend = Trend(500.0, 450.0, 550.0, (10.0, 40.0), True, MIN_BLOCKS - 1)
    name, reason, need = verdict(trend, 33.0, 500, Relaxation(20.0, 12.0, 8.0, 1e5))
    assert name == INCONCLUSIVE and need == pytest.approx(10 + MIN_BLOCKS * 20)
    assert f"run at least {10 + MIN_BLOCKS * 20} s" in reason and "12 s through the engine" in reason


def test_symmetric_rule_around_the_tolerance():
    assert verdict(Trend(300.0, 280.0, 320.0, (0, 1)), 33.0, 500)[0] == UNSTABLE
    assert verdict(Trend(40.0, 20.0, 60.0, (0, 1)), 33.0, 500)[0] == INCONCLUSIVE   # may be under the tolerance
    assert verdict(Trend(1.0, -5.0, 7.0, (0, 1)), 33.0, 500)[0] == STABLE


def test_inconclusive_names_the_horizon_that_would_decide():
    name, reason, need = verdict(Trend(10.0, -30.0, 50.0, (100.0, 400.0)), 33.0, 500)
    assert name == INCONCLUSIVE and need > 400 and "of arrivals if the slope held" in reason


# ---- the cases ------------------------------------------------------------------------

@pytest.mark.parametrize("horizon", [15, 20, 30])
def test_short_stable_runs_are_not_called_unstable(horizon):
    for seed in range(3):
        s = fig1(0.9, horizon, seed)
        assert s["verdict"] == INCONCLUSIVE, s["verdict_reason"]
        assert "relaxation times" in s["verdict_reason"] and s["verdict_needs_arrivals_s"] > horizon


def test_default_fig1_run_is_stable_and_overload_unstable():
    assert fig1(0.9, 1200)["verdict"] == STABLE
    assert fig1(1.3, 300)["verdict"] == UNSTABLE
    assert fig1(1.05, 1200)["verdict"] == UNSTABLE


def test_rejections_make_the_verdict_rejects_with_the_fix():
    s = fig1(0.5, 600, scheduler="vllm", **{"engine.token_budget": 128})
    assert s["rejected"] > 0.3 * s["arrived"]
    assert s["verdict"] == REJECTS
    assert "engine.token_budget to at least" in s["verdict_reason"] and "sarathi" in s["verdict_reason"]
    assert s["rejected_share"] == pytest.approx(s["rejected"] / s["arrived"])
    assert s["rejected_causes"] and "does not split" in s["rejected_causes"][0]


def test_rejections_below_the_allowance_keep_the_backlog_verdict():
    s = fig1(0.5, 600, scheduler="vllm", **{"engine.token_budget": 128, "run.reject_tolerance": 1.0})
    assert s["verdict"] in (STABLE, INCONCLUSIVE, UNSTABLE) and s["rejected"] > 0


def test_point_c_non_splitting_schedulers_reject():
    cfg = config_from("point-c", ["engine.scheduler=fastertransformer", "run.horizon_s=120"])
    s = run_config(cfg).summary
    assert s["verdict"] == REJECTS and s["rejected_share"] == 1.0
    assert "run longer" not in s["verdict_reason"]


def test_cli_shows_rejections_in_the_table_and_warns(capsys):
    assert main(["compare", "--schedulers", "vllm,sarathi", "--budget", "128", "--horizon", "120", "--no-plot"]) == 0
    out, err = capsys.readouterr()
    header = next(line for line in out.splitlines() if line.startswith("scheduler"))
    assert header.rstrip().endswith("rejected")
    sarathi = next(line for line in out.splitlines() if line.startswith("sarathi"))
    assert sarathi.rstrip().endswith(" 0")
    assert "warning: vllm:" in err and "rejected" in err


def test_rejected_column_even_without_rejections(capsys):
    assert main(["compare", "--schedulers", "sarathi", "--horizon", "60", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "rejected" in next(line for line in out.splitlines() if line.startswith("scheduler"))


# ---- finite traces ----------------------------------------------------------------------------

def _trace(tmp_path, rate=11.0, seconds=60.0, seed=0):
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1 / rate, int(rate * seconds)))
    rows = [f"{t:.6f},{p},{o}" for t, p, o in zip(times, rng.poisson(129, len(times)) + 1,
                                                     rng.poisson(112, len(times)), strict=True)]
    path = tmp_path / "trace.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + "\n".join(rows) + "\n")
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""[engine]
scheduler = "sarathi"
token_budget = 512
[engine.batch_time]
model = "staircase"
c_ms = 11.28
a_ms = 35.47
b0 = 128
[workload]
arrival = "trace"
trace = "{path.name}"
[run]
seed = 0
""")
    return cfg


def test_a_short_trace_says_what_it_cannot_show_and_offers_loop(tmp_path):
    s = run_config(load_config(_trace(tmp_path))).summary
    assert s["verdict"] == INCONCLUSIVE
    assert "workload.loop =" in s["verdict_reason"] and "cannot show" in s["verdict_reason"]


def test_a_looped_trace_reaches_a_verdict(tmp_path):
    cfg = _trace(tmp_path)
    short = run_config(load_config(cfg)).summary
    loops = int(short["verdict_reason"].split("workload.loop = ")[1].split()[0])
    s = run_config(load_config(cfg, [f"workload.loop={loops + 5}"])).summary
    assert s["trace"]["loops"] == loops + 5
    assert s["verdict"] == STABLE, s["verdict_reason"]


# ---- networks ---------------------------------------------------------------------------------

def test_network_summary_carries_the_same_rules(capsys):
    assert main(["network", "simulate", "fork-join", "--set", "run.horizon_s=300", "--json"]) == 0
    n = json.loads(capsys.readouterr().out)["network"]
    assert n["verdict"] == INCONCLUSIVE and "relaxation times" in n["verdict_reason"]
    assert n["relaxation_s"] > 0 and n["jobs_rejected"] == 0 and n["verdict_needs_arrivals_s"] > 300


# ---- over seeds (a few seconds: the compiled core) ------------------------------------------

@pytest.mark.parametrize("scheduler", ["sarathi", "orca"])
def test_short_stable_runs_never_unstable_over_seeds(scheduler):
    """Fig. 1 at 0.9 of λ* (stable by Theorem 2): without the warm-up rule 32 of 54 such runs were
    called unstable."""
    counts = collections.Counter(fig1(0.9, h, seed, scheduler)["verdict"]
                                 for h in (15, 20, 30, 60) for seed in range(20))
    assert counts[UNSTABLE] == 0, counts


def test_stable_runs_rarely_unstable_at_moderate_horizons():
    counts = collections.Counter(fig1(load, h, seed)["verdict"]
                                 for load, h in ((0.8, 120), (0.9, 300), (0.95, 600)) for seed in range(20))
    assert counts[UNSTABLE] <= 1 and counts[STABLE] >= 30, counts


@pytest.mark.parametrize("scheduler", ["sarathi", "orca"])
def test_overload_is_found_over_seeds(scheduler):
    assert all(fig1(1.3, 300, seed, scheduler)["verdict"] == UNSTABLE for seed in range(10))
    counts = collections.Counter(fig1(1.05, 1200, seed, scheduler)["verdict"] for seed in range(10))
    assert counts[UNSTABLE] >= 9 and counts[STABLE] == 0, counts


def test_network_rejections_make_the_verdict_rejects(tmp_path, capsys):
    assert main(["scenarios", "show", "tandem"]) == 0
    text = capsys.readouterr().out.replace('name = "E2"\nscheduler = "sarathi"\ntoken_budget = 1024',
                                           'name = "E2"\nscheduler = "vllm"\ntoken_budget = 192', 1)
    assert 'scheduler = "vllm"' in text
    (tmp_path / "net.toml").write_text(text)
    assert main(["network", "simulate", str(tmp_path / "net.toml"), "--set", "run.horizon_s=300", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    n, e2 = s["network"], s["engines"][1]
    assert n["verdict"] == REJECTS and n["jobs_rejected"] > 0
    assert n["jobs_rejected_share"] == pytest.approx(n["jobs_rejected"] / n["jobs_arrived"])
    assert "engine E2's token_budget" in n["verdict_reason"] and e2["rejected"] > 0 and e2["verdict"] == REJECTS


# ---- sweeps and max-rate ------------------------------------------------------------------------

def test_sweep_warns_and_results_show_rejections(tmp_path, capsys):
    store = str(tmp_path / "s.db")
    assert main(["sweep", "fig1", "--grid", "engine.scheduler=vllm,sarathi", "--set", "engine.token_budget=128",
                 "--set", "run.horizon_s=60", "--seeds", "1", "--jobs", "1", "--store", store]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 of 2 runs rejected requests" in err
    assert main(["results", store]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert "rejected" in header and "rejected_share" in header
    vllm = next(line for line in out.splitlines() if " vllm " in f" {line} ")
    assert "rejects" in vllm.split()


def test_max_rate_fails_a_rate_that_rejects(tmp_path, capsys):
    store = str(tmp_path / "m.db")
    assert main(["max-rate", "fig1", "--grid", "engine.scheduler=vllm", "--set", "engine.token_budget=128",
                 "--set", "run.horizon_s=60", "--seeds", "1", "--jobs", "1", "--store", store, "--json"]) == 0
    row, = json.loads(capsys.readouterr().out)
    assert row["max_rate_rps"] is None and len(row["probes"]) == 1   # rejections: no other rate is tried
    assert row["probes"][0]["verdicts"] == {"rejects": 1}
    assert any("every seed rejects requests" in n and "engine.token_budget" in n for n in row["notes"])
