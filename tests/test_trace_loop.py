"""Trace looping: load_trace(loop=k) replays a finite trace k times back to back (workload.loop)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmqueue.config import parse_config
from llmqueue.errors import ConfigError, TraceError
from llmqueue.model.workload import Workload, load_trace

VIDUR_HEADER = "arrived_at,num_prefill_tokens,num_decode_tokens\n"
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path: Path, text: str, name: str = "trace.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def vidur(tmp_path) -> Path:
    # unsorted on purpose (sorted before looping); arrivals 0.5, 1.0, 2.5, 4.0: span 3.5, mean gap 3.5/3
    return write(tmp_path, VIDUR_HEADER + "1.0,20,2\n0.5,10,1\n2.5,30,3\n4.0,40,0\n")


def test_loop_1_is_unchanged(vidur):
    base, once = load_trace(vidur), load_trace(vidur, loop=1)
    for field in ("arrival_time", "num_prompt_tokens", "num_output_tokens"):
        assert np.array_equal(getattr(base.requests, field), getattr(once.requests, field))
    assert once.loops == base.loops == 1
    assert once.summary() == base.summary()
    assert base.summary()["loops"] == 1 and base.summary()["num_requests"] == 4
    assert base.span_s == pytest.approx(3.5)


@pytest.mark.parametrize("time_scale", [1.0, 2.0])
def test_loop_3_replays_with_exact_shifts(vidur, time_scale):
    base = load_trace(vidur, time_scale=time_scale).requests
    t = load_trace(vidur, time_scale=time_scale, loop=3)
    r, n = t.requests, len(base)
    assert len(r) == 3 * n == 12
    span = float(base.arrival_time[-1] - base.arrival_time[0])
    period = span * n / (n - 1)   # span + mean gap
    assert span == pytest.approx(3.5 * time_scale)
    assert period == pytest.approx(span + span / (n - 1))
    for j in range(3):
        part = slice(j * n, (j + 1) * n)
        assert np.array_equal(r.arrival_time[part], base.arrival_time + j * period)
        assert np.array_equal(r.num_prompt_tokens[part], base.num_prompt_tokens)
        assert np.array_equal(r.num_output_tokens[part], base.num_output_tokens)
    assert np.all(np.diff(r.arrival_time) > 0)   # sorted, copies do not overlap
    seam = r.arrival_time[n] - r.arrival_time[n - 1]
    assert seam == pytest.approx(span / (n - 1))  # the seam gap is the mean gap
    assert r.num_prompt_tokens.dtype == np.int64 and r.num_output_tokens.dtype == np.int64
    assert not r.arrival_time.flags.writeable
    assert t.loops == 3 and t.span_s == pytest.approx(span)
    summary = t.summary()
    assert summary["loops"] == 3 and summary["num_requests"] == 12
    assert summary["rows_read"] == 4 and summary["rows_reordered"] == 1


def test_loop_after_capping(vidur):
    t = load_trace(vidur, max_tokens=25, cap_mode="drop", loop=2)   # keeps the 0.5 and 1.0 rows
    assert t.requests.arrival_time.tolist() == [0.5, 1.0, 1.5, 2.0]
    assert t.requests.num_prompt_tokens.tolist() == [10, 20, 10, 20]
    assert t.rows_dropped_long == 2 and t.span_s == pytest.approx(0.5)


def test_azure_loop(tmp_path):
    path = write(tmp_path, AZURE_HEADER + "2023-11-16 18:17:03.0,4808,10\n2023-11-16 18:17:05.0,3180,8\n")
    r = load_trace(path, loop=3).requests
    assert r.arrival_time.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]   # P = 2 + 2
    assert r.num_output_tokens.tolist() == [10, 8] * 3


@pytest.mark.parametrize("time_scale", [1.0, 0.5])
def test_one_row_trace_period_is_time_scale_seconds(tmp_path, time_scale):
    path = write(tmp_path, VIDUR_HEADER + "3.0,10,1\n")
    t = load_trace(path, time_scale=time_scale, loop=4)
    start = 3.0 * time_scale
    assert t.requests.arrival_time.tolist() == [start + j * time_scale for j in range(4)]
    assert t.span_s == 0.0 and t.summary()["num_requests"] == 4


def test_simultaneous_rows_do_not_overlap(tmp_path):
    path = write(tmp_path, VIDUR_HEADER + "1.0,10,1\n1.0,20,2\n")
    r = load_trace(path, loop=2).requests
    assert r.arrival_time.tolist() == [1.0, 1.0, 2.0, 2.0]


def test_workload_replays_the_loops(vidur):
    w = Workload(load_trace(vidur, loop=3))
    assert len(w.generate(0)) == 12
    assert len(w.generate(0, num_requests=6)) == 6
    period = 3.5 * 4 / 3
    horizon = w.generate(0, horizon_s=6.0).arrival_time   # the second copy starts at 0.5 + period
    assert horizon.tolist() == pytest.approx([0.5, 1.0, 2.5, 4.0, 0.5 + period, 1.0 + period])


@pytest.mark.parametrize("loop", [0, -1, 2.5, "x", True, float("inf"), 2**70])
def test_bad_loop_values(vidur, loop):
    with pytest.raises(ConfigError, match=r"^loop = .* is not allowed: an integer >= 1") as info:
        load_trace(vidur, loop=loop)
    assert info.value.field == "loop"


def test_integral_float_loop_is_accepted(vidur):
    assert load_trace(vidur, loop=2.0).loops == 2


def test_huge_loop_is_refused_before_replaying(vidur):
    with pytest.raises(ConfigError, match=r"loop = 30000000 is not allowed: at most 25000000 for this trace "
                                          r"\(4 requests a copy; a loop may replay at most 100,000,000") as info:
        load_trace(vidur, loop=30_000_000)
    assert info.value.field == "loop"
    assert load_trace(vidur, loop=2).loops == 2


def test_bad_trace_is_reported_before_looping(tmp_path):
    with pytest.raises(TraceError, match="no valid data rows"):
        load_trace(write(tmp_path, VIDUR_HEADER), loop=3)


# ---- config ---------------------------------------------------------------------------

def test_config_accepts_loop_for_a_trace(vidur):
    c = parse_config({"workload": {"arrival": "trace", "trace": str(vidur), "loop": 3, "time_scale": 2.0}})
    assert c.workload["loop"] == 3 and c.workload["time_scale"] == 2.0
    assert parse_config({"workload": {"trace": str(vidur), "loop": 2.0}}).workload["loop"] == 2   # arrival implied
    assert "loop" not in parse_config({"workload": {"trace": str(vidur)}}).workload


@pytest.mark.parametrize("loop", [0, -1, 2.5, "x", True])
def test_config_refuses_bad_loop(vidur, loop):
    with pytest.raises(ConfigError, match=r"^workload\.loop = .* is not allowed: an integer >= 1") as info:
        parse_config({"workload": {"arrival": "trace", "trace": str(vidur), "loop": loop}})
    assert info.value.field == "workload.loop"


@pytest.mark.parametrize("arrival", ["poisson", "deterministic"])
def test_config_refuses_loop_without_a_trace(arrival):
    with pytest.raises(ConfigError, match=r'^workload\.loop = 3 is not allowed: only allowed with arrival = "trace"'):
        parse_config({"workload": {"arrival": arrival, "rate": 1.0, "loop": 3}})
