"""Sweeps (docs/sweeps.md): grids, validation before any run, the store (resume after Ctrl-C
and kill -9, failed points), local executor, max-rate bisection, results and plots."""

from __future__ import annotations

import csv
import io
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
from llmqueue.cli.common import config_from
from llmqueue.errors import ConfigError, LlmqueueError
from llmqueue.sweep import LocalExecutor, Store, expand, parse_grid, parse_slo, run_point, seed_list, sweep
from llmqueue.sweep.driver import run_tasks, tasks_of
from llmqueue.sweep.grid import parse_axis
from llmqueue.sweep.maxrate import Bisection, judge, max_rate

SRC = str(Path(__file__).resolve().parents[1] / "src")
SMALL = ["run.requests=300"]  # ~20 simulated seconds of Fig. 1: enough arrivals for a verdict


def small_points(schedulers=("orca", "vllm"), rates=(4, 12), seeds=2):
    base = config_from("fig1", SMALL)
    axes = parse_grid([f"engine.scheduler={','.join(schedulers)}", f"workload.rate={','.join(map(str, rates))}"])
    return expand(base, axes, seed_list(seeds, 0))


# ---- grids -----------------------------------------------------------------------------

def test_ranges_include_stop_and_step_floats_cleanly():
    assert parse_axis("workload.rate=2:20:1").values == tuple(range(2, 21))
    assert parse_axis("workload.load=0.5:1:0.2").values == (0.5, 0.7, 0.9)
    assert parse_axis("workload.load=0.1:0.3:0.1").values == (0.1, 0.2, 0.3)
    assert parse_axis("engine.token_budget=128").values == (128,)
    assert parse_axis("engine.scheduler=orca, sarathi").values == ("orca", "sarathi")
    tables = parse_axis('workload.prompt=[{dist="fixed", value=100}, {dist="poisson", mean=50}]').values
    assert tables == ({"dist": "fixed", "value": 100}, {"dist": "poisson", "mean": 50})


@pytest.mark.parametrize("item, says", [
    ("workload.rate=5:1:1", "empty"), ("workload.rate=1:5:0", "empty"), ("workload.rate=1:5", "start:stop:step"),
    ("workload.rate=a:5:1", "start:stop:step"), ("workload.rate=", "at least one value"),
    ("workload.rate=1,,2", "without empty items"), ("workload.rate=1,1", "distinct"), ("run.seed=1,2", "--seeds"),
    ("noequals", "KEY=V1"),
])
def test_malformed_axes_are_refused(item, says):
    with pytest.raises(ConfigError, match=says):
        parse_axis(item)


def test_expand_orders_points_and_validates_each():
    points = small_points(rates=(4, 12, 13))
    assert len(points) == 2 * 3 * 2
    assert points[0].overrides == (("engine.scheduler", "orca"), ("workload.rate", 4)) and points[0].seed == 0
    assert points[1].seed == 1 and points[-1].overrides[0] == ("engine.scheduler", "vllm")
    assert points[0].config.workload["rate"] == 4 and "load" not in points[0].config.workload
    assert points[0].config_hash == points[1].config_hash  # the seed is not part of the hash
    assert len({p.config_hash for p in points}) == 6
    # A table value set by one axis is copied, never shared with (and mutated by) another point.
    base = config_from("fig1", SMALL)
    axes = parse_grid(['workload.prompt=[{dist="poisson", mean=50}]', "workload.prompt.mean=60,70"])
    pts = expand(base, axes, [0])
    assert [p.config.workload["prompt"]["mean"] for p in pts] == [60, 70]
    assert axes[0].values[0] == {"dist": "poisson", "mean": 50}


