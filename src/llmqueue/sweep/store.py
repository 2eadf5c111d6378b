"""The results store: one SQLite file, one row per (config hash, seed) (docs/sweeps.md).

Each finished run is written in its own transaction as soon as it finishes, in WAL mode
with ``synchronous = FULL``: a sweep killed at any moment (Ctrl-C, ``kill -9``, a power cut)
keeps every committed run and never leaves a half-written row; the next sweep skips what is
stored. Only the driver process writes; workers return their outcomes to it.

Tables: ``runs`` (config JSON, seed, summary JSON, status ok/failed, error, package version,
wall seconds, finish time) and ``max_rate`` (one row per capacity search of ``max-rate``).
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from llmqueue import __version__
from llmqueue.errors import LlmqueueError

SCHEMA_VERSION = 1
DEFAULT_STORE = "llmqueue_output/sweep.db"

_SCHEMA = """
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
);
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
);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=float)


class Store:
    """A sweep store. ``Store(path)`` creates it (and its folder); ``readonly`` needs it to exist."""

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        try:
            if readonly:
                if not self.path.is_file():
                    raise LlmqueueError(f"store {self.path}: no such file (create one with `llmqueue sweep`)")
                self.conn = sqlite3.connect(f"file:{self.path.resolve()}?mode=ro", uri=True, timeout=30)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.conn = sqlite3.connect(self.path, timeout=30)
                self.conn.execute("PRAGMA journal_mode = WAL")
                self.conn.execute("PRAGMA synchronous = FULL")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LlmqueueError(f"store {self.path}: schema version {version} is newer than this llmqueue "
                                    f"({__version__}) reads ({SCHEMA_VERSION})")
            if not readonly:
                with self.conn:
                    self.conn.executescript(_SCHEMA)
                    self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version == 0:
                raise LlmqueueError(f"store {self.path}: not an llmqueue store (no runs table)")
        except sqlite3.DatabaseError as exc:
            raise LlmqueueError(f"store {self.path}: not a usable SQLite database ({exc})") from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- runs --------------------------------------------------------------------------

    def statuses(self) -> dict[tuple[str, int], str]:
        """(config hash, seed) -> 'ok' / 'failed' for every stored run."""
        rows = self.conn.execute("SELECT config_hash, seed, status FROM runs")
        return {(h, s): status for h, s, status in rows}

    def record(self, config_hash: str, seed: int, config: dict, outcome: dict) -> None:
        """Store one finished run in its own transaction (a retried point replaces its row)."""
        summary = outcome.get("summary")
        with self.conn:
            self.conn.execute(
                "INSERT INTO runs (config_hash, seed, config, summary, status, error, version, wall_s, finished_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (config_hash, seed) DO UPDATE SET config = excluded.config, summary = excluded.summary, "
                "status = excluded.status, error = excluded.error, version = excluded.version, "
                "wall_s = excluded.wall_s, finished_at = excluded.finished_at",
                (config_hash, seed, _dumps(config), None if summary is None else _dumps(summary), outcome["status"],
                 outcome.get("error"), outcome.get("version", __version__), outcome.get("wall_s"), _now()))

    def get(self, config_hash: str, seed: int) -> dict | None:
        row = self.conn.execute("SELECT * FROM runs WHERE config_hash = ? AND seed = ?", (config_hash, seed))
        found = [self._run(r, row.description) for r in row]
        return found[0] if found else None

    def runs(self) -> list[dict]:
        """Every stored run, config and summary decoded, in the order they finished."""
        cur = self.conn.execute("SELECT * FROM runs ORDER BY finished_at, config_hash, seed")
        return [self._run(r, cur.description) for r in cur]

    @staticmethod
    def _run(row: tuple, description) -> dict:
        d = dict(zip((c[0] for c in description), row))
        d["config"] = json.loads(d["config"])
        d["summary"] = None if d["summary"] is None else json.loads(d["summary"])
        return d

    # ---- capacity searches -------------------------------------------------------------

    def record_max_rate(self, search_hash: str, row: dict) -> None:
        with self.conn:
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
