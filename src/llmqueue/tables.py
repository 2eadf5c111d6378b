"""Runs as tables: the requests, batches and time series of a run, and a results store, as
columns, written as CSV or JSON (numpy only) or Parquet, or as pandas DataFrames (docs/sweeps.md,
"Data out").

A table here is a dict of equal-length columns (numpy arrays or lists), so that CSV and JSON
need nothing beyond numpy.  pandas (the ``pandas`` extra) and pyarrow (the ``parquet`` extra)
are imported only when a DataFrame or a Parquet file is asked for, and their absence is one
clear error naming the extra.  In CSV a NaN (a request not finished yet) is an empty cell and a
boolean is 0 or 1; in JSON a NaN is null.

    frames = run.result.to_pandas()          # frames.requests, frames.batches, frames.timeseries
    write_table(request_columns(run.result), "requests.csv")
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from llmqueue.errors import ConfigError, LlmqueueError
from llmqueue.files import atomic_path

FORMATS = ("csv", "json", "parquet")
#: requests.csv's columns (``llmqueue simulate --out``, ``compare --out`` with a scheduler column first)
REQUEST_COLUMNS = ("rid", "arrival_time", "num_prompt_tokens", "num_output_tokens", "first_token_time",
                   "finish_time", "rejected")


class Frames(NamedTuple):
    """A run as DataFrames: one row per request, per batch, and per point of the time series."""

    requests: Any
    batches: Any
    timeseries: Any


def _require(module: str, extra: str, what: str):
    """``module`` imported, or an error naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LlmqueueError(f"{what} needs {module.split('.')[0]}, which is not installed: pip install "
                            f"'llmqueue[{extra}]' (CSV and JSON need nothing more)") from None


def require_pandas(what: str):
    """The pandas module, or an error naming the extra that installs it."""
    return _require("pandas", "pandas", what)


def _require_pyarrow(what: str):
    _require("pyarrow.parquet", "parquet", what)
    return _require("pyarrow", "parquet", what)


# ---- a run's tables ------------------------------------------------------------------------

def request_columns(result) -> dict[str, np.ndarray]:
    """One row per request (its id is its position, arrival order): lengths, times (NaN: not yet),
    rejected; with KV memory its preemptions and recomputed tokens."""
    columns = {"rid": np.arange(len(result.arrival_time)), "arrival_time": result.arrival_time,
               "num_prompt_tokens": result.num_prompt_tokens, "num_output_tokens": result.num_output_tokens,
               "first_token_time": result.first_token_time, "finish_time": result.finish_time,
               "rejected": np.asarray(result.rejected, dtype=bool)}
    if result.kv is not None:
        columns.update({"preemptions": result.kv.preemptions, "recomputed_tokens": result.kv.recomputed})
    return columns


def batch_columns(result) -> dict[str, np.ndarray]:
    """One row per batch: its end time and tokens, and with ``run.record_batches`` every recorded
    column (start, end, duration, prefill and decode tokens, requests, demand, bound); with KV
    memory the blocks in use and the tokens computed again."""
    columns: dict[str, np.ndarray] = {"batch": np.arange(result.num_batches)}
    if result.batches is not None:
        columns.update(result.batches)
    else:
        columns.update({"end_time": result.batch_end_time, "num_tokens": result.batch_tokens})
    if result.kv is not None:
        columns.update({"kv_blocks_in_use": result.kv.batch_blocks, "recomputed_tokens": result.kv.batch_recomputed})
    return columns


def timeseries_columns(result, points: int = 600) -> dict[str, np.ndarray]:
    """Requests in system and backlog (tokens) on an even grid of ``points`` times over the run
    (:func:`llmqueue.metrics.timeseries`)."""
    from llmqueue.metrics import timeseries

    return timeseries(result, points)


def stacked(tables: Sequence[tuple[str, Mapping[str, Any]]], key: str = "scheduler") -> dict[str, list]:
    """Several runs' tables as one: a first column ``key`` naming each row's run, then the union of
    their columns in first-seen order (None where a run lacks a column)."""
    names = list(dict.fromkeys(c for _, t in tables for c in t))
    lengths = [len(next(iter(t.values()), ())) for _, t in tables]
    out: dict[str, list] = {key: [label for (label, _), n in zip(tables, lengths) for _ in range(n)]}
    for name in names:
        out[name] = [x for (_, t), n in zip(tables, lengths)
                     for x in (_as_list(t[name]) if name in t else [None] * n)]
    return out


def result_frames(result, points: int = 600) -> Frames:
    """:class:`Frames` of a run (``Result.to_pandas``)."""
    pd = require_pandas("Result.to_pandas()")
    return Frames(pd.DataFrame(request_columns(result)), pd.DataFrame(batch_columns(result)),
                  pd.DataFrame(timeseries_columns(result, points)))


# ---- writing -------------------------------------------------------------------------------

def table_format(path: str | Path, fmt: str | None = None) -> str:
    """``fmt``, or the one the file name ends with (.csv, .json, .parquet)."""
    fmt = fmt or Path(path).suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ConfigError("output file", str(path), f"a name ending in {', '.join('.' + f for f in FORMATS)}")
    return fmt


def write_table(columns: Mapping[str, Any], path: str | Path, fmt: str | None = None) -> Path:
    """Write a table whole (a temporary file renamed when complete): CSV, JSON (a list of one
    object per row) or Parquet (the ``parquet`` extra), by ``fmt`` or the file's suffix."""
    fmt = table_format(path, fmt)
    path = Path(path)
    if fmt == "parquet":
        pa = _require_pyarrow(f"writing {path.name}")
        table = pa.table({name: _as_list(values) for name, values in columns.items()})
        with atomic_path(path) as tmp:
            pa.parquet.write_table(table, tmp)
        return path
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        if fmt == "csv":
            w = csv.writer(f)
            w.writerow(list(columns))
            w.writerows(zip(*(map(_csv_cell, _as_list(v)) for v in columns.values())))
        else:
            names = list(columns)
            rows = zip(*(_as_list(v) for v in columns.values()))
            json.dump([{n: _json_cell(x) for n, x in zip(names, row)} for row in rows], f, allow_nan=False)
    return path


def _as_list(values) -> list:
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def _csv_cell(x):
    if isinstance(x, bool):
        return int(x)
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return x


def _json_cell(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


__all__ = ["FORMATS", "Frames", "REQUEST_COLUMNS", "batch_columns", "request_columns", "require_pandas",
           "result_frames", "stacked", "table_format", "timeseries_columns", "write_table"]
