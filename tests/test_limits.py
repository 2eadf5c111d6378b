"""Sizes that cannot run are refused before any work (issue 16; llmqueue/limits.py; docs/config.md,
"Errors, signals and limits"): each hostile size gets exit 2 and one stderr line naming the value,
the estimate and the limit, without allocating; normal runs (every built-in scenario, ten million
Sarathi requests) still pass the check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmqueue import limits
from llmqueue.cli import main
from llmqueue.cli.common import config_from
from llmqueue.errors import ConfigError
from llmqueue.runner import build_workload, run_config

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
ENV.pop(limits.MEMORY_ENV, None)
VIDUR = "arrived_at,num_prefill_tokens,num_decode_tokens\n"


@pytest.fixture(autouse=True)
def _no_memory_override(monkeypatch):
    monkeypatch.delenv(limits.MEMORY_ENV, raising=False)


def refused(capsys, *argv: str) -> str:
    """Run the command line; it must exit 2 with one stderr line, returned."""
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("llmqueue: error: ") and "Traceback" not in err, err
    return lines[0]


def names(line: str, *words: str) -> None:
    for word in words:
        assert word in line, (word, line)


# ---- the hostile sizes of issue 16 -------------------------------------------------------------

@pytest.mark.parametrize("command", [["simulate", "fig1"], ["compare", "--schedulers", "sarathi,orca", "--no-plot"]])
@pytest.mark.parametrize("setting,shown", [
    ("workload.rate=1e12", "workload.rate = 1000000000000.0 is not allowed"),
    ("run.horizon_s=1e15", "run.horizon_s = 1000000000000000.0 is not allowed"),
    ("run.requests=1e12", "run.requests = 1000000000000 is not allowed"),
    ('engine.batch_time={model="constant",duration_ms=1e-300}', "engine.batch_time = {'model': 'constant', "
                                                                 "'duration_ms': 1e-300} is not allowed"),
])
def test_too_many_arrivals_are_refused_naming_the_value(capsys, command, setting, shown):
    line = refused(capsys, *command, "--set", setting)
    names(line, shown, "at most 200,000,000 arrivals", "would have about", "lower run.horizon_s")


@pytest.mark.parametrize("dry", [["--dry-run"], []])
def test_a_sweep_checks_every_point_before_any_runs(capsys, tmp_path, dry):
    store = tmp_path / "s.db"
    line = refused(capsys, "sweep", "fig1", "--grid", "run.horizon_s=100,1e15", "--store", store, *dry)
    names(line, "grid point run.horizon_s=1000000000000000.0: run.horizon_s = 1000000000000000.0 is not allowed",
          "a run of at most 200,000,000 arrivals")
    assert not store.exists()                       # nothing ran, not even the small point


def test_a_batch_time_that_makes_lambda_star_huge_is_named_with_its_batch(capsys):
    line = refused(capsys, "simulate", "fig1", "--set", 'engine.batch_time={model="constant",duration_ms=1e-300}')
    names(line, "λ* = ", "a batch of 512 tokens takes 1e-303 s", "give batches that take longer")


def test_too_many_batches_are_refused(capsys):
    # 1,200 requests of 1e12 output tokens served by batches that take no time: the tokens alone
    # need 2.3e12 batches of at most 512 tokens
    line = refused(capsys, "simulate", "fig1", "--set", "workload.rate=1", "--set",
                   'workload.output={dist="fixed",value=1000000000000}', "--set",
                   'engine.batch_time={model="constant",duration_ms=1e-300}')
    names(line, "engine.batch_time = ", "at most 2,000,000,000 batches", "at most 512 a batch")
    line = refused(capsys, "simulate", "fig1", "--set", "workload.rate=1", "--set", "run.drain=true", "--set",
                   'workload.output={dist="fixed",value=1000000000000}')
    names(line, "run.drain = true is not allowed", "batches", "run without run.drain")


def test_a_bounded_horizon_keeps_huge_outputs_runnable(capsys):
    # the same outputs without drain: the horizon bounds the batches, the run is small
    code = main(["simulate", "fig1", "--json", "--set", "workload.rate=1", "--set", "run.horizon_s=20", "--set",
                 'workload.output={dist="fixed",value=1000000000000}'])
    assert code == 0, capsys.readouterr().err


def test_memory_is_checked_against_the_limit(capsys, monkeypatch):
    monkeypatch.setenv(limits.MEMORY_ENV, "0.5")
    line = refused(capsys, "simulate", "fig1", "--set", "run.requests=10000000")
    names(line, "run.requests = 10000000 is not allowed", "needs at least about 1.1 GB", "10,000,000 requests × 100 B",
          "batches × 40 B", "the memory limit of 512 MB (set by LLMQUEUE_MAX_MEMORY_GB)", "lower run.horizon_s")
    line = refused(capsys, "simulate", "fig1", "--set", "run.requests=4000000", "--set", "run.record_batches=true")
    names(line, "× 144 B with run.record_batches", "run.record_batches = false")


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan"])
def test_a_bad_memory_override_is_refused(capsys, monkeypatch, value):
    monkeypatch.setenv(limits.MEMORY_ENV, value)
    names(refused(capsys, "simulate", "fig1"), "LLMQUEUE_MAX_MEMORY_GB", "a number of GB > 0")


def test_no_memory_limit_with_inf(monkeypatch):
    monkeypatch.setenv(limits.MEMORY_ENV, "inf")
    assert limits.memory_limit()[0] == float("inf")


def test_the_library_raises_before_generating():
    with pytest.raises(ConfigError) as info:
        run_config(config_from("fig1", ["run.requests=1e12"]))
    assert info.value.field == "run.requests"


#: The child: its address space capped, then the command line; it writes its own peak resident
#: memory (VmHWM of /proc/self/status) to a file.  Measured in the child, after its exec: the
#: rusage of a forked child also counts the pages it shared with this (large) pytest process.
_CHILD = """
import resource, sys
cap = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from llmqueue.cli import main
code = 1
try:
    code = main(sys.argv[3:])
