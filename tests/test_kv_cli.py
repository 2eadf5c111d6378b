"""KV memory in the answers: the memory-aware prediction, the table's KV columns, the KV plot and
CSV columns, the warning for requests larger than the cache (docs/memory.md)."""

from __future__ import annotations

import csv
import json

import pytest

from llmqueue.cli import main
from llmqueue.cli.common import config_from, table
from llmqueue.runner import run_config


def _run(scenario, *overrides):
    return run_config(config_from(scenario, list(overrides)))


@pytest.mark.parametrize("blocks,predicted,verdict", [
    (300, "unstable", "unstable"),                  # λ = 8.36 > λ_mem = 6.47: the necessary bound decides
    (600, "not predicted (memory)", "unstable"),    # below λ_mem = 12.97 and the fluid sufficient bound 12.69,
])                                                  # yet Orca thrashes: preemptions, a quarter of the work again
def test_memory_bounds_decide_the_prediction(blocks, predicted, verdict):
    run = _run("theorem2", f"engine.kv_blocks={blocks}", "workload.load=0.5", "run.horizon_s=300")
    s = run.summary
    assert s["predicted"] == predicted
    assert s["verdict"] == verdict
    m = s["memory"]
    assert m["binding"] == "memory" and m["necessary_rps"] < m["token_bound_rps"]
    assert ("above the memory bound" in m["reason"]) == (predicted == "unstable")
    if blocks == 600:
        assert m["sufficient_rps"] > run.analysis.arrival_rate and s["kv"]["recompute_share"] > 0.2


def test_unbounded_lengths_leave_stability_unpredicted():
    """Poisson lengths: no sufficient memory bound, so Theorem 2's "stable" does not stand with memory."""
    s = _run("fig1", "engine.kv_blocks=2500", "run.horizon_s=20").summary
    assert s["predicted"] == "not predicted (memory)"
    assert s["memory"]["sufficient_rps"] is None and "necessary, not sufficient" in s["memory"]["reason"]
    assert "memory" not in _run("fig1", "run.horizon_s=20").summary   # memory off: nothing added


def test_table_shows_kv_and_rejections():
    with_kv = _run("fig1", "engine.kv_blocks=2000", "run.horizon_s=30").summary
    text = table([with_kv])
    assert text.splitlines()[0].split()[-5:] == ["preempt", "KV", "use", "recomp", "rejected"]
    row = text.splitlines()[2]
    assert str(with_kv["kv"]["preemptions"]) in row.split()
    assert row.split()[-1] == "0"                      # the rejected column, always there
    rejected = dict(with_kv, rejected=5, arrived=50)
    assert table([rejected]).splitlines()[2].endswith("5 (10%)")
    assert "preempt" not in table([_run("fig1", "run.horizon_s=10").summary])