@pytest.mark.parametrize("grid, says", [
    (["engine.foo=1"], "engine.foo = 1 is not allowed: a known key"),
    (["engine.token_budget=256,abc"], "grid point engine.token_budget=abc: engine.token_budget = 'abc'"),
    (["workload.prompt.mean=10,abc"], "workload.prompt.mean = 'abc' is not allowed"),
    (["engine.scheduler=vllm,orca", "engine.split_prompts=true"], "engine.scheduler=orca, engine.split_prompts=true"),
    (["workload.rate=9:1:1"], "this range is empty"),
    (["engine.scheduler=orca", "engine.scheduler=vllm"], "each key once"),
])
def test_bad_grids_fail_before_any_run(capsys, tmp_path, grid, says):
    store = tmp_path / "s.db"
    argv = ["sweep", "fig1", "--store", str(store), *[a for g in grid for a in ("--grid", g)]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not store.exists()  # nothing ran, nothing was created


# ---- store and local executor -----------------------------------------------------------

def test_sweep_stores_each_point_once_and_rerun_skips(tmp_path):
    points = small_points()
    with Store(tmp_path / "a.db") as store:
        stats = sweep(points, store, LocalExecutor(2))
        assert (stats.points, stats.ok, stats.failed, stats.skipped) == (8, 8, 0, 0)
        runs = store.runs()
        assert len(runs) == 8 and len({(r["config_hash"], r["seed"]) for r in runs}) == 8
        run = runs[0]
        assert run["status"] == "ok" and run["version"] and run["wall_s"] > 0 and run["error"] is None
        assert "wall_s" not in run["summary"] and run["summary"]["arrived"] == 300
        assert run["config"]["run"]["requests"] == 300
        again = sweep(points, store, LocalExecutor(2))
        assert (again.skipped, again.ok) == (8, 0)
        first = {(r["config_hash"], r["seed"]): r["summary"] for r in store.runs()}
    # One worker or two, the same stored summaries (determinism; what makes Ray comparable).
    with Store(tmp_path / "b.db") as other:
        sweep(points, other, LocalExecutor(1))
        assert {(r["config_hash"], r["seed"]): r["summary"] for r in other.runs()} == first


def flaky(task):
    """A task function for the worker processes: seed 1 raises, seed 2 kills its process."""
    if task.seed == 1:
        raise RuntimeError("boom")
    if task.seed == 2:
        os._exit(3)
    return run_point(task)


def test_failed_and_crashed_points_are_recorded_and_the_sweep_goes_on(tmp_path):
    points = small_points(schedulers=("orca",), rates=(4, 8), seeds=4)
    with Store(tmp_path / "s.db") as store:
        stats = sweep(points, store, LocalExecutor(2), fn=flaky)
        assert (stats.ok, stats.failed) == (4, 4)
        by_seed: dict[int, list[dict]] = {}
        for r in store.runs():
            by_seed.setdefault(r["seed"], []).append(r)
        assert all(r["status"] == "ok" for s in (0, 3) for r in by_seed[s])
        assert all(r["status"] == "failed" and r["error"] == "RuntimeError: boom" for r in by_seed[1])
        assert all(r["status"] == "failed" and "worker process died (exit code 3)" in r["error"] for r in by_seed[2])
        assert all(r["summary"] is None for s in (1, 2) for r in by_seed[s])
        # A plain re-run skips failed points too; --retry-failed runs them again, in place.
        assert sweep(points, store, LocalExecutor(2)).skipped == 8
        retried = sweep(points, store, LocalExecutor(2), retry_failed=True)
        assert (retried.skipped, retried.ok) == (4, 4)
        runs = store.runs()
        assert len(runs) == 8 and all(r["status"] == "ok" for r in runs)


def test_store_refuses_other_files(tmp_path):
    bad = tmp_path / "x.db"
    bad.write_text("not a database at all, just text" * 10)
    with pytest.raises(LlmqueueError, match="not a usable SQLite database"):
        Store(bad)
    with pytest.raises(LlmqueueError, match="no such file"):
        Store(tmp_path / "missing.db", readonly=True)


def test_interrupt_keeps_finished_runs_and_stops_the_workers(tmp_path):
    import multiprocessing

    points = small_points()
    seen = []

    def stop_after_three(task, outcome):
        seen.append(task)
        if len(seen) == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, between two stored runs

    with Store(tmp_path / "s.db") as store:
        with pytest.raises(KeyboardInterrupt):
            sweep(points, store, LocalExecutor(2), on_result=stop_after_three)
        assert len(store.runs()) == 3 and not multiprocessing.active_children()
        stats = sweep(points, store, LocalExecutor(2))
        assert (stats.skipped, stats.ok) == (3, 5) and len(store.runs()) == 8


def _sweep_cmd(store: Path) -> list[str]:
    return [sys.executable, "-m", "llmqueue", "sweep", "fig1", "--set", "run.requests=4000", "--grid",
            "engine.scheduler=orca,sarathi,vllm", "--grid", "workload.rate=6,12", "--seeds", "2", "--jobs", "1",
            "--store", str(store)]


def _stored(store: Path) -> dict:
    with sqlite3.connect(store) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        try:
            rows = conn.execute("SELECT config_hash, seed, status, finished_at, summary FROM runs").fetchall()
        except sqlite3.OperationalError:  # the table is being created
            return {}
    assert len(rows) == len({(h, s) for h, s, *_ in rows})
    return {(h, s): (status, t, summary) for h, s, status, t, summary in rows}


def _interrupt(store: Path, env: dict, sig: int, after: int) -> subprocess.CompletedProcess:
    """Start the sweep, wait until it has stored ``after`` more runs, send ``sig`` to its whole
    process group (the driver and its workers, as a terminal's Ctrl-C or ``kill -9`` of a job)."""
    before = len(_stored(store)) if store.exists() else 0
    proc = subprocess.Popen(_sweep_cmd(store), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (store.exists() and len(_stored(store)) >= before + after):
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline, "the sweep stored too few runs in time"
            time.sleep(0.02)
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_ctrl_c_and_kill_9_then_resume_with_every_point_once(tmp_path):
    store = tmp_path / "s.db"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    stopped = _interrupt(store, env, signal.SIGINT, after=2)
    assert stopped.returncode == 130 and "run the same command again to resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    first = _stored(store)
    killed = _interrupt(store, env, signal.SIGKILL, after=2)
    assert killed.returncode == -signal.SIGKILL
    second = _stored(store)
    assert len(first) + 2 <= len(second) < 12 and all(second[k] == v for k, v in first.items())
    done = subprocess.run(_sweep_cmd(store), env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert f"{len(second)} already stored, {12 - len(second)} ran ok, 0 failed" in done.stdout
    final = _stored(store)
    assert len(final) == 12 and all(final[k] == v for k, v in second.items())  # finished runs untouched
    assert all(status == "ok" and json.loads(summary)["arrived"] == 4000 for status, _, summary in final.values())


# ---- results and plots --------------------------------------------------------------------

@pytest.fixture(scope="module")
def filled_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s.db"
    with Store(path) as store:
        sweep(small_points(rates=(4, 12, 16)), store, LocalExecutor(2))
    return path


def test_results_where_and_csv(capsys, filled_store, tmp_path):
    assert main(["results", str(filled_store), "--where", "engine.scheduler=vllm", "--where", "workload.rate>=12"]) == 0
    out = capsys.readouterr().out
    assert "4 rows" in out and "engine.scheduler" not in out.splitlines()[0]  # only the varying columns
    assert main(["results", str(filled_store), "--where", "scheduler!=vllm", "--csv", "-"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 6 and {r["engine.scheduler"] for r in rows} == {"orca"}
    assert {"config_hash", "seed", "status", "verdict", "ttft_s.p99", "workload.rate", "version"} <= set(rows[0])
    out_csv = tmp_path / "t.csv"
    assert main(["results", str(filled_store), "--where", "seed=1", "--csv", str(out_csv)]) == 0
    assert len(list(csv.DictReader(out_csv.open()))) == 6
    assert main(["results", str(filled_store), "--where", "nosuch=1"]) == 2
    assert "nosuch=1" in capsys.readouterr().err
    assert main(["results", str(tmp_path / "none.db")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_parquet_needs_pyarrow(capsys, filled_store, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    assert main(["results", str(filled_store), "--parquet", str(tmp_path / "t.parquet")]) == 2
    assert "--parquet needs pyarrow" in capsys.readouterr().err
    assert not (tmp_path / "t.parquet").exists()


def test_parquet_round_trip(filled_store, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is optional")
    assert main(["results", str(filled_store), "--parquet", str(tmp_path / "t.parquet")]) == 0
    table = pq.read_table(tmp_path / "t.parquet")
    assert table.num_rows == 12 and "ttft_s.p99" in table.column_names


@pytest.mark.parametrize("kind", ["stability-map", "latency-vs-load", "max-rate-vs-budget"])
def test_plots(capsys, filled_store, tmp_path, kind):
    out = tmp_path / f"{kind}.png"
    assert main(["plot", str(filled_store), "--kind", kind, "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


# ---- max-rate ----------------------------------------------------------------------------

def test_bisection_brackets_a_threshold():
    for threshold in (0.3, 7.77, 12.0, 40.0):
        b = Bisection(start=10.0, rel_tol=0.01)
        probes = 0
        while (rate := b.next_rate()) is not None:
            b.record(rate, rate <= threshold)
            probes += 1
        assert b.lo <= threshold < b.hi and b.hi - b.lo <= 0.01 * b.lo and probes < 20
    never = Bisection(start=10.0, rel_tol=0.01)
    while (rate := never.next_rate()) is not None:
        never.record(rate, False)
    assert never.lo is None and never.hi < 10.0 / 2 ** 9


def _run(seed, verdict, ttft_p99=0.5, status="ok"):
    summary = {"verdict": verdict, "ttft_s": {"p99": ttft_p99}, "tbt_s": {"p99": 0.05}, "e2e_s": {"p99": 1.0}}
    return {"seed": seed, "status": status, "summary": summary if status == "ok" else None, "error": "x"}


def test_judge_counts_inconclusive_slo_and_failures_as_not_passing():
    slo = [parse_slo("ttft_p99=1.0")]
    assert judge([_run(0, "stable"), _run(1, "stable")], slo)[0]
    passed, counts, reason = judge([_run(0, "stable"), _run(1, "inconclusive")], slo)
    assert not passed and counts == {"stable": 1, "inconclusive": 1} and "seed 1 inconclusive" in reason
    assert not judge([_run(0, "stable", ttft_p99=1.5)], slo)[0]
    assert not judge([_run(0, "stable", ttft_p99=None)], slo)[0]
    assert not judge([_run(0, "stable", status="failed")], [])[0]


@pytest.mark.parametrize("item", ["ttft=1", "ttft_p95=1", "foo_p99=1", "ttft_p99=-1", "ttft_p99=x", "ttft_p99"])
def test_bad_slos_are_refused(item):
    with pytest.raises(ConfigError, match="--slo"):
        parse_slo(item)


def test_max_rate_finds_a_bracket_and_reuses_the_store(capsys, tmp_path):
    """A short Theorem 2 search (Sarathi, 2 minutes, 2 seeds, 5 %): the answer lies near λ*,
    the search is stored, and the same search again runs nothing new."""
    store = tmp_path / "m.db"
    argv = ["max-rate", "theorem2", "--set", "engine.scheduler=sarathi", "--set", "run.horizon_s=120",
            "--seeds", "2", "--rel-tol", "0.05", "--jobs", "2", "--store", str(store)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "λ* (Thm 2)" in out and "16.715" in out and "confidence: a rate passes when each of 2 seeds" in out
    with Store(store, readonly=True) as s:
        searches, n_runs = s.max_rates(), len(s.runs())
    assert len(searches) == 1
    best, worst = searches[0]["max_rate_rps"], searches[0]["failed_rate_rps"]
    assert 0.25 * 16.71 < best < worst <= 1.1 * 16.71 and worst - best <= 0.05 * best
    seen = []
    base = config_from("theorem2", ["engine.scheduler=sarathi", "run.horizon_s=120"])
    with Store(store) as s:
        again = max_rate([((), base)], [0, 1], s, LocalExecutor(1), rel_tol=0.05,
                         on_start=lambda todo, skipped: seen.append(todo))
        assert len(s.runs()) == n_runs
    assert again[0].max_rate_rps == best and set(seen) == {0}


def test_max_rate_refuses_rate_grids_and_traces(capsys, tmp_path):
    assert main(["max-rate", "fig1", "--grid", "workload.rate=1,2", "--store", str(tmp_path / "m.db")]) == 2
    assert "searches over the arrival rate itself" in capsys.readouterr().err
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" +
                     "".join(f"{i * 0.1},{10},{5}\n" for i in range(200)))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[workload]\narrival = "trace"\ntrace = "{trace}"\n')
    assert main(["max-rate", str(cfg), "--store", str(tmp_path / "m.db")]) == 2
    assert "workload.arrival = 'trace' is not allowed" in capsys.readouterr().err


def test_max_rate_stops_on_a_run_that_errors(tmp_path):
    """An error is not evidence of instability: the search stops, naming the run."""
    lengths = tmp_path / "n.csv"
    lengths.write_text("n\n" + "".join(f"{90 + i}\n" for i in range(20)))
    prompt = f'workload.prompt={{dist="empirical", trace="{lengths}", column="n"}}'
    base = config_from("theorem2", ["run.horizon_s=60", prompt])
    with Store(tmp_path / "m.db") as store:
        original = LocalExecutor.run

        def run_then_lose_the_file(self, tasks, fn=run_point):
            lengths.unlink(missing_ok=True)  # vanishes after validation, before the runs
            yield from original(self, tasks, fn)

        LocalExecutor.run = run_then_lose_the_file
        try:
            with pytest.raises(LlmqueueError, match=r"max-rate: the run at rate 16.7\d* req/s, seed 0 failed .*n.csv"):
                max_rate([((), base)], [0], store, LocalExecutor(1))
        finally:
            LocalExecutor.run = original
        assert store.max_rates() == [] and store.runs()[0]["status"] == "failed"


def test_progress_bar_shows_counts_and_eta(capsys):
    from llmqueue.cli.sweep import Bar

    bar = Bar(enabled=True)
    bar.begin(4, 2)
    bar.step(None, {"status": "ok"})
    bar.step(None, {"status": "failed"})
    bar.close()
    err = capsys.readouterr().err
    assert "2 points already stored: skipped" in err and "2/4" in err and "1 failed" in err and "ETA 0:0" in err
    quiet = Bar(enabled=False)
    quiet.begin(3, 0)
    quiet.step(None, {"status": "ok"})
    assert capsys.readouterr().err == ""


def test_run_tasks_with_retry_failed_only_reruns_failures(tmp_path):
    points = small_points(schedulers=("orca",), rates=(4,), seeds=3)
    tasks = tasks_of(points)
    with Store(tmp_path / "s.db") as store:
        run_tasks(tasks, store, LocalExecutor(1), fn=flaky)
        assert sorted(r["status"] for r in store.runs()) == ["failed", "failed", "ok"]
        seen = []
        run_tasks(tasks, store, LocalExecutor(1), retry_failed=True, on_start=lambda todo, skipped: seen.append(todo))
        assert seen == [2] and all(r["status"] == "ok" for r in store.runs())


@pytest.mark.slow
def test_max_rate_on_theorem2_matches_lambda_star_for_work_conserving_schedulers(tmp_path):
    """Must show (issue 6): on the Theorem 2 workload (fixed 100 + 100 tokens, b_max = 512,
    λ* = 16.71 req/s, 30 simulated minutes, 3 seeds), Sarathi and Orca sustain within 3 % of
    λ*; FasterTransformer and vanilla vLLM (not work-conserving) fall well below it."""
    def bases(names):
        return [((("engine.scheduler", n),), config_from("theorem2", [f"engine.scheduler={n}"])) for n in names]

    with Store(tmp_path / "m.db") as store:
        good = max_rate(bases(["sarathi", "orca"]), [0, 1, 2], store, LocalExecutor(2), rel_tol=0.01)
        bad = max_rate(bases(["fastertransformer", "vllm"]), [0, 1, 2], store, LocalExecutor(2), rel_tol=0.05)
    for r in good:
        assert r.lambda_star_rps == pytest.approx(16.71, abs=0.01)
        assert abs(r.max_rate_rps / r.lambda_star_rps - 1) <= 0.03, (r.overrides, r.max_rate_rps)
    ft, vllm = (r.max_rate_rps / r.lambda_star_rps for r in bad)
    assert ft < 0.2 and vllm < 0.9, (ft, vllm)


# ---- stores of one kind of work; results and plots of one workload (issue 17) ----------------

@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory):
    """Two sweeps of different workloads (prompt means 129 and 512) into one store."""
    path = tmp_path_factory.mktemp("mixed") / "mixed.db"
    for mean in (129, 512):
        assert main(["sweep", "fig1", "--set", "run.horizon_s=30", "--set", f"workload.prompt.mean={mean}",
                     "--grid", "workload.load=0.5,0.8", "--jobs", "1", "--store", str(path)]) == 0
    return path


def test_results_prints_one_table_per_workload(capsys, mixed_store):
    capsys.readouterr()
    assert main(["results", str(mixed_store)]) == 0
    out = capsys.readouterr().out
    assert "4 rows of 2 workloads (they differ in workload.prompt.mean)" in out
    assert "workload 1 of 2: workload.prompt.mean=129" in out and "workload 2 of 2: workload.prompt.mean=512" in out
    assert out.count("2 rows") == 2
    assert main(["results", str(mixed_store), "--where", "workload.prompt.mean=512"]) == 0
    assert "workloads" not in capsys.readouterr().out          # one workload: one table


@pytest.mark.parametrize("kind", ["stability-map", "latency-vs-load", "max-rate-vs-budget"])
def test_a_plot_of_two_workloads_is_refused_with_the_filter_that_separates_them(capsys, tmp_path, mixed_store, kind):
    capsys.readouterr()
    assert main(["plot", str(mixed_store), "--kind", kind, "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmqueue: error: ") and len(err.splitlines()) == 1, err
    assert f"the {kind} plot would mix 2 workloads (they differ in workload.prompt.mean)" in err
    assert "--where workload.prompt.mean=129; --where workload.prompt.mean=512" in err
    assert not (tmp_path / "p.png").exists()
    assert main(["plot", str(mixed_store), "--kind", kind, "--where", "workload.prompt.mean=129",
                 "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").exists()


def test_sweep_and_max_rate_have_their_own_default_stores():
    from llmqueue.cli import build_parser
    from llmqueue.sweep import DEFAULT_MAX_RATE_STORE, DEFAULT_STORE

    parser = build_parser()
    assert parser.parse_args(["sweep", "fig1"]).store == DEFAULT_STORE == "llmqueue_output/sweep.db"
    assert parser.parse_args(["max-rate", "fig1"]).store == DEFAULT_MAX_RATE_STORE == "llmqueue_output/max_rate.db"
