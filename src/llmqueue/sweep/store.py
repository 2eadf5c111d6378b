"""The results store: one SQLite file, one row per (config hash, seed) (docs/sweeps.md).

Each finished run is written in its own transaction as soon as it finishes, in WAL mode
with ``synchronous = FULL``: a sweep killed at any moment (Ctrl-C, ``kill -9``, a power cut)
keeps every committed run and never leaves a half-written row; the next sweep skips what is
stored. Only driver processes write; workers return their outcomes to theirs.

Several drivers (two ``llmqueue sweep`` on one store) share the work through **leases**: a
driver claims a point in one ``BEGIN IMMEDIATE`` transaction before it runs it (the row
names its owner: host, process id, a random token, and an expiry it renews while it runs),
other drivers skip a point leased by a live owner, and a lease whose owner died (past its
expiry, or its process gone on this machine) is taken over. A finished run is stored only
if nobody stored the point first, so a point is never stored twice (docs/sweeps.md).

Tables: ``runs`` (config JSON, seed, summary JSON, status ok/failed, error, package version,
wall seconds, finish time), ``max_rate`` (one row per capacity search of ``max-rate``) and
``leases`` (the points being run now, schema version 2). Older stores are migrated in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from llmqueue import __version__
from llmqueue.errors import LlmqueueError

SCHEMA_VERSION = 2
DEFAULT_STORE = "llmqueue_output/sweep.db"            # `llmqueue sweep`
DEFAULT_MAX_RATE_STORE = "llmqueue_output/max_rate.db"  # `llmqueue max-rate`: its own, so results never mix the two
OPEN_WAIT_S = 30.0      # how long opening a store retries while another process holds it ("locked")
LEASE_S = 60.0          # a lease not renewed for this long is stale (its owner is taken for dead)

# Migrations: the statements that take a store from version i - 1 to i (each idempotent).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("""
CREATE TABLE IF NOT EXISTS runs (
    config_hash TEXT NOT NULL,
    seed        INTEGER NOT NULL,
    config      TEXT NOT NULL,
    summary     TEXT,
    status      TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error       TEXT,
    version     TEXT NOT NULL,
    wall_s      REAL,
    finished_at TEXT NOT NULL,
    PRIMARY KEY (config_hash, seed)
)""", """
CREATE TABLE IF NOT EXISTS max_rate (
    search_hash     TEXT PRIMARY KEY,
    config          TEXT NOT NULL,
    seeds           TEXT NOT NULL,
    slos            TEXT NOT NULL,
    rel_tol         REAL NOT NULL,
    max_rate_rps    REAL,
    failed_rate_rps REAL,
    lambda_star_rps REAL,
    confidence      TEXT NOT NULL,
    probes          TEXT NOT NULL,
    version         TEXT NOT NULL,
    finished_at     TEXT NOT NULL
)"""),
    2: ("""
