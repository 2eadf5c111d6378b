"""The compiled core against the reference interpreter: identical results (docs/architecture.md).

Every policy is a plan that both interpreters execute: the reference (schedulers/plan.py on
Request objects, one Engine.step per batch in loop.py) and the compiled core (fastcore.py,
_fastcore.c).  Every registered scheduler (with and without its options), plus plans composed
here, with and without a request cap, several batch-time models and horizons, runs the same
random requests both ways; the batch sequence, every request's times, the violation count and
the engine's final state must be equal exactly (floats compared bit for bit).  Streamed runs
(the core resumed chunk by chunk) must equal one run.  The built-in scenarios must give the
same summaries.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmqueue.core import fastcore
from llmqueue.model.batch_time import Constant
from llmqueue.config import parse_config
from llmqueue.core.engine import Engine
from llmqueue.errors import ConfigError
from llmqueue.runner import build_engine, build_workload, generate, run_config
from llmqueue.scenarios import SCENARIOS, scenario_data
from llmqueue.schedulers import SCHEDULERS, Scheduler, make_scheduler
from llmqueue.schedulers.plan import Decodes, Plan, Prefills, Running, Waiting
from llmqueue.schedulers.sarathi import Sarathi
from llmqueue.core.simulator import simulate
from llmqueue.core.stepper import Stepper
from llmqueue.core.stream import request_chunks, simulate_stream
from llmqueue.model.workload import Requests, Workload, make_arrivals, make_length

class PrefillFirstWhole(Scheduler):
    """Composed here: prefill first, mixed, prompts never split (a prompt over the budget is rejected)."""

    name = "test-prefill-first-whole"
    summary = "composed in a test"
    work_conserving = False

    def compose(self) -> Plan:
        return Plan((Prefills(split=False), Decodes()))


class DecodeFirstSmallChunks(Scheduler):
    """Composed here: decodes first, then prefill chunks of at most 3 tokens each."""

    name = "test-decode-first-chunks"
    summary = "composed in a test"
    work_conserving = False

    def compose(self) -> Plan:
        return Plan((Decodes(), Prefills(max_chunk=3)))


class RunningFirstCapped(Scheduler):
    name = "test-running-capped"
    summary = "composed in a test"
    work_conserving = False

    def compose(self) -> Plan:
        return Plan((Running(max_chunk=4), Waiting(max_running=2)))


COMPOSED = {cls.name: cls for cls in (PrefillFirstWhole, DecodeFirstSmallChunks, RunningFirstCapped)}


def engine_for(name: str, budget: int, cap=None, batch_time=None, **options) -> Engine:
    if name in COMPOSED:
        return Engine(COMPOSED[name](**options), budget, make_engine("sarathi", 1, batch_time=batch_time).batch_time,
                      cap)
    return make_engine(name, budget, cap=cap, batch_time=batch_time, **options)


CONFIGS = (
    [(name, {}) for name in [*SCHEDULERS, *COMPOSED]]
    + [(name, {"split_prompts": True}) for name, cls in SCHEDULERS.items() if "split_prompts" in cls.options]
    + [("vllm-v1", {"max_num_seqs": 3, "long_prefill_token_threshold": 5}),
       ("vllm-v1", {"long_prefill_token_threshold": 2}),
       ("vllm-v1", {"long_prefill_token_threshold": 2, "long_prefill_threshold_when_alone": True})]
)
BATCH_TIMES = [
    {"model": "constant", "duration_ms": 1000},
    {"model": "staircase", "c_ms": 1.3, "a_ms": 0.7, "b0": 4},
    {"model": "piecewise_linear", "c_ms": 0.1, "a_ms_per_token": 0.37, "b0": 3},
]
ROOT = Path(__file__).resolve().parents[1]
ARRAYS = ("first_token_time", "finish_time", "batch_end_time", "batch_tokens", "rejected")


def assert_same(ref, fast) -> None:
    for name in ARRAYS:
        a, b = getattr(ref, name), getattr(fast, name)
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), name
    assert ref.violations == fast.violations and ref.end_time == fast.end_time
    if ref.batches is not None:
        assert ref.batches.keys() == fast.batches.keys()
        for key, column in ref.batches.items():
            assert np.array_equal(column, fast.batches[key]), key


def engine_state(engine: Engine) -> tuple:
    s = engine.state
    return ([(r.rid, r.prefill_left, r.decode_left) for r in s.prefilling],
            [(r.rid, r.prefill_left, r.decode_left) for r in s.decoding],
            s.total_prefill_left, engine.num_in_engine, engine.violations, [r.rid for r in engine.rejected])


@st.composite
def cases(draw):
    name, options = draw(st.sampled_from(CONFIGS))
    budget = draw(st.integers(1, 48))
    cap = draw(st.none() | st.integers(1, 6))
    n = draw(st.integers(1, 40))
    gaps = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0, 0.1, 7.3]), min_size=n, max_size=n))
    prompts = draw(st.lists(st.integers(1, 80), min_size=n, max_size=n))
    outputs = draw(st.lists(st.integers(0, 60) | st.integers(100, 400), min_size=n, max_size=n))
    times = np.cumsum(gaps)
    requests = Requests(times, np.array(prompts, np.int64), np.array(outputs, np.int64))
    batch_time = draw(st.sampled_from(BATCH_TIMES))
    run = draw(st.sampled_from([{"drain": True}, {}, {"horizon_s": float(times[-1]) / 2 + 0.3},
                                {"horizon_s": 37.0}]))
    ring = draw(st.sampled_from([fastcore.RING, 16]))  # 16: outputs over 14 tokens use the calendar's heap
    return name, options, budget, cap, requests, batch_time, run, ring


COMPILED = fastcore.unavailable() is None
needs_core = pytest.mark.skipif(not COMPILED, reason=f"{fastcore.unavailable()}")


def test_the_compiled_core_is_built_where_required():
    # CI builds the core (setup.py; .ci/run sets LLMQUEUE_REQUIRE_FASTCORE=1): a missing or stale
    # build must fail there, not silently fall back to the slower reference loop.
    if os.environ.get("LLMQUEUE_REQUIRE_FASTCORE") == "1":
        assert fastcore.unavailable() is None


def check_case(case, record_batches: bool) -> None:
    name, options, budget, cap, requests, batch_time, run, ring = case
    engines = [engine_for(name, budget, cap=cap, batch_time=batch_time, **options) for _ in range(2)]
    ref = simulate(engines[0], requests, method="reference", record_batches=record_batches, **run)
    assert ref.meta == {"method": "reference (selected)", "core": "reference"}
    if not COMPILED:
        return
    old, fastcore.RING = fastcore.RING, ring
    try:
        compiled = simulate(engines[1], requests, method="fast", record_batches=record_batches, **run)
    finally:
        fastcore.RING = old
    assert compiled.meta == {"method": "fast", "core": "compiled"}
    assert_same(ref, compiled)
    assert engine_state(engines[0]) == engine_state(engines[1])


@pytest.mark.filterwarnings("ignore::llmqueue.model.batch_time.AssumptionWarning")
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.booleans())
def test_compiled_core_equals_reference(case, record_batches):
    check_case(case, record_batches)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::llmqueue.model.batch_time.AssumptionWarning")
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.booleans())
def test_compiled_core_equals_reference_many(case, record_batches):
    check_case(case, record_batches)


def test_long_stretches_and_progress_match():
    # Few arrivals, long outputs and a long prompt: stretches of thousands of batches.
    requests = Requests(np.array([0.0, 0.05, 900.0, 900.0]), np.array([5000, 3, 7, 1], np.int64),
                        np.array([9_000, 4_000, 1, 0], np.int64))
    for name in ("sarathi", "orca", "vllm", "fastertransformer", "vllm-v1", "maxweight"):
        bt = {"model": "staircase", "c_ms": 11.28, "a_ms": 35.47, "b0": 128}
        ticks: dict[str, list[int]] = {}
        runs = {}
        for method in ("fast", "reference"):
            seen = ticks[method] = []
            runs[method] = simulate(make_engine(name, 512, batch_time=bt), requests, drain=True, method=method,
                                    progress=lambda now, i, seen=seen: seen.append(i))
        assert runs["fast"].meta["method"] == ("fast" if COMPILED else runs["fast"].meta["method"])
        assert_same(runs["reference"], runs["fast"])
        assert runs["fast"].num_batches > 4_000  # vllm, fastertransformer reject the 5000-token prompt
        assert ticks["fast"][-1] == ticks["reference"][-1] == 4
        assert len(ticks["fast"]) > 2  # progress is reported during the run, not only at its end


@needs_core
def test_compiled_core_stops_when_progress_raises():
    # Ctrl-C arrives as KeyboardInterrupt from the progress hook (or PyErr_CheckSignals): the C
    # loop stops at once and frees its buffers; the engine is left untouched.
    requests = Requests(np.arange(3000) * 0.01, np.full(3000, 20, np.int64), np.full(3000, 50, np.int64))
    calls = []

    def interrupt(now, i):
        calls.append(i)
        if len(calls) == 2:
            raise KeyboardInterrupt

    engine = make_engine("sarathi", 64)
    with pytest.raises(KeyboardInterrupt):
        simulate(engine, requests, drain=True, progress=interrupt)
    assert len(calls) == 2 and engine.num_in_engine == 0


def test_a_missing_or_stale_core_falls_back_to_the_reference_loop(monkeypatch):
    requests = Requests(np.array([0.0, 0.5]), np.array([3, 4], np.int64), np.array([2, 1], np.int64))
    why = "the compiled core is older than _fastcore.c (rebuild: pip install -e .)"
    monkeypatch.setattr(fastcore, "_core", None)
    monkeypatch.setattr(fastcore, "_why_not", why)
    result = simulate(make_engine("sarathi", 8), requests, drain=True)
    assert result.meta == {"method": f"reference ({why})", "core": "reference"}
    assert result.finish_time.tolist() == [3.0, 3.0]


def test_stale_build_is_detected(tmp_path, monkeypatch):
    if not COMPILED:
        pytest.skip(fastcore.unavailable())
    source = tmp_path / "_fastcore.c"
    source.write_text(fastcore._SOURCE.read_text() + "\n/* edited */\n")
    monkeypatch.setattr(fastcore, "_SOURCE", source)
    core, why = fastcore._load()
    assert core is None and "older than _fastcore.c" in why


def test_unsupported_engines_fall_back_to_the_reference():
    class Subclass(Sarathi):  # a policy that plans in Python: overrides plan()
        name = "test-python-plan"

        def plan(self, state):
            return super().plan(state)

    class Mixed(Constant):
        tokens_only = False

    requests = Requests(np.array([0.0, 0.5]), np.array([3, 4], np.int64), np.array([2, 1], np.int64))
    with pytest.warns(RuntimeWarning, match="plans in Python"):   # said once
        Subclass_engine = Engine(Subclass(), 8, Constant(1.0))
        simulate(Subclass_engine, requests, drain=True)
    cases = {
        "plans in Python": Engine(Subclass(), 8, Constant(1.0)),
        "depends on more than the token load": Engine(make_scheduler("sarathi"), 8, Mixed(1.0)),
    }
    for reason, engine in cases.items():
        result = simulate(engine, requests, drain=True)
        assert reason in result.meta["method"] and result.meta["method"].startswith("reference")
        assert result.finish_time.tolist() == [3.0, 3.0]
    with pytest.raises(ConfigError, match="run.method"):
        simulate(make_engine("sarathi", 8), requests, method="quick")


def test_config_selects_the_method():
    assert parse_config({}).run.method == "fast"
    assert parse_config({"run": {"method": "reference"}}).run.method == "reference"
    with pytest.raises(ConfigError, match=r"run\.method = 'quick' is not allowed: one of fast, reference"):
        parse_config({"run": {"method": "quick"}})


SINGLE_ENGINE = sorted(name for name in SCENARIOS if set(scenario_data(name)) <= {"engine", "workload", "run"})


@pytest.mark.parametrize("scenario", SINGLE_ENGINE)
def test_builtin_scenarios_give_the_same_summary(scenario):
    data = scenario_data(scenario)
    data["run"] = {**data.get("run", {}), "horizon_s": 150.0}
    data["run"].pop("requests", None)
    runs = {}
    for method in ("reference", "fast"):
        data["run"]["method"] = method
        runs[method] = run_config(parse_config(data))
    ref, fast = (dict(runs[m].summary, wall_s=None) for m in ("reference", "fast"))
    assert ref == fast
    assert_same(runs["reference"].result, runs["fast"].result)


@pytest.mark.parametrize("name", ["orca", "vllm-v1", "sarathi", "maxweight"])
def test_long_outputs_at_high_load_match(name):
    # The benchmark's fig1-out10 (outputs x10, rate scaled to keep the load): Orca's varying decode
    # room delays part of the head most batches (lazy calendar entries re-filed later), and vLLM v1's
    # max_num_seqs keeps prompts waiting.
    data = scenario_data("fig1")
    data["workload"]["output"]["mean"] *= 10
    data["workload"].pop("rate", None)
    data["workload"]["load"] = 0.9
    data["engine"]["scheduler"] = name
    runs = {}
    for method in ("reference", "fast"):
        data["run"] = {"requests": 1500, "seed": 3, "method": method}
        runs[method] = run_config(parse_config(data))
    assert runs["fast"].result.meta["method"] == ("fast" if COMPILED else runs["fast"].result.meta["method"])
    assert_same(runs["reference"].result, runs["fast"].result)
    assert dict(runs["reference"].summary, wall_s=None) == dict(runs["fast"].summary, wall_s=None)


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=needs_core), False], ids=["compiled", "reference"])
@pytest.mark.parametrize("run", [{"requests": 3000}, {"horizon_s": 150.0}, {"requests": 800, "drain": True}],
                         ids=["requests", "horizon", "drain"])
@pytest.mark.parametrize("name", ["sarathi", "vllm", "orca", "vllm-v1", "maxweight"])
def test_stream_without_records_matches_the_full_summary(name, run, compiled):
    data = {"engine": {"scheduler": name}, "workload": {"load": 0.95, "prompt": {"dist": "poisson", "mean": 300}},
            "run": {**run, "seed": 4}}
    cfg = parse_config(data)
    full = run_config(cfg).summary
    chunks = request_chunks(build_workload(cfg), 4, num_requests=run.get("requests"), horizon_s=run.get("horizon_s"),
                            chunk=97)
    seen: list[int] = []
    engine = build_engine(cfg)
    stream = simulate_stream(engine, chunks, horizon_s=run.get("horizon_s"), drain=run.get("drain", False),
                             progress=lambda now, n: seen.append(n), compiled=compiled)
    assert seen[-1] == full["arrived"] and seen == sorted(seen)
    for key in ("horizon_s", "arrived", "completed", "rejected", "batches", "mean_batch_tokens", "token_throughput",
                "throughput_rps", "final_in_system", "work_conserving_violations"):
        assert stream[key] == full[key], key
    for key in ("ttft_s", "tbt_s", "e2e_s"):
        assert stream[key]["mean"] == pytest.approx(full[key]["mean"], rel=1e-12), key
    assert stream["records"] is False and full["rejected"] == (0 if name == "sarathi" else full["rejected"])
    # The engine ends as the reference loop leaves it (streaming counts and empties `rejected`).
    reference = build_engine(cfg)
    simulate(reference, generate(cfg, build_workload(cfg)), horizon_s=run.get("horizon_s"),
             drain=run.get("drain", False), method="reference")
    assert engine_state(engine)[:5] == engine_state(reference)[:5] and not engine.rejected


def test_stream_refuses_an_engine_with_requests_and_no_requests():
    engine = make_engine("sarathi", 8)
    simulate(engine, Requests(np.array([0.0]), np.array([3]), np.array([1])))  # ends with the request inside
    chunks = [(np.array([0.0]), np.array([3]), np.array([1]))]
    with pytest.raises(ConfigError, match="fresh engine"):
        simulate_stream(engine, chunks)
    with pytest.raises(ConfigError, match="run.requests"):
        simulate_stream(make_engine("sarathi", 8), [])


@pytest.mark.parametrize("arrival", [{"arrival": "poisson", "rate": 3.0}, {"arrival": "gamma", "rate": 3.0, "cv": 2.0},
                                     {"arrival": "deterministic", "rate": 3.0}], ids=lambda a: a["arrival"])
def test_request_chunks_are_the_generated_requests(arrival):
    for dist in ({"dist": "poisson", "mean": 50}, {"dist": "geometric", "mean": 20}, {"dist": "fixed", "value": 5},
                 {"dist": "lognormal", "mean": 50, "sigma": 0.8}, {"dist": "uniform", "low": 1, "high": 100}):
        workload = Workload(make_arrivals(arrival), make_length(dist, field="p", minimum=1),
                            make_length({"dist": "poisson", "mean": 30}, field="o", minimum=0))
        for horizon in ({"num_requests": 3000}, {"horizon_s": 700.0}):
            full = workload.generate(7, **horizon)
            parts = list(request_chunks(workload, 7, chunk=97, **horizon))
            for j, column in enumerate((full.arrival_time, full.num_prompt_tokens, full.num_output_tokens)):
                assert np.array_equal(np.concatenate([p[j] for p in parts]), column), (dist, horizon, j)


def test_benchmark_rows_count_the_same_events_every_way():
    spec = importlib.util.spec_from_file_location("bench_simulate", ROOT / "benchmarks" / "bench_simulate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {m: bench.one("fig1", "sarathi", 1500, 0.9, 3, m) for m in ("fast", "reference", "stream")}
    assert rows["fast"]["method"] == ("fast-c" if COMPILED else rows["fast"]["method"])
    assert rows["stream"]["method"] == "stream"
    for key in ("events", "batches", "completed"):
        assert rows["fast"][key] == rows["reference"][key] == rows["stream"][key], key
    assert rows["fast"]["events"] > 2 * rows["fast"]["completed"]
    assert bench.line(rows["reference"]).split()[2] == "reference"


def test_benchmark_ratio_mode_alternates_and_reports(tmp_path):
    # The runner behind issue 5's target 2 (outputs x10 over x1, paired runs): a tiny size, no timing claim.
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_simulate.py"), "--ratio", "--requests", "300",
                          "--schedulers", "sarathi", "--repeat", "1", "--json", str(tmp_path / "rows.json")],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    header, row = out.stdout.strip().splitlines()
    assert header.split()[-2:] == ["ratio", "paired"] and row.split()[:2] == ["fig1", "sarathi"]
    assert float(row.split()[-2]) > 0 and float(row.split()[-1]) > 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["scenario"] for r in rows] == ["fig1", "fig1-out10"]


def check_stream_case(case, chunk: int) -> None:
    name, options, budget, cap, requests, batch_time, run, _ = case
    pieces = [tuple(a[j:j + chunk] for a in (requests.arrival_time, requests.num_prompt_tokens,
                                             requests.num_output_tokens)) for j in range(0, len(requests), chunk)]
    engines = [engine_for(name, budget, cap=cap, batch_time=batch_time, **options) for _ in range(2)]
    assert fastcore.reason(engines[1]) is None
    out = [simulate_stream(e, pieces, compiled=compiled, **run) for e, compiled in zip(engines, (False, True))]
    for summary in out:
        summary.pop("wall_s")
    for key in ("ttft_s", "tbt_s", "e2e_s"):  # means: the same sums, maybe in another order
        means = [s[key].pop("mean") for s in out]
        assert (means[0] is None) == (means[1] is None), key
        assert means[0] is None or means[0] == pytest.approx(means[1], rel=1e-12, abs=1e-12), key
    assert out[0] == out[1]
    assert engine_state(engines[0]) == engine_state(engines[1])


@needs_core
@pytest.mark.filterwarnings("ignore::llmqueue.model.batch_time.AssumptionWarning")
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.integers(1, 7))
def test_compiled_stream_equals_the_reference_stream(case, chunk):
    # Each chunk is one call of the compiled core that resumes with the requests still in the
    # engine (partly prefilled prompts, decoders, a cap): the totals and the engine's final state
    # must be those of the reference loop, which streams the same chunks in one loop.
    check_stream_case(case, chunk)


@needs_core
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::llmqueue.model.batch_time.AssumptionWarning")
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.integers(1, 7))
def test_compiled_stream_equals_the_reference_stream_many(case, chunk):
    check_stream_case(case, chunk)


def check_stepping(case, cuts: list[float], stop_at_finish: bool, method: str, online: bool) -> None:
    # Advancing in pieces (random cut times, or up to each finish) gives the run simulate() makes
    # in one go: the same batches, first-token and finish times and rejections.  ``online``: each
    # request is admitted only when the engine has advanced to its arrival (as a router would).
    name, options, budget, cap, requests, batch_time, run, _ = case
    horizon = float("inf") if run.get("drain") else run.get("horizon_s", float(requests.arrival_time[-1]))
    once = simulate(engine_for(name, budget, cap=cap, batch_time=batch_time, **options), requests,
                    horizon_s=None if run.get("drain") else horizon, drain=bool(run.get("drain")), method="reference")
    stepper = Stepper(engine_for(name, budget, cap=cap, batch_time=batch_time, **options), method=method)
    assert stepper.method == ("fast" if method == "fast" and COMPILED else stepper.method)
    ends, tokens, first, finish, rejected = [], [], {}, {}, []

    def advance(t: float) -> None:
        while True:
            step = stepper.advance(t, stop_at_finish=stop_at_finish)
            ends.extend(step.batch_end_time.tolist())
            tokens.extend(step.batch_tokens.tolist())
            first.update(zip(step.finished.tolist(), step.first_token_time.tolist()))
            finish.update(zip(step.finished.tolist(), step.finish_time.tolist()))
            rejected.extend(step.rejected.tolist())
            if not (stop_at_finish and len(step.finished)) or step.now >= t:
                return

    times = [*sorted(c for c in cuts if c < horizon), horizon]
    if online:
        for i, t in enumerate(requests.arrival_time.tolist()):
            if t <= horizon:
                advance(t)
            stepper.admit(t, requests.num_prompt_tokens[i], requests.num_output_tokens[i])
    else:
        half = len(requests) // 2   # in two calls
        stepper.admit(requests.arrival_time[:half], requests.num_prompt_tokens[:half], requests.num_output_tokens[:half])
        stepper.admit(requests.arrival_time[half:], requests.num_prompt_tokens[half:], requests.num_output_tokens[half:])
    for t in times:
        advance(t)
    assert ends == once.batch_end_time.tolist() and tokens == once.batch_tokens.tolist()
    done = np.flatnonzero(~np.isnan(once.finish_time))
    assert finish == dict(zip(done.tolist(), once.finish_time[done].tolist()))
    assert first == dict(zip(done.tolist(), once.first_token_time[done].tolist()))
    assert sorted(rejected) == np.flatnonzero(once.rejected).tolist()
    ids, times = stepper.in_engine()   # the requests left inside: neither finished nor rejected
    left = np.flatnonzero(np.isnan(once.finish_time) & ~once.rejected & (once.arrival_time <= stepper.now))
    assert ids.tolist() == left.tolist() and stepper.num_in_engine == len(left)
    np.testing.assert_array_equal(times, once.first_token_time[left])


@pytest.mark.filterwarnings("ignore::llmqueue.model.batch_time.AssumptionWarning")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.lists(st.floats(0.0, 60.0), max_size=6), st.booleans(), st.sampled_from(["fast", "reference"]),
       st.booleans())
def test_advancing_in_pieces_gives_the_run_of_one_advance(case, cuts, stop_at_finish, method, online):
    check_stepping(case, cuts, stop_at_finish, method, online)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::llmqueue.model.batch_time.AssumptionWarning")
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.lists(st.floats(0.0, 60.0), max_size=6), st.booleans(), st.sampled_from(["fast", "reference"]),
       st.booleans())
def test_advancing_in_pieces_gives_the_run_of_one_advance_many(case, cuts, stop_at_finish, method, online):
    check_stepping(case, cuts, stop_at_finish, method, online)


def test_stepper_refuses_bad_admissions():
    stepper = Stepper(make_engine("sarathi", 8))
    stepper.admit([1.0, 2.0], [3, 4], [1, 1])
    with pytest.raises(ConfigError, match="non-decreasing"):
        stepper.admit([0.5], [3], [1])
    with pytest.raises(ConfigError, match="one length"):
        stepper.admit([3.0, 4.0], [3], [1])
    with pytest.raises(ConfigError, match="at least 1 token"):
        stepper.admit([3.0], [0], [1])
    step = stepper.advance(float("inf"))
    assert step.finished.tolist() == [0, 1] and stepper.num_in_engine == 0


@needs_core
@pytest.mark.parametrize("kv", [{}, {"kv_blocks": 600}], ids=["no-kv", "kv"])
def test_an_overloaded_compiled_run_leaves_the_queues_lazily_and_exactly(kv):
    """The compiled run's final queues become Request objects when first read (fastcore.LazyQueues):
    the same state as the reference loop's, and stepping on from it gives the same batches."""
    data = {"engine": {"scheduler": "sarathi", **kv}, "workload": {"load": 1.3}, "run": {"horizon_s": 120.0, "seed": 2}}
    cfg = parse_config(data)
    requests = generate(cfg, build_workload(cfg))
    fast, ref = build_engine(cfg), build_engine(cfg)
    simulate(fast, requests, horizon_s=120.0)
    simulate(ref, requests, horizon_s=120.0, method="reference")
    assert isinstance(fast.state, fastcore.LazyQueues) and fast.state._pending is not None
    assert engine_state(fast) == engine_state(ref) and len(fast.state.prefilling) > 50
    assert fast.state._pending is None and fast.state.kv_used == ref.state.kv_used
    now_f = now_r = 120.5
    for _ in range(20):
        a, b = fast.step(now_f), ref.step(now_r)
        assert (a.end_time, a.plan.num_tokens) == (b.end_time, b.plan.num_tokens)
        now_f, now_r = a.end_time, b.end_time
    assert engine_state(fast) == engine_state(ref)
