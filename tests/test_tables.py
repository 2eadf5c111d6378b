"""Data out (docs/sweeps.md, "Data out"): a run's requests, batches and time series and a store's runs
as CSV, JSON, Parquet and pandas DataFrames; ``compare --out``'s requests.csv and batches.csv;
pandas and pyarrow stay optional (one clear error naming the extra)."""

from __future__ import annotations

import csv
import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from llmqueue.cli import main
from llmqueue.cli.common import config_from
from llmqueue.errors import LlmqueueError
from llmqueue.runner import run_config
from llmqueue.sweep.store import Store
from llmqueue.tables import REQUEST_COLUMNS, batch_columns, request_columns, stacked, timeseries_columns, write_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def result():
    return run_config(config_from("fig1", ["run.requests=400", "run.record_batches=true"])).result


@pytest.fixture(scope="module")
def kv_result():
    return run_config(config_from("fig1", ["run.requests=300", "engine.kv_blocks=200"])).result


def test_request_and_batch_columns(result, kv_result):
    req = request_columns(result)
    assert tuple(req) == REQUEST_COLUMNS and all(len(v) == 400 for v in req.values())
    assert np.array_equal(req["finish_time"], result.finish_time, equal_nan=True)
    batches = batch_columns(result)
    assert list(batches) == ["batch", "start_time", "end_time", "num_prefill_tokens", "num_decode_tokens",
                             "num_requests", "demand", "bound", "duration"]
    assert len(batches["batch"]) == result.num_batches
    plain = batch_columns(run_config(config_from("fig1", ["run.requests=100"])).result)
    assert list(plain) == ["batch", "end_time", "num_tokens"]
    assert {"preemptions", "recomputed_tokens"} <= set(request_columns(kv_result))
    assert {"kv_blocks_in_use", "recomputed_tokens"} <= set(batch_columns(kv_result))


def test_result_to_pandas(result):
    frames = result.to_pandas(points=50)
    assert list(frames.requests.columns) == list(REQUEST_COLUMNS) and len(frames.requests) == 400
    assert frames.requests["rejected"].dtype == bool
    assert np.array_equal(frames.requests["first_token_time"].to_numpy(), result.first_token_time, equal_nan=True)
    assert len(frames.batches) == result.num_batches and frames.batches["bound"].dtype == np.int64
    assert list(frames.timeseries.columns) == ["time_s", "in_system", "backlog_tokens"] and len(frames.timeseries) == 50


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_write_table_round_trips(result, tmp_path, fmt):
    import pandas as pd

    columns = request_columns(result)
    columns["finish_time"] = columns["finish_time"].copy()
    columns["finish_time"][3] = np.nan          # a request not finished: blank in CSV, null in JSON
    path = write_table(columns, tmp_path / f"r.{fmt}")
    back = {"csv": pd.read_csv, "json": pd.read_json, "parquet": pd.read_parquet}[fmt](path)
    assert list(back.columns) == list(REQUEST_COLUMNS) and len(back) == 400
    assert np.isnan(back["finish_time"][3]) and back["num_prompt_tokens"].tolist() == columns["num_prompt_tokens"].tolist()
    if fmt == "csv":
        row = next(csv.DictReader(path.open()))
        assert row["rejected"] in ("0", "1")
        assert list(csv.reader(path.open()))[4][REQUEST_COLUMNS.index("finish_time")] == ""
    if fmt == "json":
        assert json.loads(path.read_text())[3]["finish_time"] is None


def test_csv_and_json_need_no_pandas_and_the_rest_names_its_extra(result, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)   # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    write_table(request_columns(result), tmp_path / "r.csv")
    write_table(timeseries_columns(result, 10), tmp_path / "t.json")
    assert len(json.loads((tmp_path / "t.json").read_text())) == 10
    with pytest.raises(LlmqueueError, match=r"needs pandas.*pip install 'llmqueue\[pandas\]'"):
        result.to_pandas()
    with pytest.raises(LlmqueueError, match=r"needs pyarrow.*pip install 'llmqueue\[parquet\]'"):
        write_table(request_columns(result), tmp_path / "r.parquet")
    assert not (tmp_path / "r.parquet").exists()


def test_a_table_file_name_must_say_its_format(result, tmp_path):
    with pytest.raises(LlmqueueError, match=r"\.csv, \.json, \.parquet"):
        write_table(request_columns(result), tmp_path / "r.xlsx")


def test_stacked_puts_a_run_column_first():
    table = stacked([("a", {"x": [1, 2]}), ("b", {"x": [3], "y": [4]})])
    assert table == {"scheduler": ["a", "a", "b"], "x": [1, 2, 3], "y": [None, None, 4]}


def test_compare_out_writes_requests_csv_and_batches_csv_when_asked(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--requests", "200", "--schedulers", "sarathi,vllm", "--no-plot", "--out", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert list(rows[0]) == ["scheduler", *REQUEST_COLUMNS]
    assert len(rows) == 400 and [r["scheduler"] for r in rows[::200]] == ["sarathi", "vllm"]
    assert not (out / "batches.csv").exists() and "requests.csv" in capsys.readouterr().out
    assert main([*argv, "--batches"]) == 0
    batches = list(csv.DictReader((out / "batches.csv").open()))
    assert list(batches[0]) == ["scheduler", "batch", "start_time", "end_time", "num_prefill_tokens",
                                "num_decode_tokens", "num_requests", "demand", "bound", "duration"]
    assert {b["scheduler"] for b in batches} == {"sarathi", "vllm"}
    assert "batches.csv" in capsys.readouterr().out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s.db"
    assert main(["sweep", "fig1", "--grid", "engine.scheduler=sarathi,orca", "--set", "run.requests=200",
                 "--seeds", "2", "--jobs", "1", "--store", str(path)]) == 0
    return path


def test_store_to_pandas_and_results_json(store, tmp_path, capsys):
    with Store(store, readonly=True) as s:
        frame = s.to_pandas()
        orca = s.to_pandas(["engine.scheduler=orca"])
    assert len(frame) == 4 and {"config_hash", "seed", "engine.scheduler", "verdict", "ttft_s.p99"} <= set(frame.columns)
    assert set(orca["engine.scheduler"]) == {"orca"} and len(orca) == 2
    capsys.readouterr()
    assert main(["results", str(store), "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert len(rows) == 4 and rows[0]["status"] == "ok"
    assert main(["results", str(store), "--json", "-", "--where", "seed=1"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_the_extras_install_pandas_and_pyarrow():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("pandas") for d in extras["pandas"])
    assert any(d.startswith("pyarrow") for d in extras["parquet"])
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.startswith(("pandas", "pyarrow")) for d in deps)   # optional, never required