CREATE TABLE IF NOT EXISTS leases (
    config_hash TEXT NOT NULL,
    seed        INTEGER NOT NULL,
    owner       TEXT NOT NULL,
    host        TEXT NOT NULL,
    machine     TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    claimed_at  TEXT NOT NULL,
    expires_at  REAL NOT NULL,
    PRIMARY KEY (config_hash, seed)
)""", "CREATE INDEX IF NOT EXISTS leases_owner ON leases (owner)"),
}
assert max(_MIGRATIONS) == SCHEMA_VERSION

CLAIMED, RECLAIMED, STORED, BUSY = "claimed", "reclaimed", "stored", "busy"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=float)


def _machine() -> str:
    """What makes a process id meaningful: this boot of this kernel, this pid namespace."""
    parts = []  # empty where there is no /proc (macOS): the host name alone, then
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "/".join(parts)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie, killed but not yet reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    with contextlib.suppress(OSError, ValueError, IndexError):  # no /proc: kill(0) alone
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] in "ZX":
            return False
    return True


@dataclass(frozen=True)
class Owner:
    """Who holds a lease: ``host:pid:token`` (the token tells apart two holders that reuse a pid)."""

    host: str
    machine: str
    pid: int
    token: str

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), _machine(), os.getpid(), secrets.token_hex(8))

    @property
    def id(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}"


@dataclass(frozen=True)
class Lease:
    """A point another process is running: its key, owner and expiry (UNIX time)."""

    config_hash: str
    seed: int
    owner: str
    host: str
    pid: int
    expires_at: float

    @property
    def key(self) -> tuple[str, int]:
        return self.config_hash, self.seed


def _live(row: tuple, me: Owner, now: float) -> bool:
    """Whether a lease row (owner, host, machine, pid, expires_at) still stands."""
    _, host, machine, pid, expires_at = row
    if expires_at <= now:
        return False
    if host == me.host and machine == me.machine:  # a process id we can check: gone means dead
        return pid_alive(pid)
    return True


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction, its lock taken at the start (no other writer between read and write)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.commit()
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level None: no implicit transactions; every write below says where it begins.
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


class Store:
    """A sweep store. ``Store(path)`` creates it (and its folder); ``readonly`` needs it to exist."""

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path, self.readonly = Path(path), readonly
        deadline = time.monotonic() + OPEN_WAIT_S
        while True:
            try:
                self._open()
                return
            except sqlite3.OperationalError as exc:
                # Processes opening one new store at once: the WAL switch and the migration can
                # answer "locked" without waiting on the busy timeout; try again a while.
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                    raise LlmqueueError(f"store {self.path}: not a usable SQLite database ({exc})") from None
                with contextlib.suppress(Exception):
                    self.conn.close()
                time.sleep(0.05)

    def _open(self) -> None:
        try:
            if readonly := self.readonly:
                if not self.path.is_file():
                    raise LlmqueueError(f"store {self.path}: no such file (create one with `llmqueue sweep`)")
                self.conn = sqlite3.connect(f"file:{self.path.resolve()}?mode=ro", uri=True, timeout=30)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.conn = _connect(self.path)
            self.version = self._check_version()
            if not readonly and self.version < SCHEMA_VERSION:
                self._migrate()
            elif readonly and self.version == 0:
                raise LlmqueueError(f"store {self.path}: not an llmqueue store (no runs table)")
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:
            raise LlmqueueError(f"store {self.path}: not a usable SQLite database ({exc})") from None

    def _check_version(self) -> int:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LlmqueueError(f"store {self.path}: schema version {version} is newer than this llmqueue "
                                f"({__version__}) reads ({SCHEMA_VERSION})")
        return version

    def _migrate(self) -> None:
        """Bring the store to :data:`SCHEMA_VERSION` in one transaction (two processes opening an
        old store at once: the second finds it done)."""
        with _immediate(self.conn):
            version = self._check_version()
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target]:
                    self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.version = SCHEMA_VERSION

    def close(self) -> None:
        self.conn.close()
        if self.readonly and os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK):
            # A read-only connection cannot remove the WAL files it needed (-wal, -shm); a writer's
            # close does when it is the last one, so a reader leaves the folder as it found it.
            with contextlib.suppress(sqlite3.Error):
                with contextlib.closing(sqlite3.connect(self.path, timeout=1)) as conn:
                    conn.execute("PRAGMA user_version").fetchone()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- runs --------------------------------------------------------------------------

    def statuses(self) -> dict[tuple[str, int], str]:
        """(config hash, seed) -> 'ok' / 'failed' for every stored run."""
        rows = self.conn.execute("SELECT config_hash, seed, status FROM runs")
        return {(h, s): status for h, s, status in rows}

    def states(self) -> dict[tuple[str, int], tuple[str, str]]:
        """(config hash, seed) -> (status, finished_at) for every stored run: what :meth:`claim`
        compares against to see that another process stored (or replaced) a run meanwhile."""
        rows = self.conn.execute("SELECT config_hash, seed, status, finished_at FROM runs")
        return {(h, s): (status, t) for h, s, status, t in rows}

    def _write(self, config_hash: str, seed: int, config: dict, outcome: dict) -> None:
        summary = outcome.get("summary")
        self.conn.execute(
            "INSERT INTO runs (config_hash, seed, config, summary, status, error, version, wall_s, finished_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (config_hash, seed) DO UPDATE SET config = excluded.config, summary = excluded.summary, "
            "status = excluded.status, error = excluded.error, version = excluded.version, "
            "wall_s = excluded.wall_s, finished_at = excluded.finished_at",
            (config_hash, seed, _dumps(config), None if summary is None else _dumps(summary), outcome["status"],
             outcome.get("error"), outcome.get("version", __version__), outcome.get("wall_s"), _now()))

    def record(self, config_hash: str, seed: int, config: dict, outcome: dict) -> None:
        """Store one finished run in its own transaction (a retried point replaces its row),
        whoever holds its lease; sweeps use :meth:`finish`."""
        with _immediate(self.conn):
            self._write(config_hash, seed, config, outcome)

    # ---- leases ------------------------------------------------------------------------

    def claim(self, key: tuple[str, int], owner: Owner, expected: tuple[str, str] | None,
              lease_s: float = LEASE_S) -> str:
        """Try to take the lease of point ``key`` for ``owner``, atomically. ``expected`` is the
        stored (status, finished_at) the caller decided to run it from (None: not stored).

        Returns :data:`STORED` (another process stored or replaced the run since: nothing to do),
        :data:`BUSY` (a live owner holds it), :data:`CLAIMED`, or :data:`RECLAIMED` (taken over
        from an owner that died)."""
        now = time.time()
        with _immediate(self.conn):
            row = self.conn.execute("SELECT status, finished_at FROM runs WHERE config_hash = ? AND seed = ?",
                                    key).fetchone()
            if (None if row is None else tuple(row)) != (None if expected is None else tuple(expected)):
                return STORED
            lease = self.conn.execute("SELECT owner, host, machine, pid, expires_at FROM leases "
                                      "WHERE config_hash = ? AND seed = ?", key).fetchone()
            if lease is not None and lease[0] != owner.id and _live(lease, owner, now):
                return BUSY
            self.conn.execute(
                "INSERT OR REPLACE INTO leases (config_hash, seed, owner, host, machine, pid, claimed_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*key, owner.id, owner.host, owner.machine, owner.pid, _now(), now + lease_s))
        return RECLAIMED if lease is not None and lease[0] != owner.id else CLAIMED

    def finish(self, config_hash: str, seed: int, config: dict, outcome: dict, owner: Owner) -> bool:
        """Store a run this owner finished and drop its lease, in one transaction. The run is
        written when the point is not stored, or replaces a failed run when the lease is still
        this owner's (a retry); a point another process stored first keeps that row (the same
        result: runs are deterministic). Returns whether it was written."""
        key = (config_hash, seed)
        with _immediate(self.conn):
            row = self.conn.execute("SELECT status FROM runs WHERE config_hash = ? AND seed = ?", key).fetchone()
            lease = self.conn.execute("SELECT owner FROM leases WHERE config_hash = ? AND seed = ?", key).fetchone()
            mine = lease is not None and lease[0] == owner.id
            write = row is None or (row[0] == "failed" and mine)
            if write:
                self._write(config_hash, seed, config, outcome)
            if mine:
                self.conn.execute("DELETE FROM leases WHERE config_hash = ? AND seed = ?", key)
        return write

    def release(self, owner: Owner) -> None:
        """Give up every lease ``owner`` holds: others may run those points now."""
        with _immediate(self.conn):
            self.conn.execute("DELETE FROM leases WHERE owner = ?", (owner.id,))

    def leases(self) -> list[Lease]:
        """Every lease row (live or stale), oldest claim first; an empty list for a store from before leases."""
        if self.version < 2:
            return []
        rows = self.conn.execute("SELECT config_hash, seed, owner, host, pid, expires_at FROM leases "
                                 "ORDER BY claimed_at, config_hash, seed")
        return [Lease(*r) for r in rows]

    def lease_of(self, key: tuple[str, int]) -> Lease | None:
        row = self.conn.execute("SELECT config_hash, seed, owner, host, pid, expires_at FROM leases "
                                "WHERE config_hash = ? AND seed = ?", key).fetchone()
        return None if row is None else Lease(*row)

    @contextlib.contextmanager
    def holding(self, owner: Owner, lease_s: float = LEASE_S) -> Iterator[None]:
        """While the block runs, a thread renews ``owner``'s leases every ``lease_s / 4`` seconds
        (its own connection); at the end, however it ends, the leases left are released."""
        stop = threading.Event()

        def beat() -> None:
            conn = None
            try:
                while not stop.wait(lease_s / 4):
                    try:
                        if conn is None:  # a connection of its own: sqlite3's are not shared by threads
                            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                        with _immediate(conn):  # only this owner's rows: a lease taken over stays taken
                            conn.execute("UPDATE leases SET expires_at = ? WHERE owner = ?",
                                         (time.time() + lease_s, owner.id))
                    except sqlite3.Error:  # a busy or full disk: the next beat tries again
                        pass
            finally:
                if conn is not None:
                    conn.close()

        thread = threading.Thread(target=beat, name="llmqueue-lease-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            with contextlib.suppress(sqlite3.Error):  # a dead owner's leases go stale anyway
                self.release(owner)

    def get(self, config_hash: str, seed: int) -> dict | None:
        row = self.conn.execute("SELECT * FROM runs WHERE config_hash = ? AND seed = ?", (config_hash, seed))
        found = [self._run(r, row.description) for r in row]
        return found[0] if found else None

    def runs(self) -> list[dict]:
        """Every stored run, config and summary decoded, in the order they finished."""
        cur = self.conn.execute("SELECT * FROM runs ORDER BY finished_at, config_hash, seed")
        return [self._run(r, cur.description) for r in cur]

    def to_pandas(self, where: tuple[str, ...] | list[str] = ()):
        """The runs as a pandas DataFrame (the ``pandas`` extra): the tidy table of ``llmqueue results``,
        one row per run, config keys and summary values as dotted columns, ``where`` its ``--where``
        filters (e.g. ``("engine.scheduler=orca",)``)."""
        from llmqueue.sweep.results import tidy, to_pandas
        from llmqueue.sweep.results import where as keep

        return to_pandas(keep(tidy(self.runs()), where))

    @staticmethod
    def _run(row: tuple, description) -> dict:
        d = dict(zip((c[0] for c in description), row))
        d["config"] = json.loads(d["config"])
        d["summary"] = None if d["summary"] is None else json.loads(d["summary"])
        return d

    # ---- capacity searches -------------------------------------------------------------

    def record_max_rate(self, search_hash: str, row: dict) -> None:
        with _immediate(self.conn):
            self.conn.execute(
                "INSERT OR REPLACE INTO max_rate (search_hash, config, seeds, slos, rel_tol, max_rate_rps, "
                "failed_rate_rps, lambda_star_rps, confidence, probes, version, finished_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (search_hash, _dumps(row["config"]), _dumps(row["seeds"]), _dumps(row["slos"]), row["rel_tol"],
                 row["max_rate_rps"], row["failed_rate_rps"], row["lambda_star_rps"], row["confidence"],
                 _dumps(row["probes"]), __version__, _now()))

    def max_rates(self) -> list[dict]:
        cur = self.conn.execute("SELECT * FROM max_rate ORDER BY finished_at")
        out = []
        for r in cur:
            d = dict(zip((c[0] for c in cur.description), r))
            for key in ("config", "seeds", "slos", "probes"):
                d[key] = json.loads(d[key])
            out.append(d)
        return out