finally:
    with open("/proc/self/status") as f, open(sys.argv[2], "w") as out:
        out.write(next(line for line in f if line.startswith("VmHWM")).split()[1])
sys.exit(code)
"""


def _limited(argv: list[str], cap: int = 3 * 2**30) -> tuple[int, str, str, int]:
    """llmqueue in a child with ``cap`` bytes of address space: (exit status, stdout, stderr, peak KB)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        peak = Path(tmp) / "peak_kb"
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(cap), str(peak), *argv], env=ENV,
                              capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr, int(peak.read_text() or 0)


LINUX = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                           reason="needs RLIMIT_AS and /proc (Linux)")


@LINUX
def test_a_huge_token_budget_is_refused_before_its_table():
    # in a child with 3 GB of address space: without the check the table fails to allocate (exit 1)
    code, _, err, _ = _limited(["simulate", "fig1", "--set", "engine.token_budget=1000000000000"])
    assert code == 2, err
    names(err, "engine.token_budget = 1000000000000 is not allowed", "64 B a token")


def test_token_budget_check():
    with pytest.raises(ConfigError, match="engines.0..token_budget = 1000000000000 is not allowed: at most"):
        limits.check_token_budget(10**12, "engines[0].token_budget")
    limits.check_token_budget(1_000_000)   # 64 MB of tables


# ---- networks --------------------------------------------------------------------------------

@pytest.mark.parametrize("setting,shown", [
    ("run.horizon_s=1e15", "run.horizon_s = 1000000000000000.0 is not allowed: a network run of at most 200,000,000 jobs"),
    ("network.load=1e12", "network.load = 1000000000000.0 is not allowed"),
    ("engines.S1.token_budget=1000000000000", "engines[0].token_budget = 1000000000000 is not allowed"),
])
def test_network_sizes_are_refused(capsys, setting, shown):
    names(refused(capsys, "network", "simulate", "fork-join" if "load" in setting else "rybko-stolyar",
                  "--set", setting), shown)


def test_network_bottleneck_that_serves_instantly_is_named(capsys):
    tiny = '{model="constant",duration_ms=1e-300}'
    line = refused(capsys, "network", "simulate", "rybko-stolyar", "--set", f"engines.S1.batch_time={tiny}",
                   "--set", f"engines.S2.batch_time={tiny}")
    names(line, "engines[0].batch_time = ", "network.load = 0.9 sets them", "give batches that take longer")


def test_network_memory_and_compare(capsys, monkeypatch):
    monkeypatch.setenv(limits.MEMORY_ENV, "0.01")
    line = refused(capsys, "network", "simulate", "dag", "--set", "run.horizon_s=100000")
    names(line, "run.horizon_s = 100000.0 is not allowed", "visits × 230 B", "batches × 107 B",
          "the memory limit of 10 MB")
    names(refused(capsys, "network", "compare", "dag", "--set", "run.horizon_s=100000"), "visits × 230 B")


# ---- trace files -----------------------------------------------------------------------------

def _trace_config(tmp_path: Path, trace: str, **extra) -> Path:
    lines = [f'[workload]\narrival = "trace"\ntrace = "{trace}"'] + [f"{k} = {v}" for k, v in extra.items()]
    path = tmp_path / "trace.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_device_as_trace_is_refused_before_reading(capsys, tmp_path):
    line = refused(capsys, "simulate", _trace_config(tmp_path, "/dev/zero"))
    names(line, "workload.trace = '/dev/zero' is not allowed", "a regular trace file (CSV), not a device")
    cfg = tmp_path / "e.toml"
    cfg.write_text('[workload.output]\ndist = "empirical"\ntrace = "/dev/zero"\ncolumn = "output"\n')
    names(refused(capsys, "simulate", cfg), "workload.output.trace = '/dev/zero'", "not a device")


