"""Sweeps on Ray (the optional extra ``llmqueue[ray]``), against a local Ray instance that this
module starts (2 CPUs, no dashboard) and stops. Skipped when Ray is not installed; the tests
that start Ray are marked slow (CI runs them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmqueue.cli.common import config_from
from llmqueue.sweep import LocalExecutor, RayExecutor, Store, expand, parse_grid, seed_list, sweep

ray = pytest.importorskip("ray", reason="Ray is not installed: it is the optional extra (pip install 'llmqueue[ray]')")

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def ray_cluster():
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


def _summaries(store: Store) -> dict:
    return {(r["config_hash"], r["seed"]): (r["status"], r["summary"], r["error"]) for r in store.runs()}


@pytest.mark.slow  # starting Ray takes 5-20 s on the 2-core machine
def test_ray_and_local_store_identical_results_and_failures(ray_cluster, tmp_path):
    """The same grid through local processes and through Ray: identical stored summaries; a
    point whose input file vanished after validation is a failed point in both, with its error."""
    lengths = tmp_path / "lengths.csv"
    lengths.write_text("n\n" + "".join(f"{50 + 7 * i}\n" for i in range(40)))
    base = config_from("fig1", ["run.requests=400"])
    prompts = f'workload.prompt=[{{dist="poisson", mean=129}}, {{dist="empirical", trace="{lengths}", column="n"}}]'
    axes = parse_grid(["engine.scheduler=orca,vllm", "workload.rate=5,13", prompts])
    points = expand(base, axes, seed_list(2, 0))  # validated while the file exists
    lengths.unlink()
    with Store(tmp_path / "local.db") as local, Store(tmp_path / "ray.db") as remote:
        a = sweep(points, local, LocalExecutor(2))
        b = sweep(points, remote, RayExecutor("auto"))  # uses the connection this module opened
        assert (a.ok, a.failed) == (b.ok, b.failed) == (8, 8)
        assert _summaries(local) == _summaries(remote)
        failed = [v for v in _summaries(local).values() if v[0] == "failed"]
    assert all("lengths.csv" in error for _, _, error in failed), failed[0]


@pytest.mark.slow
def test_cli_sweeps_on_a_ray_cluster_by_address(ray_cluster, tmp_path):
    """``llmqueue sweep --ray HOST:PORT`` in its own process joins this module's Ray instance."""
    store = tmp_path / "s.db"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "llmqueue", "sweep", "fig1", "--set", "run.requests=300", "--grid",
           "engine.scheduler=orca,sarathi", "--seeds", "2", "--ray", ray_cluster, "--store", str(store)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "4 ran ok, 0 failed, in" in done.stdout and f"on Ray ({ray_cluster})" in done.stdout
    with Store(store, readonly=True) as s:
        assert len(s.runs()) == 4 and {r["status"] for r in s.runs()} == {"ok"}


def test_bad_ray_address_is_one_clear_error(tmp_path, capsys, monkeypatch):
    from llmqueue.cli import main

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a fresh process would see it
    monkeypatch.setattr(ray, "init", lambda **kw: (_ for _ in ()).throw(ConnectionError("no cluster at 1.2.3.4:1")))
    code = main(["sweep", "fig1", "--set", "run.requests=300", "--ray", "1.2.3.4:1", "--store", str(tmp_path / "s.db")])
    err = capsys.readouterr().err
    assert code == 2 and "--ray 1.2.3.4:1: cannot start or reach a Ray cluster (ConnectionError" in err
    assert err.count("\n") == 1 and not (tmp_path / "s.db").exists()  # failed before creating the store


FIG1_GRID = ["engine.scheduler=fastertransformer,vllm,orca,sarathi", "engine.token_budget=128,256,512,1024",
             "workload.load=0.3:1.2:0.1"]


@pytest.mark.slow
def test_fig1_grid_local_and_ray_identical(ray_cluster, tmp_path):
    """Must show (issue 6): 4 schedulers x 4 budgets x 10 loads x 3 seeds of the Fig. 1 workload
    (1,000 requests a run) give identical stored summaries through local processes and Ray."""
    base = config_from("fig1", ["run.requests=1000"])
    points = expand(base, parse_grid(FIG1_GRID), seed_list(3, 0))
    assert len(points) == 480
    with Store(tmp_path / "local.db") as local, Store(tmp_path / "ray.db") as remote:
        assert sweep(points, local, LocalExecutor(2)).ok == 480
        assert sweep(points, remote, RayExecutor("auto")).ok == 480
        a, b = _summaries(local), _summaries(remote)
    assert len(a) == 480 and a == b
