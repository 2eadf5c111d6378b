"""The command line: every command, the JSON keys, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from llmqueue.cli import main
from llmqueue.config import dumps
from llmqueue.scenarios import SCENARIOS, scenario_data

SUMMARY_KEYS = {"arrived", "completed", "throughput_rps", "token_throughput", "mean_in_system", "final_in_system",
                "backlog_slope_tokens_per_s", "verdict", "capacity_tokens_per_s", "offered_tokens_per_s", "rho",
                "work_conserving_violations", "batches", "mean_batch_tokens", "ttft_s", "tbt_s", "e2e_s"}


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def small_config(tmp_path):
    """The Fig. 1 scenario at budget 256, 5 requests/s, one simulated minute, batch records on."""
    data = scenario_data("fig1")
    data["engine"]["token_budget"] = 256
    data["workload"] = {**data["workload"], "rate": 5.0}
    del data["workload"]["load"]
    data["run"] = {"horizon_s": 60.0, "seed": 3, "record_batches": True}
    path = tmp_path / "run.toml"
    path.write_text(dumps(data))
    return path


def test_simulate_json_has_documented_keys(capsys, small_config):
    code, out, _ = run_cli(capsys, "simulate", str(small_config), "--json")
    assert code == 0
    summary = json.loads(out)
    assert SUMMARY_KEYS <= set(summary)
    for key in ("ttft_s", "tbt_s", "e2e_s"):
        assert set(summary[key]) >= {"mean", "p50", "p90", "p99"}
    assert summary["token_budget"] == 256 and summary["arrived"] > 200


def test_set_overrides_and_out_files(capsys, small_config, tmp_path):
    out_dir = tmp_path / "out"
    code, out, _ = run_cli(capsys, "simulate", str(small_config), "--set", "engine.token_budget=512",
                           "--set", "engine.scheduler=orca", "--json", "--out", str(out_dir))
    assert code == 0
    summary = json.loads(out)
    assert summary["token_budget"] == 512 and summary["scheduler"] == "orca"
    resolved = tomllib.loads((out_dir / "config.toml").read_text())
    assert resolved["engine"]["token_budget"] == 512
    assert json.loads((out_dir / "summary.json").read_text())["arrived"] == summary["arrived"]
    rows = (out_dir / "requests.csv").read_text().splitlines()
    assert len(rows) == summary["arrived"] + 1
    batches = (out_dir / "batches.csv").read_text().splitlines()
    assert batches[0].startswith("start_time,end_time,num_prefill_tokens") and batches[0].endswith(",bound,duration") and len(batches) - 1 == summary["batches"]


def test_resolved_config_round_trips(capsys, small_config, tmp_path):
    out_dir = tmp_path / "a"
    run_cli(capsys, "simulate", str(small_config), "--json", "--out", str(out_dir))
    code, out2, _ = run_cli(capsys, "simulate", str(out_dir / "config.toml"), "--json")
    first = json.loads((out_dir / "summary.json").read_text())
    second = json.loads(out2)
    for key in ("arrived", "completed", "batches", "mean_in_system"):
        assert first[key] == second[key]


def test_capacity_json(capsys, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[workload]\nrate = 10.0\n[workload.prompt]\ndist = "fixed"\nvalue = 100\n'
                    '[workload.output]\ndist = "fixed"\nvalue = 100\n')
    code, out, _ = run_cli(capsys, "capacity", str(path), "--json")
    assert code == 0
    a = json.loads(out)
    assert a["max_stable_rate_rps"] == pytest.approx(16.714, abs=1e-3)
    assert a["offered_tokens_per_s"] == pytest.approx(2000.0)
    assert a["rho"] == pytest.approx(2000.0 / a["capacity_tokens_per_s"])
    assert {"capacity_tokens_per_s", "max_stable_rate_rps", "offered_tokens_per_s", "rho"} <= set(a)


def test_policies_and_scenarios(capsys):
    code, out, _ = run_cli(capsys, "policies")
    assert code == 0
    for name in ("fastertransformer", "vllm", "orca", "sarathi", "vllm-v1", "split_prompts", "max_num_seqs"):
        assert name in out
    code, out, _ = run_cli(capsys, "scenarios")
    assert code == 0 and all(name in out for name in SCENARIOS)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_show_is_accepted_by_simulate(capsys, tmp_path, name):
    code, text, _ = run_cli(capsys, "scenarios", "show", name)
    assert code == 0
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    code, out, _ = run_cli(capsys, "simulate", str(path), "--set", "run.horizon_s=30", "--json")
    assert code == 0 and json.loads(out)["horizon_s"] == 30


def test_compare_writes_table_and_plot(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "compare", "--horizon", "120", "--out", str(tmp_path), "--schedulers",
                           "vllm,sarathi")
    assert code == 0
    assert "sarathi" in out and "vllm" in out and "verdict" in out
    assert (tmp_path / "number_in_system.png").stat().st_size > 10_000
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert [r["scheduler"] for r in runs] == ["vllm", "sarathi"]
    assert runs[0]["arrived"] == runs[1]["arrived"]  # common random numbers


BAD_CASES = [
    ("[engine]\nscheduler = 'fifo'\n", [], "engine.scheduler"),
    ("[engine]\ntoken_budget = 0\n", [], "engine.token_budget"),
    ("[engine]\ntoken_budget = -5\n", [], "engine.token_budget"),
    ("[engine]\ntoken_budget = 0.5\n", [], "engine.token_budget"),
    ("[engine]\ntoken_budget = '512'\n", [], "engine.token_budget"),
    ("[engine]\nbogus = 1\n", [], "engine.bogus"),
    ("[engine]\nscheduler = 'orca'\nsplit_prompts = true\n", [], "engine.split_prompts"),
    ("[engine]\nscheduler = 'vllm'\nsplit_prompts = 'yes'\n", [], "engine.split_prompts"),
    ("[engine]\nmax_batch_requests = 0\n", [], "engine.max_batch_requests"),
    ("[engine]\nscheduler = 'vllm-v1'\nmax_num_seqs = 0\n", [], "engine.max_num_seqs"),
    ("[engine]\nscheduler = 'vllm-v1'\nlong_prefill_token_threshold = -1\n", [], "engine.long_prefill_token_threshold"),
    ("[engine.batch_time]\nmodel = 'cubic'\n", [], "engine.batch_time.model"),
    ("[engine.batch_time]\nmodel = 'constant'\n", [], "engine.batch_time.duration_ms"),
    ("[engine.batch_time]\nmodel = 'staircase'\nb0 = 0\n", [], "engine.batch_time.b0"),
    ("[workload]\nrate = 0\n", [], "workload.rate"),
    ("[workload]\nrate = -1.0\n", [], "workload.rate"),
    ("[workload]\nrate = 2.0\nload = 0.5\n", [], "workload.load"),
    ("[workload]\narrival = 'weibull'\n", [], "workload.arrival"),
    ("[workload]\nspeed = 3\n", [], "workload.speed"),
    ("[workload.prompt]\ndist = 'poisson'\nmean = -3\n", [], "workload.prompt.mean"),
    ("[workload]\narrival = 'trace'\ntrace = 'missing.csv'\n", [], "missing.csv"),
    ("[run]\nhorizon_s = 'long'\n", [], "run.horizon_s"),
    ("[run]\nseed = -1\n", [], "run.seed"),
    ("[oops]\nx = 1\n", [], "config.oops"),
    ("this is not toml", [], "valid TOML"),
    ("", ["engine.token_budget=0"], "engine.token_budget"),
    ("", ["engine.nope=3"], "engine.nope"),
    ("", ["novalue"], "--set"),
]


@pytest.mark.parametrize("text,sets,field", BAD_CASES)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, text, sets, field):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    argv = ["simulate", str(path), "--json"]
    for item in sets:
        argv += ["--set", item]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmqueue: error:") and field in lines[0], err
    assert "Traceback" not in err


def test_broken_trace_rows_are_reported(capsys, tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,10,5\n0.5,abc,5\n1.0,10\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[workload]\narrival = 'trace'\ntrace = '{trace.name}'\n")
    code, _, err = run_cli(capsys, "simulate", str(cfg))
    assert code == 2
    assert "t.csv" in err and "line 3" in err and "line 4" in err and "Traceback" not in err


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "simulate", str(tmp_path / "nope.toml"))
    assert code == 2 and "nope.toml" in err


def test_assumption_warning_when_b0_does_not_divide_budget(capsys, small_config):
    code, _, err = run_cli(capsys, "simulate", str(small_config), "--set", "engine.token_budget=200",
                           "--set", "run.horizon_s=5", "--json")
    assert code == 0 and "warning" in err and "Assumption 1" in err


def test_module_entry_point_and_exit_status():
    proc = subprocess.run([sys.executable, "-m", "llmqueue", "simulate", "fig1", "--set", "engine.token_budget=0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "engine.token_budget" in proc.stderr and "Traceback" not in proc.stderr


def test_interrupted_compare_keeps_finished_runs(capsys, tmp_path, monkeypatch):
    """Ctrl-C during the second scheduler: the first one's results are printed and kept."""
    import llmqueue.runner as runner

    real = runner.execute
    calls = []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "execute", interrupting)
    code, out, err = run_cli(capsys, "compare", "--horizon", "60", "--out", str(tmp_path),
                             "--schedulers", "orca,sarathi,vllm")
    assert code == 130 and "interrupted" in err
    assert "orca" in out and "sarathi" not in out
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert [r["scheduler"] for r in runs] == ["orca"]


