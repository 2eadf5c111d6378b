"""Concurrent sweeps on one store (docs/sweeps.md, issue 16): points leased in the store, a
point another live process runs left to it (and waited for), a dead owner's leases taken
over, every point stored exactly once with the summaries of a single worker; stores from
before leases migrate in place."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmqueue.sweep import Store, run_point
from llmqueue.sweep.driver import run_tasks, tasks_of
from llmqueue.sweep.executors import call
from llmqueue.sweep.store import BUSY, CLAIMED, RECLAIMED, SCHEMA_VERSION, STORED, Owner, pid_alive

import lease_worker

TESTS = Path(__file__).resolve().parent
SRC = str(TESTS.parent / "src")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(TESTS), os.environ.get("PYTHONPATH", "")])}
N = 12


class Inline:
    """An executor in this process: takes ``ahead`` tasks (claiming them, as that many busy
    workers would), then runs the first; fast enough for the driver's logic."""

    def __init__(self, ahead: int = 1) -> None:
        self.ahead = ahead

    def run(self, tasks, fn=run_point):
        source, held = iter(tasks), []
        while True:
            while len(held) < self.ahead and (task := next(source, None)) is not None:
                held.append(task)
            if not held:
                return
            task = held.pop(0)
            yield task, call(fn, task)


@pytest.fixture(scope="module")
def tasks():
    return tasks_of(lease_worker.points())


@pytest.fixture(scope="module")
def reference(tasks, tmp_path_factory) -> dict:
    """(config hash, seed) -> summary JSON as one worker stores it."""
    path = tmp_path_factory.mktemp("ref") / "ref.db"
    with Store(path) as store:
        stats = run_tasks(tasks, store, Inline())
    assert stats.ok == N
    return _rows(path, "summary")


def _rows(path: Path, column: str) -> dict:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute(f"SELECT config_hash, seed, {column} FROM runs").fetchall()
    assert len(rows) == len({(h, s) for h, s, _ in rows})  # one row per point
    return {(h, s): v for h, s, v in rows}