def test_cli_writes_kv_outputs_and_warns_about_oversized_requests(tmp_path, capsys):
    out = tmp_path / "sim"
    # Geometric prompts: some need more than 40 blocks x 16 tokens and are rejected, and counted.
    code = main(["simulate", "fig1", "--set", "engine.kv_blocks=40", "--set", "run.horizon_s=30",
                 "--set", "workload.prompt.dist=geometric", "--set", "workload.load=0.2", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    n = summary["kv"]["rejected_larger_than_cache"]
    assert n > 0 and summary["rejected"] >= n
    assert f"warning: sarathi: {n} of {summary['arrived']} requests rejected" in captured.err
    assert f"{n} larger than the KV cache" in captured.err and "raise engine.kv_blocks to at least" in captured.err
    assert (out / "kv_blocks.png").stat().st_size > 0
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert {"preemptions", "recomputed_tokens"} <= set(rows[0])
    assert sum(int(r["preemptions"]) for r in rows) == summary["kv"]["preemptions"]
    series = list(csv.DictReader((out / "timeseries.csv").open()))
    assert max(int(r["kv_blocks_in_use"]) for r in series) <= 39
    assert "KV cache: 40 blocks x 16 tokens" in captured.out


def test_compare_plots_kv_only_with_memory(tmp_path, capsys):
    base = ["compare", "--schedulers", "sarathi,orca", "--horizon", "20"]
    assert main(base + ["--set", "engine.kv_blocks=2000", "--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert (tmp_path / "a" / "kv_blocks.png").exists() and not (tmp_path / "b" / "kv_blocks.png").exists()


DONG_CAO = {  # their setting on the engine: one token per request per iteration, a fixed iteration time
    "engine": {"scheduler": "sarathi", "token_budget": 4096, "kv_blocks": 16493, "block_size": 1,
               "batch_time": {"model": "constant", "duration_ms": 10.0}},
    "workload": {"arrival": "poisson", "rate": 1000.0, "prompt": {"dist": "fixed", "value": 10},
                 "output": {"dist": "uniform", "low": 20, "high": 60}},
    "run": {"horizon_s": 100.0, "seed": 0},
}


def test_max_rate_with_memory_meets_the_closed_form_where_it_applies(tmp_path):
    """Fixed iteration time, bounded lengths (δ = 0.4 %): the bisection's bracket holds both the
    sufficient (1273.0 req/s) and the necessary (1278.4 req/s) memory bound, far below λ* = 8192."""
    from llmqueue.config import parse_config
    from llmqueue.sweep.executors import LocalExecutor
    from llmqueue.sweep.maxrate import max_rate
    from llmqueue.sweep.store import Store

    base = parse_config(DONG_CAO)
    with Store(tmp_path / "m.db") as store:
        (r,) = max_rate([((), base)], [0], store, LocalExecutor(1), rel_tol=0.02)
    assert r.lambda_star_rps == pytest.approx(8192.0)
    assert r.memory_bound_rps == pytest.approx(1278.4496, abs=1e-3)
    assert r.bound_rps == r.memory_bound_rps
    assert 0.97 * r.memory_bound_rps <= r.max_rate_rps < r.failed_rate_rps <= 1.02 * r.memory_bound_rps


def test_python_planned_policy_with_memory_is_a_clear_error(capsys):
    """A policy that plans in Python (plan(state)) cannot follow the memory rules: refused, not a crash."""
    from pathlib import Path

    policy = Path(__file__).resolve().parents[1] / "docs" / "policies" / "python_plan.py"
    code = main(["simulate", "fig1", "--set", f"engine.scheduler={policy}:ShortestPromptFirst",
                 "--set", "engine.kv_blocks=2000", "--set", "run.horizon_s=10"])
    err = capsys.readouterr().err
    assert code == 2 and "engine.kv_blocks = 2000 is not allowed" in err and "plans in Python" in err
    assert "Traceback" not in err


PREFIX = {
    "engine": {"scheduler": "sarathi", "token_budget": 512, "kv_blocks": 3000, "prefix_caching": True},
    "workload": {"arrival": "poisson", "rate": 8.0, "shared_prefix": {"tokens": 512, "groups": 4},
                 "prompt": {"dist": "uniform", "low": 300, "high": 900}, "output": {"dist": "geometric", "mean": 50}},
    "run": {"horizon_s": 120.0, "seed": 0},
}


def _prefix_run(**engine):
    import copy

    from llmqueue.config import parse_config

    data = copy.deepcopy(PREFIX)
    data["engine"].update(engine)
    return run_config(parse_config(data))


def test_shared_prefix_from_the_config_is_found_cached_and_is_not_backlog():
    """8 req/s is 1.56x λ* without the cache (5.14) but below λ* with it (18.71): the run keeps up,
    and tokens found in the cache never count as backlog."""
    on = _prefix_run()
    s = on.summary
    pc = s["kv"]["prefix_caching"]
    assert pc["hit_rate"] > 0.5 and pc["saved_prefill_tokens"] > 0
    assert s["predicted"] == "not predicted (prefix caching)"
    assert s["prefix"]["max_stable_rate_rps"] == pytest.approx(5.1429, abs=1e-3)
    assert s["prefix"]["max_stable_rate_prefix_rps"] == pytest.approx(18.715, abs=1e-3)
    assert s["verdict"] == "stable" and abs(s["backlog_slope_tokens_per_s"]) < 20
    first = on.result.kv.first_hit_tokens
    assert first.sum() <= on.result.kv.hit_tokens.sum() and first.sum() > 0
    off = _prefix_run(prefix_caching=False).summary
    assert off["predicted"] == "unstable" and off["verdict"] == "unstable"


def test_prefix_prediction_above_the_cached_bound_is_unstable():
    import copy

    from llmqueue.config import parse_config

    data = copy.deepcopy(PREFIX)
    data["workload"]["rate"] = 20.0
    data["run"]["horizon_s"] = 30.0
    s = run_config(parse_config(data)).summary
    assert s["predicted"] == "unstable" and "even with every shared block" in s["prefix"]["reason"]


def test_capacity_reports_the_prefix_bound_not_the_memory_bounds(tmp_path, capsys):
    from llmqueue.config import dumps

    cfg = tmp_path / "pc.toml"
    cfg.write_text(dumps(PREFIX))
    assert main(["capacity", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "Prefix caching" in out and "18.7146 requests/s" in out and "KV-cache memory" not in out
    assert main(["capacity", str(cfg), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["prefix"]["mean_hit"] == pytest.approx(471.37, abs=0.01) and "memory" not in d


def test_max_rate_with_prefix_caching_starts_at_the_cached_bound(tmp_path):
    from llmqueue.config import parse_config
    from llmqueue.sweep.executors import LocalExecutor
    from llmqueue.sweep.maxrate import max_rate
    from llmqueue.sweep.store import Store

    base = parse_config({**PREFIX, "run": {"horizon_s": 60.0, "seed": 0}})
    with Store(tmp_path / "m.db") as store:
        (r,) = max_rate([((), base)], [0], store, LocalExecutor(1), rel_tol=0.1)
    assert r.lambda_star_rps == pytest.approx(18.715, abs=1e-3) and r.memory_bound_rps is None
    assert r.probes[0].rate_rps == pytest.approx(18.715, abs=1e-3) and "prefix caching" in r.notes[-1]
    assert 5.143 < r.max_rate_rps <= r.lambda_star_rps
