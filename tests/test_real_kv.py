"""The real engine's paged KV pool (engine.kv_blocks): paged attention, preemption and recompute on
the model, and the engine's memory decisions against the simulator's (docs/real_engine.md,
"Paged KV and preemption").

Marked ``real``; skipped without PyTorch.  Tiny model; no test asserts a duration.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from llmqueue.cli import main
from llmqueue.config import parse_config
from llmqueue.core.engine import Engine
from llmqueue.core.simulator import simulate
from llmqueue.errors import ConfigError, InternalError
from llmqueue.model.batch_time import make_batch_time
from llmqueue.model.kv import KVCache
from llmqueue.model.workload import Requests
from llmqueue.real.kvcache import KVPool, PagedKVPool
from llmqueue.real.model import Chunk, Transformer, model_config
from llmqueue.real.serve import Executor, MeasuredBatchTime, PagedExecutor, RealEngine, real_settings, serve
from llmqueue.runner import build_engine, build_workload, execute, generate, run_config
from llmqueue.schedulers import make_scheduler

pytestmark = [pytest.mark.real, pytest.mark.filterwarnings("ignore::llmqueue.model.batch_time.AssumptionWarning")]
STAIRCASE = make_batch_time({"model": "staircase", "c_ms": 1.0, "a_ms": 2.0, "b0": 8})


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return Transformer.random(model_config({"preset": "tiny"}))


def _ids(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(1, 512, n).tolist()


def _requests(n: int, rate: float, seed: int, prompt=(5, 40), output=(1, 30)) -> Requests:
    rng = np.random.default_rng(seed)
    return Requests(np.cumsum(rng.exponential(1 / rate, n)), rng.integers(*prompt, n), rng.integers(*output, n))


def _paged(model, kv: KVCache, scheduler: str, budget: int = 32, batch_time=STAIRCASE):
    """A paged executor and an engine with the model clock (batch times from ``batch_time``)."""
    executor = PagedExecutor(model, PagedKVPool(model.config, kv), lambda: 0.0)
    engine = Engine(make_scheduler(scheduler), budget, MeasuredBatchTime(executor, batch_time, "model"), kv=kv,
                    checks=True)
    return executor, engine


def _sim_preemptions(engine: Engine) -> list[tuple[int, int]]:
    """Records (batch index, request id) of every preemption ``engine`` applies, in order."""
    log: list[tuple[int, int]] = []
    apply = engine._preempt

    def recording(victims):
        log.extend((len(engine.kv_series), v.rid) for v in victims)
        apply(victims)

    engine._preempt = recording
    return log


@pytest.mark.parametrize("kv_heads", [2, 4])   # grouped-query and plain multi-head attention
def test_paged_attention_equals_the_contiguous_pool(kv_heads):
    model = Transformer.random(model_config({"preset": "tiny", "num_kv_heads": kv_heads}))
    prompt, other = _ids(37), _ids(20, seed=1)
    contiguous = KVPool(model.config, 512)
    paged = PagedKVPool(model.config, KVCache(40, 4))
    # Scattered, out-of-order block tables: every read goes through the gather.
    table_a, table_b = [17, 3, 30, 9, 22, 5, 38, 11, 26, 2, 14], [8, 33, 1, 20, 27, 6]
    slots_a = (torch.tensor(table_a).unsqueeze(1) * 4 + torch.arange(4)).flatten()
    slots_b = (torch.tensor(table_b).unsqueeze(1) * 4 + torch.arange(4)).flatten()
    parts_c, parts_p, done = [], [], 0
    for n in (10, 15, 12):   # the prompt in chunks
        parts_c.append(model.forward([Chunk(100, done, prompt[done: done + n])], contiguous.k, contiguous.v,
                                     all_logits=True))
        parts_p.append(model.forward([Chunk(slots_a[: done + n], done, prompt[done: done + n])], paged.k, paged.v,
                                     all_logits=True))
        done += n
    torch.testing.assert_close(torch.cat(parts_p), torch.cat(parts_c), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat(parts_p), model.reference_logits(prompt), atol=1e-4, rtol=1e-4)
    # Packed with another request's prompt, then decode tokens of both.
    c = model.forward([Chunk(300, 0, other), Chunk(100, 37, [5])], contiguous.k, contiguous.v, all_logits=True)
    p = model.forward([Chunk(slots_b[:20], 0, other), Chunk(slots_a[:38], 37, [5])], paged.k, paged.v,
                      all_logits=True)
    torch.testing.assert_close(p, c, atol=1e-6, rtol=1e-6)
    c = model.forward([Chunk(300, 20, [9]), Chunk(100, 38, [7])], contiguous.k, contiguous.v)
    p = model.forward([Chunk(slots_b[:21], 20, [9]), Chunk(slots_a[:39], 38, [7])], paged.k, paged.v)
    torch.testing.assert_close(p, c, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(p[1], model.reference_logits([*prompt, 5, 7])[-1], atol=1e-4, rtol=1e-4)
    assert paged.k[:, :, :4].abs().sum() == 0   # block 0 is never written
    with pytest.raises(InternalError, match="slots"):
        model.forward([Chunk(slots_b[:3], 2, [1, 2])], paged.k, paged.v)


def test_block_tables_and_the_reserved_block():
    pool = PagedKVPool(model_config({"preset": "tiny"}), KVCache(5, 4))
    a, b = [], []
    pool.grow(a, 5)
    pool.grow(b, 4)
    assert a == [1, 2] and b == [3] and pool.used == 3 and pool.capacity_tokens == 16
    assert pool.slots(a, 5) == 4   # consecutive blocks: a view from slot 4
    pool.grow(a, 8)   # no new block needed
    assert pool.used == 3
    pool.release(b)
    pool.grow(a, 9)   # the next free block is 4, then the released 3
    pool.grow(a, 13)
    assert a == [1, 2, 4, 3] and b == [] and pool.free == 0
    assert pool.slots(a, 14).tolist() == [*range(4, 12), *range(16, 20), 12, 13]
    with pytest.raises(InternalError, match="blocks"):
        pool.grow(a, 17)


def test_a_preempted_and_recomputed_request_decodes_the_same_tokens(tiny):
    """Greedy tokens of requests preempted (some several times) and recomputed equal those of the
    same requests run with unlimited memory, and greedy decoding by the plain reference pass."""
    reqs = _requests(40, 300.0, 0)
    kv = KVCache(20, 4)   # 76 tokens for requests of up to 68: memory binds hard
    executor, engine = _paged(tiny, kv, "sarathi")
    result = serve(engine, executor, reqs, drain=True)
    alone = Executor(tiny, KVPool(tiny.config, 4096), lambda: 0.0)
    serve(Engine(make_scheduler("sarathi"), 32, MeasuredBatchTime(alone, STAIRCASE, "model")), alone, reqs,
          drain=True)
    preempted = np.flatnonzero(result.kv.preemptions)
    assert len(preempted) >= 15 and result.kv.preemptions.max() >= 2 and result.kv.recomputed.sum() > 300
    assert np.isfinite(result.finish_time).all()
    for rid in range(len(reqs)):
        assert executor.outputs[rid] == alone.outputs[rid], rid
        assert len(executor.outputs[rid]) == 1 + reqs.num_output_tokens[rid]
    rid = int(preempted[np.argmax(result.kv.preemptions[preempted])])
    rng = np.random.default_rng([0, rid])   # the executor's prompt of request rid
    tokens = rng.integers(1, tiny.config.vocab_size, reqs.num_prompt_tokens[rid]).tolist()
    prompt_len = len(tokens)
    for _ in range(1 + reqs.num_output_tokens[rid]):
        tokens.append(int(tiny.reference_logits(tokens)[-1].argmax()))
    assert executor.outputs[rid] == tokens[prompt_len:]
    # The executor's own counts are the engine's, and every block came back.
    assert len(executor.preemption_log) == result.kv.preemptions.sum()
    assert executor.recomputed_tokens == result.kv.recomputed.sum() == result.kv.batch_recomputed.sum()
    assert executor.pool.used == 0 and not executor.tables
    assert np.array_equal(result.batches["kv_blocks_in_use"], result.kv.batch_blocks)


@pytest.mark.parametrize("policy", ["recompute", "reserve"])
@pytest.mark.parametrize("scheduler,options", [("sarathi", {}), ("vllm-v1", {"long_prefill_token_threshold": 8}),
                                               ("orca", {}), ("vllm", {}), ("fastertransformer", {})])
def test_model_clock_preemptions_are_the_simulators(tiny, scheduler, options, policy):
    """With the model clock the real engine's decisions are the simulator's: the same preemptions
    (request, batch) in the same order, batches, finish times and KV record."""
    reqs = _requests(30, 400.0, 3, prompt=(2, 16), output=(1, 14))
    kv = KVCache(9, 4, policy)
    executor = PagedExecutor(tiny, PagedKVPool(tiny.config, kv), lambda: 0.0)
    engine = Engine(make_scheduler(scheduler, **options), 16, MeasuredBatchTime(executor, STAIRCASE, "model"), kv=kv)
    real = serve(engine, executor, reqs, drain=True)
    reference = Engine(make_scheduler(scheduler, **options), 16, STAIRCASE, kv=kv)
    log = _sim_preemptions(reference)
    sim = simulate(reference, reqs, drain=True, method="reference")
    fast = simulate(Engine(make_scheduler(scheduler, **options), 16, STAIRCASE, kv=kv), reqs, drain=True)
    assert executor.preemption_log == log == real.meta["preemption_log"]
    if policy == "recompute" and scheduler != "fastertransformer":
        assert len(log) >= 10
    if policy == "reserve":
        assert not log
    for other in (sim, fast):
        assert np.array_equal(real.batch_end_time, other.batch_end_time)
        assert np.array_equal(real.batch_tokens, other.batch_tokens)
        assert np.array_equal(real.finish_time, other.finish_time, equal_nan=True)
        assert np.array_equal(real.rejected, other.rejected)
        for name in ("batch_blocks", "batch_recomputed", "preemptions", "recomputed"):
            assert np.array_equal(getattr(real.kv, name), getattr(other.kv, name)), name


def test_vllm_small_cache_takes_turns(tiny):
    """Three requests of 100 tokens in 7 usable blocks of 16 (vLLM's self-preemption case): they
    take turns, and their tokens are those of a run without memory pressure."""
    reqs = Requests(np.array([0.0, 0.0, 0.01]), np.array([40, 40, 40]), np.array([60, 60, 60]))
    kv = KVCache(8, 16)
    executor, engine = _paged(tiny, kv, "vllm-v1", budget=64)
    reference = Engine(make_scheduler("vllm-v1"), 64, STAIRCASE, kv=kv)
    log = _sim_preemptions(reference)
    simulate(reference, reqs, drain=True, method="reference")
    real = serve(engine, executor, reqs, drain=True)
    assert executor.preemption_log == log and len(log) >= 2
    alone = Executor(tiny, KVPool(tiny.config, 1024), lambda: 0.0)
    serve(Engine(make_scheduler("vllm-v1"), 64, MeasuredBatchTime(alone, STAIRCASE, "model")), alone, reqs,
          drain=True)
    assert all(executor.outputs[i] == alone.outputs[i] for i in range(3))
    assert real.kv.recomputed.sum() > 0


def test_preemptions_the_engine_applies_before_planning_again_are_mirrored(tiny):
    """When a plan preempts every running request and serves nothing, the engine applies the
    preemptions and plans again (core/engine.py); the executor then sees only the second plan
    and finds the victims by their preemption counts.  Forced here on a few batches."""
    from llmqueue.model.batch import BatchPlan
    from llmqueue.schedulers.plan import running_list

    reqs = _requests(20, 300.0, 5)
    kv = KVCache(30, 4)
    executor, engine = _paged(tiny, kv, "sarathi")
    plan, forced = engine.scheduler.plan, []

    def everyone_preempted_at_times(state):
        running = running_list(state)
        if len(forced) < 3 and len(engine.kv_series) in (5, 20, 40) and running and \
                (not forced or forced[-1][0] != len(engine.kv_series)):
            forced.append((len(engine.kv_series), running[-1].rid))
            return BatchPlan((), [], 0, (running[-1],), True)
        return plan(state)

    engine.scheduler.plan = everyone_preempted_at_times
    result = serve(engine, executor, reqs, drain=True)   # the executor checks its blocks every batch
    assert len(forced) == 3 and set(forced) <= set(executor.preemption_log)
    assert len(executor.preemption_log) == result.kv.preemptions.sum()
    alone = Executor(tiny, KVPool(tiny.config, 4096), lambda: 0.0)
    serve(Engine(make_scheduler("sarathi"), 32, MeasuredBatchTime(alone, STAIRCASE, "model")), alone, reqs,
          drain=True)
    assert all(executor.outputs[i] == alone.outputs[i] for i in range(len(reqs)))


TOML = """
[engine]
scheduler = "sarathi"
token_budget = 64
kv_blocks = 12
block_size = 8
[engine.batch_time]
model = "prefill_decode"
c_ms = 1.0
prefill_ms_per_token = 0.02
decode_ms_per_token = 0.1
[workload]
arrival = "poisson"
rate = 80
prompt = {dist = "poisson", mean = 20}
output = {dist = "poisson", mean = 12}
[run]
horizon_s = 0.4
seed = 1
[real]
model = {preset = "tiny"}
warmup_batches = 1
"""


def _config(drop=(), **engine):
    import tomllib

    data = tomllib.loads(TOML)
    data.pop("real")
    data["engine"].update(engine)
    for key in drop:
        del data["engine"][key]
    return parse_config(data)


def test_real_engine_run_with_kv_blocks_and_the_model_clock(tiny):
    """RealEngine.run on the config (prefill_decode batch time: the simulator's reference loop):
    with the model clock the summary's KV block is the simulator's."""
    config = _config()
    engine = RealEngine(real_settings({"model": {"preset": "tiny"}, "clock": "model", "warmup_batches": 1}),
                        model=tiny)
    workload = build_workload(config)
    requests = generate(config, workload)
    real = engine.run(config, requests=requests)
    sim = execute(config, build_engine(config), workload, requests)
    assert real.summary["kv"] == sim.summary["kv"] and real.summary["kv"]["preemptions"] >= 3
    assert np.array_equal(real.result.finish_time, sim.result.finish_time, equal_nan=True)
    pool = real.summary["real"]["kv_pool"]
    assert pool["kind"] == "paged" and pool["kv_blocks"] == 12 and pool["block_size"] == 8
    assert pool["executor_preemptions"] == real.summary["kv"]["preemptions"]
    assert pool["executor_recomputed_tokens"] == real.summary["kv"]["recomputed_tokens"]
    assert real.summary["real"]["kv_pool_bytes"] == 2 * 2 * 2 * 12 * 8 * 16 * 4   # k, v; layers, heads, slots, dim
    # Without kv_blocks: the contiguous pool, no KV record, the batch columns of before.
    plain = RealEngine(real_settings({"model": {"preset": "tiny"}, "warmup_batches": 0}), model=tiny).run(
        _config(drop=("kv_blocks", "block_size")), requests=requests)
    assert plain.result.kv is None and "kv" not in plain.summary
    assert plain.summary["real"]["kv_pool"]["kind"] == "contiguous" and "preempted" not in plain.result.batches


def test_bad_kv_input_is_the_simulators_error(tiny):
    settings = real_settings({"model": {"preset": "tiny"}, "warmup_batches": 0})
    small = _config(kv_blocks=3)
    with pytest.raises(ConfigError) as real:
        RealEngine(settings, model=tiny).run(small)
    with pytest.raises(ConfigError) as sim:
        run_config(small)
    assert str(real.value) == str(sim.value) and "engine.kv_blocks = 3" in str(real.value)
    with pytest.raises(ConfigError, match="engine.kv_blocks"):
        _config(kv_blocks=1)
    with pytest.raises(ConfigError, match="engine.kv_policy"):
        _config(kv_policy="swap")
    with pytest.raises(ConfigError, match="engine.prefix_caching.*real engine"):
        RealEngine(settings, model=tiny).run(_config(prefix_caching=True))


def test_engine_commands_print_kv_next_to_the_simulator(tmp_path, capsys):
    cfg_path = tmp_path / "kv.toml"
    cfg_path.write_text(TOML)
    out = tmp_path / "run"
    assert main(["engine", "run", str(cfg_path), "--out", str(out), "--no-plot", "--set", "real.clock=model"]) == 0
    text = capsys.readouterr().out
    assert "paged KV pool 12 blocks of 8 tokens" in text and "sim (config)" in text
    row = next(line.split() for line in text.splitlines() if line.startswith("sarathi") and "preemptions" in line)
    assert row[2] == row[3] and int(row[2]) > 0   # model clock: the real run's count is the simulator's
    summary = json.loads((out / "summary.json").read_text())["runs"][0]
    assert summary["kv"]["preemptions"] == summary["simulator_kv"]["preemptions"]
    assert "kv_blocks_in_use" in (out / "batches.csv").read_text().splitlines()[0]
    assert main(["engine", "validate", str(cfg_path), "--out", str(tmp_path / "v"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["kv"]["real"]["preemptions"] >= 0 and "sim_run_fit" in rows[0]["kv"]
    assert main(["engine", "validate", str(cfg_path), "--out", str(tmp_path / "v2"), "--no-refit"]) == 0
    text = capsys.readouterr().out
    assert "KV memory: engine.kv_blocks = 12" in text and "recomputed tokens" in text
    assert main(["engine", "run", str(cfg_path), "--set", "engine.kv_blocks=3", "--no-plot",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "engine.kv_blocks = 3 is not allowed" in capsys.readouterr().err