def test_timeseries_written_by_simulate_and_compare(capsys, small_config, tmp_path):
    import csv

    code, out, _ = run_cli(capsys, "simulate", str(small_config), "--json", "--out", str(tmp_path / "s"))
    summary = json.loads(out)
    rows = list(csv.DictReader((tmp_path / "s" / "timeseries.csv").open()))
    assert float(rows[-1]["time_s"]) == summary["horizon_s"]
    assert int(rows[-1]["in_system"]) == summary["final_in_system"]
    assert int(rows[-1]["backlog_tokens"]) == summary["final_backlog_tokens"]
    reqs = list(csv.DictReader((tmp_path / "s" / "requests.csv").open()))
    # the batch that crosses T still completes, so a finish time may lie just after T
    unfinished = sum(1 for r in reqs if r["finish_time"] == "" or float(r["finish_time"]) > summary["horizon_s"])
    assert unfinished == summary["arrived"] - summary["completed"]
    code, _, _ = run_cli(capsys, "compare", "--horizon", "30", "--schedulers", "orca,vllm", "--no-plot",
                         "--out", str(tmp_path / "c"))
    header = (tmp_path / "c" / "timeseries.csv").read_text().splitlines()[0].split(",")
    assert header == ["time_s", "orca_in_system", "orca_backlog_tokens", "vllm_in_system", "vllm_backlog_tokens"]