def _leases(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT config_hash, seed, owner, pid FROM leases").fetchall()


def _foreign(host: str = "elsewhere.example", pid: int = 4242) -> Owner:
    return Owner(host, "another-machine", pid, "t0ken")


def _lapse(path: Path, owner: Owner) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE leases SET expires_at = 0 WHERE owner = ?", (owner.id,))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- the store's leases --------------------------------------------------------------------

def test_claim_busy_stale_and_finish_keep_one_row(tmp_path, tasks):
    path = tmp_path / "s.db"
    a, b = Owner.me(), _foreign()
    task = tasks[0]
    outcome = run_point(task)
    with Store(path) as sa, Store(path) as sb:
        assert sa.claim(task.key, a, None) == CLAIMED
        assert sa.claim(task.key, a, None) == CLAIMED       # its own lease: renewed
        assert sb.claim(task.key, b, None) == BUSY          # a live process on this machine holds it
        lease = sb.lease_of(task.key)
        assert lease.pid == os.getpid() and lease.host == a.host and lease.expires_at > time.time()
        _lapse(path, a)                                     # a paused past its expiry: stale
        assert sb.claim(task.key, b, None) == RECLAIMED
        assert sa.claim(task.key, a, None) == BUSY          # b is live now (another host: until expiry)
        # Both finish: the first stores, the second keeps that row (same result) and drops its lease.
        assert sa.finish(*task.key, task.data, {**outcome, "version": "first"}, a)
        assert sb.lease_of(task.key).owner == b.id          # a's late finish did not touch b's lease
        assert not sb.finish(*task.key, task.data, {**outcome, "version": "second"}, b)
        assert [r["version"] for r in sa.runs()] == ["first"] and sa.leases() == []
        # Stored since the caller looked: nothing to run.
        assert sb.claim(task.key, b, None) == STORED and sb.leases() == []


def test_retry_of_a_failed_point_replaces_it_only_under_its_lease(tmp_path, tasks):
    path = tmp_path / "s.db"
    a, b = Owner.me(), _foreign()
    task = tasks[1]
    with Store(path) as store:
        store.record(*task.key, task.data, {"status": "failed", "summary": None, "error": "boom"})
        seen = store.states()[task.key]
        assert store.claim(task.key, b, seen) == CLAIMED
        assert not store.finish(*task.key, task.data, run_point(task), a)   # not a's lease: kept failed
        assert store.statuses()[task.key] == "failed"
        assert store.finish(*task.key, task.data, run_point(task), b)
        assert store.statuses()[task.key] == "ok"
        assert store.claim(task.key, a, seen) == STORED     # replaced since a looked: not retried again


def test_dead_owner_on_this_machine_is_stale_at_once(tmp_path, tasks):
    me = Owner.me()
    dead = Owner(me.host, me.machine, _dead_pid(), "gone")
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while pid_alive(zombie.pid):      # exited, not yet reaped: a zombie counts as dead
        assert time.monotonic() < deadline
        time.sleep(0.01)
    zombie.wait()
    assert pid_alive(os.getpid()) and not pid_alive(dead.pid) and not pid_alive(0)
    with Store(tmp_path / "s.db") as store:
        assert store.claim(tasks[0].key, dead, None) == CLAIMED
        assert store.claim(tasks[0].key, me, None) == RECLAIMED     # long before its expiry
        # Same host name, another machine (boot or pid namespace): its pid says nothing, expiry decides.
        other = Owner(me.host, "other-boot", dead.pid, "x")
        assert store.claim(tasks[1].key, other, None) == CLAIMED
        assert store.claim(tasks[1].key, me, None) == BUSY


def test_heartbeat_renews_and_the_end_releases(tmp_path, tasks):
    path = tmp_path / "s.db"
    me = Owner.me()
    with Store(path) as store:
        with store.holding(me, lease_s=0.4):
            store.claim(tasks[0].key, me, None, lease_s=0.4)
            time.sleep(1.0)
            assert store.lease_of(tasks[0].key).expires_at > time.time()   # renewed while held
            with Store(path) as other:
                assert other.claim(tasks[0].key, _foreign(), None) == BUSY
        assert store.leases() == []


def test_an_old_store_migrates_in_place_and_old_readers_are_refused_clearly(tmp_path, tasks):
    path = tmp_path / "v1.db"
    old = sqlite3.connect(path)   # a store as llmqueue wrote it before leases (schema version 1)
    old.executescript("""
        PRAGMA journal_mode = WAL;
        CREATE TABLE runs (config_hash TEXT NOT NULL, seed INTEGER NOT NULL, config TEXT NOT NULL, summary TEXT,
            status TEXT NOT NULL CHECK (status IN ('ok', 'failed')), error TEXT, version TEXT NOT NULL,
            wall_s REAL, finished_at TEXT NOT NULL, PRIMARY KEY (config_hash, seed));
        CREATE TABLE max_rate (search_hash TEXT PRIMARY KEY, config TEXT NOT NULL, seeds TEXT NOT NULL,
            slos TEXT NOT NULL, rel_tol REAL NOT NULL, max_rate_rps REAL, failed_rate_rps REAL,
            lambda_star_rps REAL, confidence TEXT NOT NULL, probes TEXT NOT NULL, version TEXT NOT NULL,
            finished_at TEXT NOT NULL);
        PRAGMA user_version = 1;
    """)
    first = tasks[0]
    summary = json.dumps(run_point(first)["summary"], sort_keys=True, default=float)
    old.execute("INSERT INTO runs VALUES (?, ?, '{}', ?, 'ok', NULL, '0.old', 0.1, '2024-01-01T00:00:00.000+00:00')",
                (*first.key, summary))
    old.commit()
    old.close()
    with Store(path, readonly=True) as ro:        # read as it is: nothing written
        assert ro.version == 1 and len(ro.runs()) == 1 and ro.leases() == []
    with Store(path) as store:
        assert store.version == SCHEMA_VERSION == 2
        stats = run_tasks(tasks[:3], store, Inline())
        assert (stats.skipped, stats.ok) == (1, 2)
        assert store.get(*first.key)["version"] == "0.old" and store.leases() == []
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        conn.execute("PRAGMA user_version = 3")   # a store from a later llmqueue
    with pytest.raises(Exception, match="schema version 3 is newer"):
        Store(path)


# ---- the driver --------------------------------------------------------------------------

def _foreign_lease(path: Path, key, owner: Owner, expires_in: float) -> None:
    with Store(path) as store:
        assert store.claim(key, owner, None, lease_s=expires_in) == CLAIMED


def test_points_held_by_a_live_process_are_waited_for_and_its_results_kept(tmp_path, tasks, reference):
    path = tmp_path / "s.db"
    other = _foreign()
    held = tasks[5]
    _foreign_lease(path, held.key, other, expires_in=60)
    waited, seen = [], []

    def the_other_process_finishes():  # as its driver would, some time later
        time.sleep(0.4)
        with Store(path) as store:
            assert store.finish(*held.key, held.data, {**run_point(held), "version": "other"}, other)

    thread = threading.Thread(target=the_other_process_finishes)
    thread.start()
    with Store(path) as store:
        stats = run_tasks(tasks, store, Inline(), poll_s=0.05, on_wait=waited.append,
                          on_result=lambda t, o: seen.append(t.key))
    thread.join()
    assert (stats.ok, stats.skipped, stats.elsewhere, stats.reclaimed) == (N - 1, 1, 1, 0)
    assert [[x.key for x in leases] for leases in waited] == [[held.key]] and waited[0][0].owner == other.id
    assert sorted(seen) == sorted(t.key for t in tasks)            # the progress bar reaches the end
    assert _rows(path, "summary") == reference
    assert _rows(path, "version")[held.key] == "other" and _leases(path) == []


def test_without_wait_the_points_running_elsewhere_are_named(tmp_path, tasks):
    path = tmp_path / "s.db"
    other = _foreign()
    _foreign_lease(path, tasks[0].key, other, expires_in=60)
    with Store(path) as store:
        stats = run_tasks(tasks, store, Inline(), wait=False)
    assert stats.running_elsewhere == [tasks[0].key] and stats.ok == N - 1
    assert [(h, s, o) for h, s, o, _ in _leases(path)] == [(*tasks[0].key, other.id)]   # left alone


def test_a_lease_that_lapses_while_waiting_is_taken_over(tmp_path, tasks, reference):
    path = tmp_path / "s.db"
    _foreign_lease(path, tasks[3].key, _foreign(), expires_in=0.5)   # its owner never renews it
    me = Owner.me()
    dead = Owner(me.host, me.machine, _dead_pid(), "killed")
    _foreign_lease(path, tasks[7].key, dead, expires_in=60)          # killed: stale at once
    with Store(path) as store:
        stats = run_tasks(tasks, store, Inline(), poll_s=0.05)
    assert (stats.ok, stats.reclaimed, stats.elsewhere) == (N, 2, 0)
    assert _rows(path, "summary") == reference and _leases(path) == []


def test_an_interrupt_releases_the_leases_it_holds(tmp_path, tasks):
    path = tmp_path / "s.db"
    done = []

    def stop_after_two(task, outcome):
        done.append(task)
        if len(done) == 2:
            with Store(path) as peek:
                assert len(peek.leases()) == 2       # two more taken by the busy "workers"
            raise KeyboardInterrupt

    with Store(path) as store:
        with pytest.raises(KeyboardInterrupt):
            run_tasks(tasks, store, Inline(ahead=3), on_result=stop_after_two)
        assert store.leases() == [] and len(store.runs()) == 2
        assert run_tasks(tasks, store, Inline()).ok == N - 2


# ---- several processes -----------------------------------------------------------------

def _start(path: Path, name: str, go: Path | None = None, delay: float = 0.0, jobs: int = 1) -> subprocess.Popen:
    env = {**ENV, "LEASE_WORKER": name, "LEASE_DELAY_S": str(delay), "LEASE_JOBS": str(jobs)}
    return subprocess.Popen([sys.executable, "-m", "lease_worker", str(path), *([str(go)] if go else [])], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _release(go: Path, names: list[str], procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 60
    while not all(Path(f"{go}.ready-{n}").exists() for n in names):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.01)
    go.touch()


def _stats(proc: subprocess.Popen, timeout: float = 60) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _by_worker(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for version in _rows(path, "version").values():
        name = version.rsplit("+", 1)[-1]
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_three_processes_share_a_sweep_each_point_run_once(tmp_path, reference):
    path, go = tmp_path / "s.db", tmp_path / "go"
    names = ["a", "b", "c"]
    procs = [_start(path, n, go, delay=0.15) for n in names]
    _release(go, names, procs)
    stats = {n: _stats(p) for n, p in zip(names, procs)}
    assert _rows(path, "summary") == reference and _leases(path) == []
    ran = {n: s["ok"] for n, s in stats.items()}
    assert sum(ran.values()) == N and _by_worker(path) == {n: k for n, k in ran.items() if k}  # each run once
    assert all(s["skipped"] == N - s["ok"] and s["failed"] == 0 for s in stats.values())
    assert sum(1 for k in ran.values() if k) >= 2, ran      # the work was shared


@pytest.mark.slow
def test_cli_sweeps_in_parallel_store_every_point_once(tmp_path, reference):
    path = tmp_path / "s.db"
    cmd = [sys.executable, "-m", "llmqueue", "sweep", *lease_worker.ARGS, "--jobs", "1", "--store", str(path)]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert _rows(path, "summary") == reference and _leases(path) == []
    ran = 0
    for out, _ in outs:
        part = out.split(" ran ok")[0].rsplit(" ", 1)[-1]   # "... N already stored, K ran ok, 0 failed ..."
        ran += int(part)
    assert ran == N, outs


def _kill_when_leasing(proc: subprocess.Popen, path: Path, stored: int) -> None:
    """SIGKILL the driver and its workers once ``stored`` runs are in and it holds a lease."""
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the worker stored too few runs in time"
        if path.exists():
            with contextlib.suppress(sqlite3.OperationalError):  # the tables are being created
                if (len(_rows(path, "version")) >= stored
                        and any(pid == proc.pid for *_, pid in _leases(path))):
                    break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_a_killed_worker_leaves_its_leases_to_the_next(tmp_path, reference):
    path = tmp_path / "s.db"
    killed = _start(path, "killed", delay=0.3, jobs=2)
    _kill_when_leasing(killed, path, stored=2)
    left = [lease for lease in _leases(path) if lease[3] == killed.pid]
    before = _by_worker(path).get("killed", 0)
    assert 1 <= len(left) <= 2 and before < N
    stats = _stats(_start(path, "next"))      # no pause: the next one just finishes the sweep
    assert stats["reclaimed"] == len(left) and stats["ok"] == N - before
    assert _rows(path, "summary") == reference and _leases(path) == []
    assert _by_worker(path) == {"killed": before, "next": N - before}


def test_a_worker_killed_mid_sweep_loses_nothing_to_its_partner(tmp_path, reference):
    path, go = tmp_path / "s.db", tmp_path / "go"
    killed, partner = _start(path, "killed", go, delay=0.2, jobs=2), _start(path, "partner", go, delay=0.2)
    _release(go, ["killed", "partner"], [killed, partner])
    _kill_when_leasing(killed, path, stored=3)
    stats = _stats(partner)
    assert stats["reclaimed"] >= 1                   # what the killed one was running
    assert _rows(path, "summary") == reference and _leases(path) == []
    by = _by_worker(path)
    assert by["partner"] == stats["ok"] and by.get("killed", 0) + stats["ok"] == N


def test_cli_report_counts_runs_of_another_process(capsys, tmp_path):
    """The CLI line says how many points another process stored meanwhile and prints who holds the
    points it waits for (only when some are held)."""
    from types import SimpleNamespace

    from llmqueue.cli import sweep as cli_sweep
    from llmqueue.sweep.driver import SweepStats

    cli_sweep._waiting([])
    cli_sweep._waiting([SimpleNamespace(pid=42, host="h")])
    err = capsys.readouterr().err
    assert err.strip() == "waiting for 1 point(s) that another process is running (pid 42 on h)"
    line = cli_sweep._report(SweepStats(points=3, skipped=2, ok=1, elsewhere=2, reclaimed=1), 3, 1, "x", 1.0,
                             tmp_path / "s.db")
    assert "2 already stored (2 by another process meanwhile), 1 ran ok, 0 failed (1 taken over" in line


def test_opening_a_store_another_process_holds_waits_then_names_it(tmp_path, monkeypatch):
    """Processes creating one new store at once: an open that finds it "locked" tries again (seen
    once in a full suite: the third of three sweep processes failed), and past OPEN_WAIT_S says so."""
    from llmqueue.errors import LlmqueueError
    from llmqueue.sweep import store as store_module

    real_open, calls = Store._open, []

    def flaky(self):
        calls.append(1)
        if len(calls) <= 2:
            raise sqlite3.OperationalError("database is locked")
        real_open(self)

    monkeypatch.setattr(Store, "_open", flaky)
    with Store(tmp_path / "s.db") as store:
        assert store.version == SCHEMA_VERSION and len(calls) == 3
    monkeypatch.setattr(Store, "_open", lambda self: (_ for _ in ()).throw(sqlite3.OperationalError("database is locked")))
    monkeypatch.setattr(store_module, "OPEN_WAIT_S", 0.1)
    with pytest.raises(LlmqueueError, match="not a usable SQLite database .database is locked"):
        Store(tmp_path / "t.db")
