"""KV-cache memory (model/kv.py, schedulers/plan.py interpret_kv, core/engine.py; docs/memory.md).

Checks: memory that never binds changes nothing; the engine's invariants hold batch by batch
under heavy memory pressure for every built-in policy and both kv policies; bad input is one
clear ConfigError; a request larger than the cache is rejected and counted.
"""

from __future__ import annotations

import numpy as np
import pytest

from llmqueue.config import load_config
from llmqueue.core import fastcore
from llmqueue.core.engine import Engine
from llmqueue.core.simulator import simulate
from llmqueue.errors import ConfigError
from llmqueue.model.batch_time import make_batch_time
from llmqueue.model.kv import KVCache
from llmqueue.model.workload import Requests
from llmqueue.runner import run_config
from llmqueue.schedulers import make_scheduler

STAIRCASE = {"model": "staircase", "c_ms": 11.28, "a_ms": 35.47, "b0": 128}
POLICIES = [("sarathi", {}), ("orca", {}), ("vllm-v1", {}), ("vllm-v1", {"long_prefill_token_threshold": 64}),
            ("vllm", {}), ("vllm", {"split_prompts": True}), ("fastertransformer", {}), ("maxweight", {})]


def _requests(n: int, rate: float, seed: int, prompt: int = 129, output: int = 112) -> Requests:
    rng = np.random.default_rng(seed)
    return Requests(np.cumsum(rng.exponential(1 / rate, n)), np.maximum(rng.poisson(prompt, n), 1).astype(np.int64),
                    rng.poisson(output, n).astype(np.int64))


def _engine(name: str, options: dict, kv: KVCache | None, budget: int = 512, checks: bool = True) -> Engine:
    return Engine(make_scheduler(name, **options), budget, make_batch_time(STAIRCASE), kv=kv, checks=checks)


@pytest.mark.parametrize("name,options", POLICIES)
def test_memory_that_never_binds_changes_nothing(name, options):
    requests = _requests(400, 12.0, 1)
    off = simulate(_engine(name, options, None), requests, drain=True, method="reference")
    on = simulate(_engine(name, options, KVCache(10**7)), requests, drain=True, method="reference")
    assert np.array_equal(off.batch_tokens, on.batch_tokens)
    assert np.array_equal(off.batch_end_time, on.batch_end_time)
    assert np.array_equal(off.finish_time, on.finish_time, equal_nan=True)
    assert np.array_equal(off.first_token_time, on.first_token_time, equal_nan=True)
    assert off.violations == on.violations
    assert on.kv.preemptions.sum() == 0 and on.kv.memory_limited == 0


@pytest.mark.parametrize("policy", ["recompute", "reserve"])
@pytest.mark.parametrize("name,options", POLICIES)
def test_invariants_under_memory_pressure(name, options, policy):
    """Checks on: after every batch, blocks in use = Σ blocks of the running requests <= kv_blocks − 1,
    tokens conserved; drained, every request finishes (or is rejected, counted)."""
    requests = _requests(300, 14.0, 2)
    kv = KVCache(400, 16, policy)
    result = simulate(_engine(name, options, kv), requests, drain=True, method="reference")
    done = ~np.isnan(result.finish_time)
    assert np.all(done | result.rejected)
    assert result.kv.batch_blocks.max() <= kv.usable
    if policy == "reserve":
        assert result.kv.preemptions.sum() == 0 and result.kv.recomputed.sum() == 0
    # the first token is the end of the first prefill, never moved by a recompute
    assert np.all(result.first_token_time[done] <= result.finish_time[done])


def test_pressure_preempts_repeatedly_and_costs_recompute():
    requests = _requests(300, 14.0, 2)
    result = simulate(_engine("vllm-v1", {}, KVCache(400)), requests, drain=True, method="reference")
    kv = result.kv
    assert kv.preemptions.sum() > 100 and kv.preemptions.max() >= 3
    assert kv.recomputed.sum() == kv.batch_recomputed.sum() > 0
    # work done = each finished request's tokens + what was computed again
    done = ~np.isnan(result.finish_time)
    assert result.batch_tokens.sum() == (requests.num_prompt_tokens[done] + requests.num_output_tokens[done]).sum() \
        + kv.recomputed.sum()


def test_request_larger_than_cache_is_rejected_and_counted():
    requests = Requests(np.array([0.0, 0.1, 0.2]), np.array([10, 40, 10], dtype=np.int64),
                        np.array([5, 30, 5], dtype=np.int64))
    kv = KVCache(5, 16)   # 4 usable blocks: 64 tokens; the second request needs 70
    result = simulate(_engine("sarathi", {}, kv), requests, drain=True, method="reference")
    assert result.rejected.tolist() == [False, True, False]
    assert np.isnan(result.finish_time[1]) and not np.isnan(result.finish_time[[0, 2]]).any()


