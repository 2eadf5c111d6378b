"""Hostile inputs and faults (issue 16): each is one line on stderr naming what is wrong and what is
allowed, and an exit status (2 for input, 1 for a bug or no memory, 130/143 for SIGINT/SIGTERM);
never a traceback, never a silent wrong answer (docs/config.md, "Errors, signals and limits")."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmqueue.cli import main
from llmqueue.cli.common import atomic_path
from llmqueue.sweep import Store, expand, parse_grid, run_point, seed_list
from llmqueue.sweep.driver import tasks_of

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str, *words: str) -> str:
    """The single stderr line, checked to name every word."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("llmqueue: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# ---- config files --------------------------------------------------------------------------

def test_deeply_nested_toml_names_the_file_and_the_limit(capsys, tmp_path):
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")   # tomllib alone: RecursionError
    code, out, err = run_cli(capsys, "simulate", deep)
    assert code == 2 and out == ""
    one_error(err, "deep.toml", "nested at most 100 levels")
    nested = tmp_path / "nested.toml"      # parses, but deeper than the documented limit
    nested.write_text("a = " + "[" * 150 + "]" * 150 + "\n")
    code, _, err = run_cli(capsys, "capacity", nested)
    assert code == 2
    one_error(err, "nested.toml", "100 levels")


def test_deep_set_value_is_refused(capsys):
    code, _, err = run_cli(capsys, "capacity", "fig1", "--set", "engine.x=" + "[" * 3000 + "]" * 3000)
    assert code == 2
    one_error(err, "--set", "nested at most 100 levels")


@pytest.mark.parametrize("command", [["simulate"], ["capacity"], ["network", "simulate"], ["sweep"]])
def test_a_device_as_config_is_refused_before_reading(capsys, command):
    code, _, err = run_cli(capsys, *command, "/dev/zero")
    assert code == 2
    one_error(err, "/dev/zero", "regular TOML file, not a device")


def test_a_folder_and_a_huge_file_as_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "simulate", tmp_path)
    assert code == 2
    one_error(err, "regular TOML file, not a folder")
    big = tmp_path / "big.toml"
    with big.open("wb") as f:   # sparse: 11 MB on paper, nothing on disk
        f.truncate(11 * 2**20)
    code, _, err = run_cli(capsys, "simulate", big)
    assert code == 2
    one_error(err, "big.toml", "at most 10 MB", "11 MB")


def test_a_binary_samples_file_to_calibrate(capsys, tmp_path):
    binary = tmp_path / "samples.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    code, _, err = run_cli(capsys, "calibrate", "--samples", binary, "--out", tmp_path / "cal", "--no-plot")
    assert code == 2
    one_error(err, "samples.csv", "not a UTF-8 text file", "prefill_tokens")
    bad = tmp_path / "bad.csv"
    bad.write_text("prefill_tokens,decode_tokens,context_tokens,attention_pairs,seconds\n1,2,3,4,fast\n")
    code, _, err = run_cli(capsys, "calibrate", "--samples", bad, "--out", tmp_path / "cal", "--no-plot")
    assert code == 2
    one_error(err, "bad.csv", "line 2", "seconds = 'fast' is not allowed")
    code, _, err = run_cli(capsys, "calibrate", "--samples", "/dev/zero", "--out", tmp_path / "cal")
    assert code == 2
    one_error(err, "/dev/zero", "regular CSV file")
    assert not (tmp_path / "cal").exists()


# ---- flags that used to give a silent wrong answer -----------------------------------------

@pytest.mark.parametrize("value", [",", "", " , "])
def test_empty_scheduler_list(capsys, value):
    code, _, err = run_cli(capsys, "compare", "--schedulers", value, "--horizon", "5")
    assert code == 2
    one_error(err, "--schedulers", "at least one scheduler", "sarathi")


def test_empty_network_policy_list(capsys):
    code, _, err = run_cli(capsys, "network", "compare", "rybko-stolyar", "--policies", ",")
    assert code == 2
    one_error(err, "--policies", "at least one of config, fcfs")


