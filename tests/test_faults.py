"""Faults in the middle of long commands (issue 16, docs/config.md "Errors, signals and limits"):
a sweep stopped by SIGTERM or SIGKILL keeps every finished run, leaves no lease and no partial
file, and the same command resumes it to results byte-identical to an uninterrupted sweep run
with another number of workers; a compare killed mid-run leaves only whole files."""

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

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")])}
# six points of about half a second each on the compiled core: long enough to stop one mid-sweep
SWEEP = ["sweep", "fig1", "--set", "run.horizon_s=30000", "--grid", "workload.rate=5:10:1"]
POINTS = 6
UNTIMED = {"wall_s", "finished_at"}   # when and how long a run took: the only columns allowed to differ


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmqueue", *args], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _done(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _stored(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:   # the tables are being created
        return 0


def _wait_stored(proc: subprocess.Popen, path: Path, n: int) -> None:
    deadline = time.monotonic() + 180
    while _stored(path) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the sweep stored too few runs in time"
        time.sleep(0.02)


def _table(store: Path, cwd: Path) -> list[dict]:
    """``llmqueue results --csv -`` of a store, every column but the timing ones, in key order."""
    out, err = _done(_cli(["results", str(store), "--csv", "-"], cwd), 60)
    assert err == "", err
    rows = [{k: v for k, v in row.items() if k not in UNTIMED} for row in csv.DictReader(io.StringIO(out))]
    return sorted(rows, key=lambda r: (r["config_hash"], r["seed"]))


def _check_store(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0   # nothing held by the dead
        statuses = {s for (s,) in conn.execute("SELECT status FROM runs")}
    assert statuses <= {"ok"}, statuses


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The sweep run whole, with one worker."""
    where = tmp_path_factory.mktemp("whole")
    out, err = _done(_cli([*SWEEP, "--jobs", "1", "--store", "ref.db"], where))
    assert f"{POINTS} ran ok, 0 failed" in out, (out, err)
    return where, _table(where / "ref.db", where)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_sweep_keeps_its_runs_and_resumes_to_identical_results(tmp_path, reference, sig):
    where, whole = reference
    proc = _cli([*SWEEP, "--jobs", "2", "--store", "s.db"], tmp_path)
    _wait_stored(proc, tmp_path / "s.db", 1)
    if sig == signal.SIGKILL:   # the driver and its workers at once, as the kernel's OOM killer would
        os.killpg(proc.pid, signal.SIGKILL)
    else:                       # `kill PID`: the driver only; it stops its workers
        proc.send_signal(sig)
    out, err = _done(proc)
    assert proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL) if sig == signal.SIGKILL else \
        proc.returncode == 143, (proc.returncode, err)
    kept = _stored(tmp_path / "s.db")
    assert 1 <= kept < POINTS, kept        # stopped mid-sweep, finished runs kept
    if sig == signal.SIGTERM:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("llmqueue: interrupted by SIGTERM: "), err
        assert "run the same command again to resume" in lines[0] and "Traceback" not in err
        _check_store(tmp_path / "s.db")    # its leases released on the way out
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("s.db")) == []  # no stray files

    out, err = _done(_cli([*SWEEP, "--jobs", "1", "--store", "s.db"], tmp_path))   # the same command again
    assert f"{kept} already stored" in out and f"{POINTS - kept} ran ok, 0 failed" in out, (out, err)
    _check_store(tmp_path / "s.db")
    assert _table(tmp_path / "s.db", tmp_path) == whole      # byte for byte, but for the timing columns


def test_sweep_results_do_not_depend_on_the_number_of_workers(tmp_path, reference):
    _, whole = reference
    out, err = _done(_cli([*SWEEP, "--jobs", "3", "--store", "three.db"], tmp_path))
    assert f"{POINTS} ran ok" in out, (out, err)
    assert _table(tmp_path / "three.db", tmp_path) == whole


@pytest.mark.slow
def test_a_killed_compare_leaves_only_whole_files(tmp_path):
    out = tmp_path / "c"
    proc = _cli(["compare", "--horizon", "60000", "--schedulers", "orca,sarathi,vllm", "--out", str(out)], tmp_path)
    deadline = time.monotonic() + 120
    while not (out / "summary.json").exists():   # the first scheduler has finished and been written
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    files = sorted(out.iterdir())
    whole = [f for f in files if not f.name.startswith(".")]
    summary = json.loads((out / "summary.json").read_text())      # valid JSON, not a truncated one
    assert summary["runs"] and all(r["scheduler"] in ("orca", "sarathi", "vllm") for r in summary["runs"])
    for f in whole:
        if f.suffix == ".csv":
            rows = list(csv.reader(f.open()))
            assert len(rows) > 1 and len({len(r) for r in rows}) == 1, f   # no truncated last row
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.read_bytes()[-8:-4] == b"IEND", f
    # a write cut short by SIGKILL can only leave its hidden temporary, never a partial named file
    assert all(f.name.startswith(".") and ".tmp" in f.name for f in files if f not in whole), files