def test_resolved_config_of_a_trace_run_works_from_another_folder(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "t.csv").write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                                  + "".join(f"{i * 0.5},{20 + i % 7},{5 + i % 3}\n" for i in range(200)))
    (folder / "c.toml").write_text("[workload]\ntrace = 't.csv'\n[run]\ndrain = true\n")
    out_dir = tmp_path / "out"
    code, first, _ = run_cli(capsys, "simulate", str(folder / "c.toml"), "--json", "--out", str(out_dir))
    assert code == 0 and json.loads(first)["arrived"] == 200
    monkeypatch.chdir(tmp_path)
    code, again, err = run_cli(capsys, "simulate", str(out_dir / "config.toml"), "--json")
    assert code == 0, err
    assert json.loads(again)["completed"] == json.loads(first)["completed"] == 200


def test_unwritable_out_folder_is_a_clean_error(capsys, small_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "simulate", str(small_config), "--out", str(blocker / "sub"))
    assert code == 2 and err.startswith("llmqueue: error:") and "Traceback" not in err


def test_the_prefill_decode_caveat_is_said_once_per_command():
    """Each run and fit of a command repeats the prefill_decode caveat with its own numbers (with and
    without a context term): the command prints it once, in the first one's words; other warnings
    once each."""
    from llmqueue.cli import _once

    first = ("batch_time.model = prefill_decode times each batch by its mix (not Assumption 1); capacity and "
             "λ* assume prefill_fraction = 0.666667 and mean_context_tokens = 48.6667")
    second = first.split(" and mean_context")[0]
    assert _once([first, "other", second, first, "other", "third"]) == [first, "other", "third"]