@pytest.mark.parametrize("flags,first", [(["--requests", "50", "--horizon", "10"], "--requests"),
                                         (["--rate", "5", "--load", "0.5"], "--rate")])
def test_flags_that_replace_each_other_are_refused_together(capsys, tmp_path, flags, first):
    code, _, err = run_cli(capsys, "compare", *flags, "--schedulers", "orca", "--out", tmp_path)
    assert code == 2
    one_error(err, first, "choose one")
    assert not list(tmp_path.iterdir())


@pytest.fixture
def short_trace(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                     + "".join(f"{0.5 * i},{20 + i},{5 + i}\n" for i in range(6)))
    cfg = tmp_path / "trace.toml"
    cfg.write_text(f"[workload]\narrival = 'trace'\ntrace = '{trace.name}'\n[run]\nrequests = 20\n")
    return cfg


def test_more_requests_than_a_trace_holds_is_warned(capsys, short_trace):
    code, out, err = run_cli(capsys, "simulate", short_trace, "--json")
    assert code == 0 and json.loads(out)["arrived"] == 6
    one_error(err, "warning", "run.requests = 20", "6 requests", "workload.loop = 4")
    code, _, err = run_cli(capsys, "sweep", short_trace, "--grid", "engine.scheduler=orca,sarathi", "--dry-run")
    assert code == 0
    one_error(err, "warning", "run.requests = 20", "workload.loop = 4")
    code, _, err = run_cli(capsys, "simulate", short_trace, "--json", "--set", "workload.loop=4")
    assert code == 0 and err == ""


def test_where_with_an_order_needs_a_number(capsys, tmp_path):
    store = tmp_path / "s.db"
    Store(store).close()
    for cond in ("rho>=abc", "rho<x", "workload.rate>nan"):
        code, _, err = run_cli(capsys, "results", store, "--where", cond)
        assert code == 2
        one_error(err, "--where", cond, "a number after", "= and !=")


@pytest.fixture(scope="module")
def one_run_store(tmp_path_factory):
    """A store with two finished runs, run in this process (no workers)."""
    from llmqueue.cli.common import config_from

    path = tmp_path_factory.mktemp("store") / "s.db"
    points = expand(config_from("fig1", ["run.requests=200"]), parse_grid(["workload.rate=4,12"]), seed_list(1, 0))
    with Store(path) as store:
        for task in tasks_of(points):
            store.record(task.config_hash, task.seed, task.data, run_point(task))
    return path


def test_plot_out_names_the_allowed_formats_and_writes_what_it_reports(capsys, tmp_path, one_run_store):
    code, _, err = run_cli(capsys, "plot", one_run_store, "--kind", "stability-map", "--out", tmp_path / "x.xyz")
    assert code == 2
    one_error(err, "x.xyz", ".png, .pdf, .svg")
    assert not (tmp_path / "x.xyz").exists()
    folder = tmp_path / "plots"
    folder.mkdir()
    code, out, err = run_cli(capsys, "plot", one_run_store, "--kind", "stability-map", "--out", folder)
    written = folder / "stability-map.png"
    assert code == 0 and out.strip() == f"wrote {written}", (out, err)
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run_cli(capsys, "plot", one_run_store, "--kind", "latency-vs-load", "--out", tmp_path / "l.SVG")
    assert code == 0 and (tmp_path / "l.SVG").read_text().lstrip().startswith("<?xml")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temporary left


def test_region_plot_format_is_checked_before_any_work(capsys, tmp_path):
    code, _, err = run_cli(capsys, "region", "point-c", "--plot", tmp_path / "r.jpeg")
    assert code == 2
    one_error(err, "--plot", ".png, .pdf, .svg")


# ---- grids ---------------------------------------------------------------------------------