def test_a_folder_as_trace_keeps_its_message(capsys, tmp_path):
    (tmp_path / "folder").mkdir()
    names(refused(capsys, "simulate", _trace_config(tmp_path, "folder")), "is a directory, not a trace file")


def test_a_trace_over_the_size_cap_or_the_memory_is_refused(capsys, tmp_path, monkeypatch):
    trace = tmp_path / "t.csv"
    trace.write_text(VIDUR + "".join(f"{i * 0.1:.1f},10,5\n" for i in range(2000)))
    config = _trace_config(tmp_path, "t.csv")
    monkeypatch.setattr(limits, "MAX_TRACE_BYTES", 1000)
    names(refused(capsys, "simulate", config), "workload.trace = ", "a trace file (CSV) of at most 1,000 bytes")
    monkeypatch.undo()
    monkeypatch.setenv(limits.MEMORY_ENV, str(1e6 / 2**30))   # 1 MB: 2,001 rows take 1.3 MB
    line = refused(capsys, "simulate", _trace_config(tmp_path, "t.csv", loop=3))
    names(line, "a trace that fits in memory: its 2,001 rows take about", "workload.loop = 3",
          "the memory limit of 1 MB")
    monkeypatch.delenv(limits.MEMORY_ENV)
    assert main(["simulate", str(config), "--json"]) == 0


# ---- normal runs still pass --------------------------------------------------------------------

def test_every_builtin_scenario_passes_the_check():
    from llmqueue.network import analyze_network, load_network
    from llmqueue.scenarios import SCENARIOS

    for name in SCENARIOS:
        try:
            net = load_network(name)
        except ConfigError:
            net = None
        if net is not None and net.engines:
            limits.check_network(net, analyze_network(net))
            continue
        config = config_from(name, [])
        size = limits.check_run(config, build_workload(config), ["sarathi", "orca", "vllm", "fastertransformer"])
        assert size.bytes < 2**30, (name, size)


def test_ten_million_sarathi_requests_need_about_a_gigabyte(monkeypatch):
    """docs/performance.md: 10,000,000 Sarathi requests measured 1,133 MB; the check lets them run
    wherever 1.5 GB are free."""
    config = config_from("fig1", ["run.requests=10000000"])
    monkeypatch.setenv(limits.MEMORY_ENV, "1.5")
    size = limits.check_run(config, build_workload(config))
    assert 0.9 * 2**30 < size.bytes < 1.3 * 2**30
    assert 4e6 < size.batches < 6.1e6   # a floor under the 5,991,430 batches it runs


def test_estimate_terms():
    config = config_from("fig1", ["run.requests=1000000"])
    workload = build_workload(config)
    one = limits.estimate_run(config, workload)
    assert one.arrivals == 1_000_000 and one.batches == pytest.approx(1_000_000 * 241 / 512)
    assert one.bytes == pytest.approx(1e6 * 100 + one.batches * 40 + 512 * limits.TOKEN_BYTES)
    three = limits.estimate_run(config, workload, ["sarathi", "orca", "vllm"])
    assert three.bytes == pytest.approx(one.bytes + 2 * (1e6 * 24 + one.batches * 16))
    ref = limits.estimate_run(config_from("fig1", ["run.requests=1000000", "run.method=reference"]), workload)
    assert ref.bytes == pytest.approx(1e6 * 320 + one.batches * 64 + 512 * limits.TOKEN_BYTES)
    overloaded = config_from("fig1", ["workload.load=3"])   # 1,200 s of full 153 ms batches at most
    assert limits.estimate_run(overloaded, build_workload(overloaded)).batches == pytest.approx(1200 / 0.15316)


def test_available_memory_is_known_here():
    avail, what = limits.available_memory()
    assert avail is not None and avail > 0 and what
    limit, how = limits.memory_limit()
    assert limit == avail and "LLMQUEUE_MAX_MEMORY_GB" in how


def test_sizes_read_well():
    assert limits.size(1.5 * 2**30) == "1.5 GB" and limits.size(3 * 2**20) == "3 MB"
    assert limits.size(5 * 2**40) == "5.0 TB" and limits.size(7e16).endswith("TB")


# ---- a memory-limited process ------------------------------------------------------------------

@LINUX
def test_a_run_too_large_for_the_address_space_is_refused_before_it_allocates():
    # 50,000,000 requests: below the arrival cap, but at least 5.5 GB against 3 GB of address space
    code, out, err, peak_kb = _limited(["simulate", "fig1", "--set", "run.requests=50000000"])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and not out
    names(lines[0], "run.requests = 50000000 is not allowed", "needs at least about 5.",
          "what the address-space limit (RLIMIT_AS) leaves")
    assert peak_kb < 400 * 1024   # refused before the 5 GB were touched
