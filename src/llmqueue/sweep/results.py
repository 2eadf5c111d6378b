"""Tidy tables from a store: one row per run, one column per config key or summary value.

Config keys keep their dotted names (``engine.scheduler``, ``workload.rate``); summary values
keep theirs, nested ones dotted (``ttft_s.p99``); lists are written as JSON text. ``--where``
filters rows with ``COLUMN OP VALUE`` (OP one of ``= != < <= > >=``), numbers compared as
numbers, anything else as text (only ``=`` and ``!=``: an order needs a number).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llmqueue.errors import ConfigError, LlmqueueError
from llmqueue.files import atomic_path

RUN_COLUMNS = ("config_hash", "seed", "status", "error", "version", "wall_s", "finished_at")
_WHERE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(!=|<=|>=|=|<|>)\s*(.*?)\s*$")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def tidy(runs: Iterable[dict]) -> list[dict[str, Any]]:
    """Store rows (``Store.runs()``) as flat dicts; ``run.seed`` is the ``seed`` column."""
    rows = []
    for run in runs:
        config = flatten(run["config"])
        config.pop("run.seed", None)
        row = {k: run[k] for k in RUN_COLUMNS}
        row.update(config)
        row.update(flatten(run["summary"] or {}))
        rows.append(row)
    return rows


def columns(rows: list[dict]) -> list[str]:
    """Every column in first-seen order (runs of different configs may differ)."""
    return list(dict.fromkeys(k for row in rows for k in row))


def varying(rows: list[dict], prefixes: tuple[str, ...] = ("engine.", "workload.", "run.")) -> list[str]:
    """Config columns whose value differs between rows: the grid's axes."""
    out = []
    for col in columns(rows):
        if col.startswith(prefixes) and len({json.dumps(r.get(col), default=str) for r in rows}) > 1:
            out.append(col)
    return out


#: Columns that name a workload: the arrival process and length laws (or trace), not its rate: runs of
#: one workload at several rates or loads belong in one table or figure, runs of two workloads never.
WORKLOAD_PREFIX = "workload."
NOT_WORKLOAD = ("workload.rate", "workload.load")


def workload_columns(rows: list[dict]) -> list[str]:
    """The workload columns (:data:`WORKLOAD_PREFIX`, less rate and load) whose value differs between rows."""
    return [c for c in varying(rows, (WORKLOAD_PREFIX,)) if c not in NOT_WORKLOAD]


def by_workload(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by workload, in first-seen order: the key is ((column, value), ...) over
    :func:`workload_columns` (empty when every row has the same workload)."""
    cols = workload_columns(rows)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple((c, row.get(c)) for c in cols), []).append(row)
    return groups


def workload_name(key: tuple) -> str:
    return ", ".join(f"{c}={_shown(v)}" for c, v in key) or "one workload"


def _shown(v: Any) -> str:
    return "-" if v is None else str(v)


def one_workload(rows: list[dict], store: str, what: str) -> None:
    """Refuse rows of more than one workload, naming the columns that differ and the ``--where``
    filter that picks each (a figure of two workloads would silently mix them)."""
    groups = by_workload(rows)
    if len(groups) <= 1:
        return
    cols = workload_columns(rows)
    picks = "; ".join(" ".join(f"--where {c}={_shown(v)}" for c, v in key) for key in list(groups)[:4])
    raise LlmqueueError(f"store {store}: the {what} would mix {len(groups)} workloads (they differ in "
                        f"{', '.join(cols)}); pick one with {picks}" + (" ..." if len(groups) > 4 else ""))


def _number(text: str) -> float | None:
    try:
        x = float(text)
    except ValueError:
        return None
    return None if x != x else x   # NaN orders nothing


def parse_where(item: str) -> tuple[str, str, str]:
    m = _WHERE.match(item)
    if not m:
        raise ConfigError("--where", item, "COLUMN OP VALUE with OP one of = != < <= > >=, e.g. engine.scheduler=orca")
    col, op, wanted = m.group(1), m.group(2), m.group(3).strip("\"'")
    if op not in ("=", "!=") and _number(wanted) is None:
        raise ConfigError("--where", item, f"a number after {op} (e.g. {col}{op}10); text compares only with = and !=")
    return col, op, wanted


def _compare(value: Any, op: str, wanted: str) -> bool:
    if value is None:
        return op == "=" and wanted in ("", "null", "None") or op == "!=" and wanted not in ("", "null", "None")
    a, b = (_number(str(value)) if not isinstance(value, bool) else None), _number(wanted)
    if a is not None and b is not None:
        left, right = a, b
    else:
        left, right = (str(value).lower() if isinstance(value, bool) else str(value)), wanted
        if op not in ("=", "!="):
            return False
    return {"=": left == right, "!=": left != right, "<": left < right, "<=": left <= right,
            ">": left > right, ">=": left >= right}[op]


def where(rows: list[dict], conditions: Iterable[str]) -> list[dict]:
    """Rows meeting every condition; an unknown column is an error listing the known ones."""
    known = set(columns(rows))
    for cond in conditions:
        col, op, wanted = parse_where(cond)
        if rows and col not in known:
            raise ConfigError("--where", cond, f"a column of this store: {', '.join(sorted(known))}")
        rows = [r for r in rows if _compare(r.get(col), op, wanted)]
    return rows


def write_csv(rows: list[dict], out: str) -> None:
    """All columns; ``-`` writes to standard output. A file is written under a temporary name and
    renamed when whole (removed if the write fails, e.g. on a full disk)."""
    if out == "-":
        _write_rows(rows, sys.stdout)
        return
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        _write_rows(rows, f)


def _write_rows(rows: list[dict], f) -> None:
    w = csv.DictWriter(f, fieldnames=columns(rows), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)


def write_json(rows: list[dict], out: str) -> None:
    """A list of one object per row (only the columns each row has); ``-`` writes to standard output."""
    if out == "-":
        json.dump(rows, sys.stdout, default=str)
        sys.stdout.write("\n")
        return
    with atomic_path(out) as tmp, open(tmp, "w") as f:
        json.dump(rows, f, default=str)


def to_pandas(rows: list[dict]):
    """The tidy rows as a pandas DataFrame (the ``pandas`` extra), every column in first-seen order
    (``Store.to_pandas`` reads a store's runs this way)."""
    from llmqueue.tables import require_pandas

    return require_pandas("a results table as a DataFrame").DataFrame(rows, columns=columns(rows))


def write_parquet(rows: list[dict], out: str) -> None:
    """Needs pyarrow (the ``parquet`` extra, not a dependency of llmqueue): a clear error when it is missing."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LlmqueueError("--parquet needs pyarrow, which is not installed: pip install 'llmqueue[parquet]' "
                            "(--csv and --json write the same table)") from None
    cols = columns(rows)
    try:
        table = pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:  # e.g. a grid that gave one key text and numbers
        raise LlmqueueError(f"--parquet: a column mixes types ({exc}); --csv writes it as text") from None
    pq.write_table(table, Path(out))