def test_summary_reports_memory():
    cfg = load_config(None, ["engine.kv_blocks=1500", "run.horizon_s=120"])
    kv = run_config(cfg).summary["kv"]
    assert kv["kv_blocks"] == 1500 and kv["usable_tokens"] == 1499 * 16
    assert 0 < kv["mean_utilisation"] <= kv["peak_utilisation"] <= 1
    assert kv["preemptions"] >= kv["preempted_requests"] > 0
    assert 0 < kv["recompute_share"] < 1
    off = run_config(load_config(None, ["run.horizon_s=120"])).summary
    assert "kv" not in off


@pytest.mark.parametrize("override,field", [
    ("engine.kv_blocks=0", "engine.kv_blocks"), ("engine.kv_blocks=-3", "engine.kv_blocks"),
    ("engine.kv_blocks=1", "engine.kv_blocks"), ("engine.kv_blocks=2.5", "engine.kv_blocks"),
    ("engine.kv_blocks='many'", "engine.kv_blocks"), ("engine.kv_blocks=true", "engine.kv_blocks"),
    ("engine.kv_blocks=1e30", "engine.kv_blocks"),
])
def test_bad_kv_blocks(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.field == field


@pytest.mark.parametrize("extra,field", [
    (["engine.block_size=0"], "engine.block_size"), (["engine.block_size=2.5"], "engine.block_size"),
    (["engine.block_size='16'"], "engine.block_size"), (["engine.block_size=100000"], "engine.block_size"),
    (["engine.kv_policy='swap'"], "engine.kv_policy"),
])
def test_bad_block_size_and_policy(extra, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["engine.kv_blocks=100", *extra])
    assert info.value.field == field
    assert "allowed" in str(info.value) or "expected" in str(info.value) or field in str(info.value)


def test_block_size_without_kv_blocks_is_an_error():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["engine.block_size=32"])
    assert info.value.field == "engine.block_size" and "kv_blocks" in str(info.value)


def test_cache_smaller_than_a_mean_request_is_an_error():
    with pytest.raises(ConfigError) as info:
        run_config(load_config(None, ["engine.kv_blocks=10", "run.horizon_s=10"]))
    assert info.value.field == "engine.kv_blocks" and "at least 17 blocks" in str(info.value)


needs_core = pytest.mark.skipif(fastcore.unavailable() is not None, reason=f"{fastcore.unavailable()}")


def _same(a, b) -> None:
    assert b.meta["method"] == "fast" and a.meta["method"].startswith("reference")
    assert np.array_equal(a.batch_tokens, b.batch_tokens)
    assert np.array_equal(a.batch_end_time, b.batch_end_time)
    assert np.array_equal(a.finish_time, b.finish_time, equal_nan=True)
    assert np.array_equal(a.first_token_time, b.first_token_time, equal_nan=True)
    assert np.array_equal(a.rejected, b.rejected)
    assert a.violations == b.violations and a.kv.memory_limited == b.kv.memory_limited
    for name in ("batch_start", "batch_blocks", "batch_recomputed", "preemptions", "recomputed"):
        assert np.array_equal(getattr(a.kv, name), getattr(b.kv, name)), name


@needs_core
@pytest.mark.parametrize("blocks,block_size", [(400, 16), (150, 4), (60, 16)])
@pytest.mark.parametrize("policy", ["recompute", "reserve"])
@pytest.mark.parametrize("name,options", POLICIES)
def test_compiled_core_runs_the_same_memory_rules(name, options, policy, blocks, block_size):
    """The compiled core interprets the same plans with the same KV rules: identical runs."""
    requests = _requests(300, 14.0, 2)
    ref = simulate(_engine(name, options, KVCache(blocks, block_size, policy), checks=False), requests,
                   drain=True, method="reference")
    fast = simulate(_engine(name, options, KVCache(blocks, block_size, policy), checks=False), requests,
                    drain=True, method="fast")
    _same(ref, fast)


@needs_core
def test_compiled_core_with_memory_by_horizon_and_records():
    requests = _requests(2000, 16.0, 5)
    kw = {"horizon_s": 60.0, "record_batches": True}
    ref = simulate(_engine("sarathi", {}, KVCache(700), checks=False), requests, method="reference", **kw)
    fast = simulate(_engine("sarathi", {}, KVCache(700), checks=False), requests, method="fast", **kw)
    _same(ref, fast)
    for key in ref.batches:
        assert np.array_equal(ref.batches[key], fast.batches[key]), key