def test_huge_grid_is_counted_not_built(capsys):
    start = time.monotonic()
    code, _, err = run_cli(capsys, "sweep", "fig1", "--grid", "workload.rate=1:1000:1",
                           "--grid", "engine.token_budget=1:1000:1", "--dry-run")
    assert code == 2 and time.monotonic() - start < 5
    one_error(err, "1,000,000 runs", "at most 100,000", "--max-points")
    code, _, err = run_cli(capsys, "sweep", "fig1", "--grid", "engine.scheduler=orca,sarathi", "--seeds", "3",
                           "--dry-run", "--max-points", "5")
    assert code == 2
    one_error(err, "6 runs", "at most 5")
    code, out, _ = run_cli(capsys, "sweep", "fig1", "--grid", "engine.scheduler=orca,sarathi", "--seeds", "3",
                           "--dry-run", "--max-points", "6")
    assert code == 0 and out.startswith("6 runs")
    code, _, err = run_cli(capsys, "max-rate", "fig1", "--grid", "engine.token_budget=1:1000:1", "--seeds", "101")
    assert code == 2
    one_error(err, "101,000 runs", "--max-points")
    code, _, err = run_cli(capsys, "sweep", "fig1", "--dry-run", "--max-points", "0")
    assert code == 2
    one_error(err, "--max-points = 0")


class SerialExecutor:
    """Runs tasks one after another in this process (a stand-in for the worker pool)."""

    def connect(self):
        pass

    def close(self):
        pass

    def describe(self):
        return "this process"

    def run(self, tasks, fn):
        for task in tasks:
            yield task, fn(task)


def test_a_full_store_mid_sweep_is_one_line_and_keeps_finished_runs(capsys, tmp_path, monkeypatch):
    """A real SQLITE_FULL: the store may grow by one page only (as a disk that fills up)."""
    import llmqueue.cli.sweep as cli_sweep

    monkeypatch.setattr(cli_sweep, "make_executor", lambda jobs, ray: SerialExecutor())
    opened = Store.__init__

    def small_disk(self, path, readonly=False):
        opened(self, path, readonly)
        if not readonly:
            pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
            self.conn.execute(f"PRAGMA max_page_count = {pages + 1}")

    monkeypatch.setattr(Store, "__init__", small_disk)
    store = tmp_path / "s.db"
    code, _, err = run_cli(capsys, "sweep", "fig1", "--set", "run.requests=100", "--grid", "workload.rate=2:12:2",
                           "--store", store)
    assert code == 2
    line = one_error(err, f"store {store}: database or disk is full", "run the same command again")
    monkeypatch.setattr(Store, "__init__", opened)
    with Store(store, readonly=True) as s:
        stored = len(s.runs())
    assert stored < 6 and f"{stored} run{'s are' if stored != 1 else ' is'} in {store}" in line


def test_a_locked_store_when_reading(capsys, tmp_path, monkeypatch, one_run_store):
    def locked(self):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(Store, "runs", locked)
    code, _, err = run_cli(capsys, "results", one_run_store)
    assert code == 2
    one_error(err, str(one_run_store), "database is locked")


# ---- bugs and memory -----------------------------------------------------------------------

def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    import llmqueue.runner as runner

    def bug(*args, **kwargs):
        raise RecursionError("maximum recursion depth exceeded\nmore detail")

    monkeypatch.setattr(runner, "run_config", bug)
    code, _, err = run_cli(capsys, "simulate", "fig1")
    assert code == 1
    one_error(err, "internal error: RecursionError: maximum recursion depth exceeded", "--debug")
    for argv in (["--debug", "simulate", "fig1"], ["simulate", "fig1", "--debug"]):
        with pytest.raises(RecursionError):
            main(argv)


