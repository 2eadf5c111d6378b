"""benchmarks/bench_network.py: the --smoke run's shape, and its counts against simulate_network run here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmqueue.network import load_network, simulate_network

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_network.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_network", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_counts_the_hop_requests_of_simulate_network(tmp_path):
    # No timing claim: a tiny horizon and request count, the default network, every policy, both engine rows.
    scenarios, policies = ["dag"], ["config", "priority", "max-pressure"]
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--scenarios", ",".join(scenarios),
                          "--policies", ",".join(policies), "--json", str(tmp_path / "runs.json")],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("horizon 200 s, one-engine rows 2,000 requests")
    assert lines[1].split()[:5] == ["kind", "scenario", "policy", "rep", "hop-req"]
    table = [ln.split() for ln in lines[2:2 + 2 + len(scenarios) * len(policies)]]
    assert [(r[0], r[1], r[2]) for r in table] == (
        [("engine", "fig1", "sarathi"), ("engine", "fig1", "maxweight")]
        + [("network", s, "config(fcfs)" if p == "config" else p) for s in scenarios for p in policies])
    assert all(len(r) == 12 and r[3] == "0" for r in table)

    saved = json.loads((tmp_path / "runs.json").read_text())
    assert saved["horizon_s"] == 200 and saved["requests"] == 2000 and len(saved["runs"]) == len(table)
    module = bench()
    for row, printed in zip(saved["runs"], table):
        assert int(printed[4]) == row["hop_requests"]
        if row["kind"] == "engine":
            assert row["hop_requests"] == 2000 and row["batches"] > 0 and row["policy"] == printed[2]
            continue
        sets = module.policy_sets(row["scenario"], row["policy"])
        net = load_network(row["scenario"], sets)
        if row["policy"] != "config":
            assert {e.policy for e in net.engines} == {row["policy"]}
        direct = simulate_network(net, seed=0, horizon_s=200.0)
        assert row["hop_requests"] == len(direct.sub_engine) > 0, row
        assert row["jobs"] == len(direct.job_entry_time)
        assert row["batches"] == sum(len(b["end_time"]) for b in direct.batches)
        assert row["rejected"] == int(direct.rejected.sum())

    ratios = [ln.split() for ln in lines[2 + len(table):] if ln and not ln.startswith("ratio")]
    names = [(r[0], r[1]) for r in ratios]
    assert names == ([("engine/network", f"{s}:{'config(fcfs)' if p == 'config' else p}")
                      for s in scenarios for p in policies]
                     + [(f"{p}/config(fcfs)", s) for s in scenarios for p in ("priority", "max-pressure")]
                     + [("maxweight/sarathi", "fig1")])
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in ratios)
    assert [r["ratio"] for r in saved["ratios"]] == [n for n, _ in names]


def test_every_policy_of_every_scenario_is_the_network_simulated_directly():
    # In this process (no child): each scenario's engines switched to each policy, priority with
    # the scenario's own class_priority where it has one, else the classes in config order.
    module = bench()
    for scenario in module.network_scenarios():
        for policy in module.POLICIES:
            row = module.network_one(scenario, policy, 60.0, 1)
            net = load_network(scenario, row["set"])
            if policy != "config":
                assert row["engine_policies"] == [policy]
            if policy == "priority":
                configured = load_network(scenario).engines
                for engine, before in zip(net.engines, configured):
                    assert engine.class_priority == (before.class_priority or tuple(range(len(net.classes))))
            direct = simulate_network(net, seed=1, horizon_s=60.0)
            assert (row["hop_requests"], row["jobs"]) == (len(direct.sub_engine), len(direct.job_entry_time))


def test_bad_input_is_one_line(monkeypatch, capsys):
    module = bench()
    for flags, start in ((["--scenarios", "fig1"], "--scenarios: 'fig1' is not allowed"),
                         (["--policies", "lifo"], "--policies: 'lifo' is not allowed"),
                         (["--schedulers", "sarathi,nope"], "--schedulers: 'nope' is not allowed"),
                         (["--repeat", "0"], "--repeat: 0 is not allowed"),
                         (["--horizon", "inf"], "--horizon: inf is not allowed"),
                         (["--requests", "0"], "--requests: 0 is not allowed")):
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), *flags])
        with pytest.raises(SystemExit) as exit_:
            module.main()
        out = capsys.readouterr()
        assert exit_.value.code == 2 and out.out == ""
        assert out.err.count("\n") == 1 and out.err.startswith(start), out.err
