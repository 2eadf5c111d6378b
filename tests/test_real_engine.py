"""The real CPU engine (tiny model): equivalence of packed batches, KV pool, serving loop, CLI.

Marked ``real``; skipped without PyTorch.  No test asserts a duration.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llmqueue.model.batch_time import make_batch_time
from llmqueue.cli import main
from llmqueue.config import parse_config
from llmqueue.core.engine import Engine
from llmqueue.errors import ConfigError
from llmqueue.real.kvcache import KVPool
from llmqueue.real.model import Chunk, Transformer, model_config
from llmqueue.real.serve import (
    Executor,
    MeasuredBatchTime,
    RealEngine,
    real_settings,
    serve,
)
from llmqueue.schedulers import make_scheduler
from llmqueue.core.simulator import simulate
from llmqueue.model.workload import Requests

# The reference batch-time models here are arbitrary (the real engine measures); their
# Assumption-1 warnings are beside the point.
pytestmark = [pytest.mark.real, pytest.mark.filterwarnings("ignore::llmqueue.model.batch_time.AssumptionWarning")]
TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return Transformer.random(model_config({"preset": "tiny"}))


def _ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(1, 512, n).tolist()


@pytest.mark.parametrize("kv_heads", [2, 4])   # grouped-query and plain multi-head attention
def test_logits_do_not_depend_on_how_the_prompt_is_batched(kv_heads):
    model = Transformer.random(model_config({"preset": "tiny", "num_kv_heads": kv_heads}))
    prompt = _ids(37)
    ref = model.reference_logits(prompt)
    pool = KVPool(model.config, 512)
    # (a) at once
    at_once = model.forward([Chunk(0, 0, prompt)], pool.k, pool.v, all_logits=True)
    torch.testing.assert_close(at_once, ref, **TOL)
    # (b) in chunks of 10, 15, 12, in another KV run
    parts, done = [], 0
    for n in (10, 15, 12):
        parts.append(model.forward([Chunk(100, done, prompt[done: done + n])], pool.k, pool.v, all_logits=True))
        done += n
    torch.testing.assert_close(torch.cat(parts), ref, **TOL)
    # (c) alongside other requests: a chunk of another prompt before it, decode tokens after it
    other = _ids(20, seed=1)
    model.forward([Chunk(200, 0, other[:12])], pool.k, pool.v)
    head = model.forward([Chunk(200, 12, other[12:]), Chunk(300, 0, prompt[:30]), Chunk(0, 37, [5]),
                          Chunk(100, 37, [7])], pool.k, pool.v, all_logits=True)
    torch.testing.assert_close(head[8:38], ref[:30], **TOL)
    torch.testing.assert_close(head[:8], model.reference_logits(other)[12:], **TOL)
    torch.testing.assert_close(head[38], model.reference_logits([*prompt, 5])[-1], **TOL)
    torch.testing.assert_close(head[39], model.reference_logits([*prompt, 7])[-1], **TOL)
    tail = model.forward([Chunk(300, 30, prompt[30:])], pool.k, pool.v, all_logits=True)
    torch.testing.assert_close(tail, ref[30:], **TOL)


def test_hugging_face_folder_round_trip(tiny, tmp_path):
    torch.save(tiny.hf_state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(tiny.hf_config()))
    loaded = Transformer.from_hf(tmp_path, dtype="float32")
    assert loaded.config.num_kv_heads == tiny.config.num_kv_heads
    prompt = _ids(9)
    torch.testing.assert_close(loaded.reference_logits(prompt), tiny.reference_logits(prompt))
    with pytest.raises(ConfigError, match="config.json"):
        Transformer.from_hf(tmp_path / "missing")


def test_kv_pool_first_fit_and_merging():
    pool = KVPool(model_config({"preset": "tiny"}), 100)
    a, b, c = pool.reserve(30), pool.reserve(30), pool.reserve(30)
    assert (a, b, c) == (0, 30, 60) and pool.reserve(20) is None and pool.reserved_tokens == 90
    pool.release(b, 30)
    assert pool.reserve(31) is None and pool.largest_free_run == 30
    pool.release(a, 30)
    assert pool.largest_free_run == 60 and pool.reserve(55) == 0
    pool.release(0, 55)
    pool.release(c, 30)
    assert pool.largest_free_run == 100 and pool.reserved_tokens == 0


def _requests(n=40, rate=200.0, seed=0):
    rng = np.random.default_rng(seed)
    return Requests(np.cumsum(rng.exponential(1 / rate, n)), rng.integers(1, 40, n), rng.integers(0, 12, n))


class FixedTimer:
    """A timer whose every measured interval is ``step`` seconds."""

    def __init__(self, step: float) -> None:
        self.step, self.now = step, 0.0
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2 == 0:
            self.now += self.step
        return self.now


@pytest.mark.parametrize("scheduler", ["sarathi", "fastertransformer", "orca", "vllm"])
def test_serving_loop_matches_the_simulator_when_batches_take_the_same_time(tiny, scheduler):
    reqs = _requests()
    sim = simulate(Engine(make_scheduler(scheduler), 32, make_batch_time({"model": "constant", "duration_ms": 4})),
                   reqs, drain=True)
    executor = Executor(tiny, KVPool(tiny.config, 4096), FixedTimer(0.004))
    engine = Engine(make_scheduler(scheduler), 32, MeasuredBatchTime(executor, make_batch_time(None)))
    real = serve(engine, executor, reqs, drain=True)
    np.testing.assert_allclose(real.finish_time, sim.finish_time)
    np.testing.assert_allclose(real.first_token_time, sim.first_token_time)
    np.testing.assert_array_equal(real.batch_tokens, sim.batch_tokens)
    # Every request got its first token from the prefill and one more per decode token.
    served = np.flatnonzero(~real.rejected)
    assert len(served) > 30 and np.array_equal(real.rejected, sim.rejected)
    assert all(len(executor.outputs[i]) == 1 + reqs.num_output_tokens[i] for i in served)
    assert executor.pool.reserved_tokens == 0


def test_outputs_are_greedy_model_outputs(tiny):
    reqs = Requests(np.array([0.0, 0.0]), np.array([7, 11]), np.array([5, 3]))
    executor = Executor(tiny, KVPool(tiny.config, 256), FixedTimer(0.001), seed=3)
    engine = Engine(make_scheduler("sarathi"), 8, MeasuredBatchTime(executor, make_batch_time(None)))
    prompts = {}
    original = executor.reserve

    def keep(request):
        ok = original(request)
        prompts[request.rid] = list(executor.prompt[request.rid])
        return ok

    executor.reserve = keep
    serve(engine, executor, reqs, drain=True)
    for rid, v_d in enumerate([5, 3]):
        tokens = list(prompts[rid])
        for _ in range(v_d + 1):
            tokens.append(int(tiny.reference_logits(tokens)[-1].argmax()))
        assert executor.outputs[rid] == tokens[len(prompts[rid]):]


def test_requests_wait_for_memory_and_too_long_ones_are_rejected(tiny):
    reqs = Requests(np.zeros(8), np.array([30] * 7 + [200]), np.array([10] * 7 + [10]))
    executor = Executor(tiny, KVPool(tiny.config, 100), FixedTimer(0.001))   # 2 requests of 40 fit at once
    engine = Engine(make_scheduler("sarathi"), 64, MeasuredBatchTime(executor, make_batch_time(None)))
    result = serve(engine, executor, reqs, drain=True)
    b = result.batches
    assert b["kv_reserved_tokens"].max() <= 100 and b["waiting_for_memory"].max() >= 4
    assert result.rejected.tolist() == [False] * 7 + [True]
    assert np.isfinite(result.finish_time[:7]).all()


def test_settings_errors_name_the_field():
    with pytest.raises(ConfigError, match="real.threads"):
        real_settings({"threads": 2})
    assert real_settings({"threads": 2, "timer": "wall"}).threads == 2
    with pytest.raises(ConfigError, match="real.colour"):
        real_settings({"colour": 1})
    with pytest.raises(ConfigError, match="real.model.num_kv_heads"):
        real_settings({"model": {"preset": "tiny", "num_kv_heads": 3}})
    with pytest.raises(ConfigError, match="real.model.preset"):
        real_settings({"model": {"preset": "huge"}})
    assert real_settings(real_settings({"model": {"preset": "tiny"}}).to_table()).model.hidden_size == 64


TINY_TOML = """
[engine]
scheduler = "sarathi"
token_budget = 64
[engine.batch_time]
model = "prefill_decode"
c_ms = 1.0
prefill_ms_per_token = 0.02
decode_ms_per_token = 0.1
[workload]
arrival = "poisson"
rate = 50
prompt = {dist = "poisson", mean = 20}
output = {dist = "poisson", mean = 8}
[run]
horizon_s = 0.6
seed = 1
[real]
model = {preset = "tiny"}
kv_capacity_tokens = 4096
warmup_batches = 1
"""


def test_real_engine_summary_and_cli(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(TINY_TOML)
    out = tmp_path / "out"
    assert main(["engine", "run", str(cfg_path), "--schedulers", "sarathi,orca", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "real engine:" in text and "torch threads 1" in text and "orca" in text
    summary = json.loads((out / "summary.json").read_text())["runs"]
    assert summary[0]["real"]["output_tokens"] > 0 and summary[0]["work_conserving_violations"] == 0
    for name in ("number_in_system.png", "sarathi_batches.csv", "timeseries.csv", "config.toml"):
        assert (out / name).exists()
    # The written config runs again.
    assert main(["engine", "run", str(out / "config.toml"), "--out", str(tmp_path / "again"), "--no-plot",
                 "--json"]) == 0
    capsys.readouterr()
    assert main(["engine", "validate", str(cfg_path), "--out", str(tmp_path / "v")]) == 0
    text = capsys.readouterr().out
    assert "throughput_rps" in text and "sim (run_fit)" in text
    rows = json.loads((tmp_path / "v" / "validation.json").read_text())["rows"]
    assert rows[0]["relative_error"]["config"]["throughput_rps"] is not None
    # A real run's batches.csv is a calibration input too.
    assert main(["calibrate", "--samples", str(out / "sarathi_batches.csv"), "--out", str(tmp_path / "fromrun"),
                 "--no-plot"]) == 0
    assert "prefill_decode+context" in capsys.readouterr().out
    assert main(["calibrate", "--config", str(cfg_path), "--prefill", "0,8,32", "--decode", "0,1,4",
                 "--context", "8,32", "--repeats", "1", "--out", str(tmp_path / "cal"), "--no-plot"]) == 0
    cal = tmp_path / "cal" / "batch_time.toml"
    assert "R²" in cal.read_text()
    import tomllib

    parse_config(tomllib.loads(cal.read_text()))   # the simulator accepts it
    assert main(["engine", "run", str(cfg_path), "--set", "real.clock=sundial"]) == 2
    assert "real.clock" in capsys.readouterr().err


def test_real_engine_run_keeps_its_promises(tiny):
    cfg = parse_config({"engine": {"token_budget": 32}, "workload": {"rate": 100, "prompt": {"dist": "poisson", "mean": 10},
                                                                   "output": {"dist": "poisson", "mean": 5}},
                        "run": {"horizon_s": 0.5, "drain": True}})
    run = RealEngine(real_settings({"model": {"preset": "tiny"}, "kv_capacity_tokens": 1024}), model=tiny).run(cfg)
    b = run.result.batches
    assert (b["num_prefill_tokens"] + b["num_decode_tokens"]).max() <= 32
    assert np.all(b["duration"] > 0) and np.all(np.diff(b["start_time"]) > 0)
    assert run.summary["completed"] == run.summary["arrived"]


def test_wall_clock_runs_in_real_time(tiny):
    cfg = parse_config({"engine": {"token_budget": 32}, "workload": {"rate": 40, "prompt": {"dist": "poisson", "mean": 8},
                                                                   "output": {"dist": "poisson", "mean": 4}},
                        "run": {"horizon_s": 0.3, "drain": True}})
    settings = real_settings({"model": {"preset": "tiny"}, "kv_capacity_tokens": 512, "clock": "wall",
                              "warmup_batches": 0})
    run = RealEngine(settings, model=tiny).run(cfg)
    r = run.result
    done = np.isfinite(r.finish_time)
    assert done.all() and np.all(r.finish_time[done] >= r.arrival_time[done])
    assert run.summary["real"]["clock"] == "wall" and run.summary["real"]["timer"] == "wall"