def test_memory_error_names_the_options_that_shrink_the_run(capsys, monkeypatch):
    import llmqueue.runner as runner

    def huge(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(runner, "run_config", huge)
    code, _, err = run_cli(capsys, "simulate", "fig1")
    assert code == 1
    one_error(err, "more memory than this machine has", "run.horizon_s", "run.requests", "workload.rate",
              "nothing written")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs resource limits on a POSIX child")
def test_running_out_of_memory_in_a_limited_process_is_one_line():
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    proc = subprocess.run([sys.executable, "-m", "llmqueue", "simulate", "fig1", "--set", "run.requests=100000000000"],
                          env=ENV, preexec_fn=limit, capture_output=True, text=True, timeout=120)
    # exit 1 when the run starts and runs out of memory; 2 when a size check refuses it first
    assert proc.returncode in (1, 2), proc.stderr
    line = one_error(proc.stderr, "run.requests")
    assert proc.returncode == 2 or "more memory than this machine has" in line


def test_a_failed_write_names_the_file_and_leaves_no_partial_one(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text('{"old": true}\n')
    with pytest.raises(OSError) as caught, atomic_path(target) as tmp:
        tmp.write_text('{"half')
        raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.filename == str(target) and caught.value.errno == errno.ENOSPC
    assert target.read_text() == '{"old": true}\n' and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("{")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# ---- signals (real processes) --------------------------------------------------------------

def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    """llmqueue in a child whose SIGINT is not ignored (as under a terminal), printing ``ready``
    once imported so that a signal never lands in the interpreter's start-up."""
    code = ("import sys; from llmqueue.cli import main; print('ready', flush=True); "
            "sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline() == "ready\n"
    return proc


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigint_in_simulate_is_one_line_exit_130(tmp_path):
    proc = _start(["simulate", "fig1", "--set", "run.horizon_s=1e6", "--out", "out"], tmp_path)
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, err = _finish(proc)
    assert proc.returncode == 130, err
    one_error(err, "interrupted by SIGINT", "nothing written")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_in_compare_keeps_whole_files(tmp_path, sig):
    out = tmp_path / "c"
    proc = _start(["compare", "--horizon", "60000", "--schedulers", "orca,sarathi,vllm", "--no-plot",
                   "--out", str(out)], tmp_path)
    deadline = time.monotonic() + 60
    while not (out / "summary.json").exists():   # the first scheduler has finished
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    stdout, err = _finish(proc)
    assert proc.returncode == 128 + sig, err
    line = one_error(err, f"interrupted by {signal.Signals(sig).name}", "of 3 schedulers finished", "kept")
    summary = json.loads((out / "summary.json").read_text())
    finished = [r["scheduler"] for r in summary["runs"]]
    assert 1 <= len(finished) < 3 and f"{len(finished)} of 3 schedulers finished ({', '.join(finished)})" in line
    kept = line.split("kept ", 1)[1].split(", ")
    assert sorted(Path(k).name for k in kept) == ["summary.json", "timeseries.csv"]
    rows = list(csv.reader((out / "timeseries.csv").open()))
    assert len(rows) > 2 and len({len(r) for r in rows}) == 1
    assert rows[0][0] == "time_s" and finished[0] in stdout   # the table shows what finished
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "timeseries.csv"]   # no temporaries


# ---- paths and pipes -----------------------------------------------------------------------

def test_unicode_and_spaces_in_every_path(capsys, tmp_path):
    """Configs, output folders, stores and plots under a non-ASCII name with spaces; reading a
    store leaves nothing beside it (a read-only SQLite connection keeps its -wal and -shm files)."""
    where = tmp_path / "ünï cødé ☃"
    where.mkdir()
    code, text, _ = run_cli(capsys, "scenarios", "show", "fig1")
    config = where / "fïg 1.toml"
    config.write_text(text, encoding="utf-8")
    code, out, err = run_cli(capsys, "simulate", config, "--set", "run.horizon_s=30", "--out", where / "ōut")
    assert code == 0 and str(where / "ōut") in out, err
    assert {"summary.json", "requests.csv"} <= {p.name for p in (where / "ōut").iterdir()}
    code, out, err = run_cli(capsys, "compare", "--config", config, "--horizon", "30", "--schedulers", "orca,sarathi",
                             "--out", where / "cömpare")
    assert code == 0 and json.loads((where / "cömpare" / "summary.json").read_text(encoding="utf-8"))["runs"], err
    store = where / "störe.db"
    code, out, err = run_cli(capsys, "sweep", config, "--set", "run.horizon_s=20", "--grid", "workload.load=0.5,0.7",
                             "--jobs", "1", "--store", store)
    assert code == 0 and "2 ran ok" in out, err
    for command in (["results", store], ["results", store, "--csv", where / "rüns.csv"],
                    ["plot", store, "--kind", "latency-vs-load", "--out", where / "plöt.png"]):
        code, out, err = run_cli(capsys, *command)
        assert code == 0, (command, err)
    assert (where / "plöt.png").read_bytes()[:4] == b"\x89PNG" and len(list(csv.reader((where / "rüns.csv").open()))) == 3
    assert sorted(p.name for p in where.glob("störe.db*")) == ["störe.db"]
    code, _, err = run_cli(capsys, "capacity", where / "nöpe.toml")
    assert code == 2
    one_error(err, "nöpe.toml", "an existing TOML file")


@pytest.mark.parametrize("command", [["scenarios"], ["capacity", "fig1"], ["simulate", "fig1", "--set", "run.horizon_s=20"]])
def test_output_into_a_closed_pipe_ends_quietly(command):
    """`llmqueue ... | head -1` where the reader has gone: no traceback, no 'Exception ignored'."""
    proc = subprocess.Popen([sys.executable, "-m", "llmqueue", *command], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()           # before the command prints anything: its first write fails
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == "" and proc.returncode in (0, 1), (proc.returncode, err)


# ---- values: a sample of the audit (every key of the schema against hostile values) ---------

@pytest.mark.parametrize("setting", [
    "engine.token_budget=0", "engine.token_budget=1.5", "engine.token_budget='x'", "engine.max_batch_requests=-1",
    "engine.batch_time.c_ms=nan", "engine.batch_time.a_ms=-1", "engine.batch_time.b0=0", "engine.batch_time.model=[]",
    "engine.batch_time.model=1", "workload.load=inf", "workload.rate=-0.0", "workload.prompt.mean=1e400",
    "workload.output.mean=[1,2]", "workload.prompt.dist=''", "workload.arrival={a=1}", "run.horizon_s=true",
    "run.requests=0", "run.seed=-1", "run.verdict_tolerance=nan", "run.reject_tolerance=2", "workload.loop=0",
    "engine.kv_blocks=-1", "run.method='nope'", "engine.scheduler=[]",
])
def test_a_hostile_value_is_one_line_naming_its_key(capsys, setting):
    code, _, err = run_cli(capsys, "simulate", "fig1", "--set", "run.horizon_s=5", "--set", setting)
    assert code == 2, err
    one_error(err, setting.split("=")[0], "is not allowed")


def test_an_engine_too_slow_to_measure_is_a_verdict_not_a_crash(capsys):
    """A batch time of 1e308 ms: capacity underflows to 0 and so does the distance to it; the
    relaxation time is infinite and the run is inconclusive (it was a ZeroDivisionError)."""
    code, out, err = run_cli(capsys, "simulate", "fig1", "--set", "run.horizon_s=5",
                             "--set", "engine.batch_time.c_ms=1e308")
    assert code == 0 and "inconclusive" in out and "internal error" not in err, err


@pytest.mark.parametrize("setting", [
    "network.load=-1", "network.load=nan", "engines.0.token_budget=0", "engines.0.batch_time.duration_ms=-1",
    "engines.0.policy='nope'", "engines.0.class_priority=[1,2]", "engines.0.name=''", "engines.0.scheduler=true",
    "classes.0.rate=inf", "classes.0.arrival={a=1}", "classes.0.hops.0.engine='nope'", "classes.0.hops=[]",
    "classes.0.hops.0.prompt.mean=-1", "classes.0.hops.0.id=1.5", "engines=[]", "classes='x'",
    "engines.0.kv_blocks=-1", "run.horizon_s=0", "classes.0.rate=1e308",
])
def test_a_hostile_network_value_is_one_line_naming_its_key(capsys, setting):
    code, _, err = run_cli(capsys, "network", "simulate", "rybko-stolyar", "--set", "run.horizon_s=50", "--set", setting)
    assert code == 2, err
    line = one_error(err, setting.split("=")[0].split(".")[0])
    assert "is not allowed" in line or "is missing" in line, line
