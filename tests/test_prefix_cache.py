"""Automatic prefix caching on one engine (docs/prefix_caching.md): off is unchanged, a run without
shared content is the run without caching, shared system prompts hit, a preempted request finds
its own blocks again, the invariants hold, bad input is refused, and the closed form of
analysis/prefix.py agrees with simulation.  (Batch-by-batch agreement with vLLM's rules:
tests/test_kv_vllm.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from llmqueue.analysis.prefix import expected_hit, first_of_group, hit_tokens, prefix_capacity
from llmqueue.config import parse_config
from llmqueue.core import fastcore
from llmqueue.core.engine import Engine
from llmqueue.core.simulator import simulate
from llmqueue.errors import ConfigError, InternalError
from llmqueue.metrics import kv_summary
from llmqueue.model.batch_time import make_batch_time
from llmqueue.model.kv import KVCache, block_key, check_content, make_kv, own_key
from llmqueue.model.request import Request
from llmqueue.model.workload import PoissonArrivals, Requests, SharedPrefix, Workload, make_length, make_shared_prefix
from llmqueue.schedulers import make_scheduler

BT = make_batch_time({"model": "staircase", "c_ms": 11.28, "a_ms": 35.47, "b0": 128})
PROMPT = make_length({"dist": "uniform", "low": 300, "high": 900}, field="prompt", minimum=1)
OUTPUT = make_length({"dist": "geometric", "mean": 50}, field="output", minimum=0)
FIXED = make_length({"dist": "fixed", "value": 600}, field="prompt", minimum=1)


def _run(requests, blocks, *, prefix, scheduler="vllm-v1", checks=None, **kw):
    engine = Engine(make_scheduler(scheduler), 512, BT, kv=KVCache(blocks, 16, prefix_caching=prefix),
                    checks=checks)
    return engine, simulate(engine, requests, **kw)


def _same(a, b):
    np.testing.assert_array_equal(a.first_token_time, b.first_token_time)
    np.testing.assert_array_equal(a.finish_time, b.finish_time)
    np.testing.assert_array_equal(a.batch_tokens, b.batch_tokens)
    np.testing.assert_array_equal(a.kv.batch_blocks, b.kv.batch_blocks)
    np.testing.assert_array_equal(a.kv.preemptions, b.kv.preemptions)


def test_off_ignores_content_and_leaves_the_stream_unchanged():
    plain = Workload(PoissonArrivals(4.0), PROMPT, OUTPUT).generate(5, num_requests=300)
    shared = Workload(PoissonArrivals(4.0), PROMPT, OUTPUT, SharedPrefix(256, 3)).generate(5, num_requests=300)
    for name in ("arrival_time", "num_prompt_tokens", "num_output_tokens"):   # the fourth stream only
        np.testing.assert_array_equal(getattr(plain, name), getattr(shared, name))
    assert plain.content is None and len(shared.content) == 300
    assert shared.content[0] == ((("system", int(shared.content.group[0])), 256),)
    _, a = _run(plain, 300, prefix=False)
    _, b = _run(shared, 300, prefix=False)
    _same(a, b)
    assert a.kv.hit_tokens is None and "prefix_caching" not in kv_summary(a)
    engine = Engine(make_scheduler("vllm-v1"), 512, BT, kv=KVCache(300, 16))
    assert simulate(engine, plain).meta["core"] == "compiled"   # off: the compiled core as before


def test_no_shared_content_is_prefix_caching_off():
    """Without content nothing is shared; with memory that never preempts the run is identical."""
    requests = Workload(PoissonArrivals(4.0), PROMPT, OUTPUT).generate(2, num_requests=200)
    _, off = _run(requests, 5000, prefix=False)
    engine, on = _run(requests, 5000, prefix=True)
    assert not off.kv.preemptions.any()
    _same(off, on)
    assert on.kv.prefix["hits"] == 0 and not on.kv.hit_tokens.any()
    assert on.meta["method"] == "reference (prefix caching runs on the reference interpreter)"
    assert fastcore.reason(Engine(make_scheduler("vllm-v1"), 512, BT, kv=KVCache(50, 16, prefix_caching=True))) \
        == "prefix caching runs on the reference interpreter"


def test_shared_prefix_hits_and_saves_prefill():
    w = Workload(PoissonArrivals(4.0), FIXED, OUTPUT, SharedPrefix(512, 4))
    requests = w.generate(1, num_requests=300)
    engine, r = _run(requests, 2000, prefix=True, drain=True)
    off = simulate(Engine(make_scheduler("vllm-v1"), 512, BT, kv=KVCache(2000, 16)), requests, drain=True)
    hits = r.kv.hit_tokens
    assert set(np.unique(hits)) <= {0, 512}          # ⌊min(512, 599)/16⌋·16 whole, or a cold miss
    misses = int(np.count_nonzero(hits == 0))
    assert 4 <= misses <= 12, misses                 # the first of each group (+ a few while it prefills)
    s = kv_summary(r)["prefix_caching"]
    assert s["queries"] == 300 * 600 and s["hits"] == int(hits.sum()) == s["saved_prefill_tokens"]
    assert s["hit_rate"] == pytest.approx(s["hits"] / s["queries"])
    work_off, work_on = int(off.batch_tokens.sum()), int(r.batch_tokens.sum())
    assert work_off - work_on == s["saved_prefill_tokens"]     # the cached tokens are in no batch
    assert s["saved_share"] == pytest.approx(s["saved_prefill_tokens"] / work_off)
    assert np.nanmean(r.finish_time - r.arrival_time) < np.nanmean(off.finish_time - off.arrival_time)


def test_preempted_request_hits_its_own_blocks():
    """Two requests with no shared content in 8 usable blocks: the later one is preempted, its full
    blocks stay cached, freed tail first, so the tail is evicted first and when it is admitted again
    it finds its head."""
    requests = Requests(np.array([0.0, 0.0]), np.array([40, 40]), np.array([60, 60]))
    engine, r = _run(requests, 9, prefix=True, checks=True, drain=True)
    assert r.kv.preemptions[1] >= 1
    assert r.kv.hit_tokens[1] > 0 and r.kv.prefix["preempted_hits"] == r.kv.hit_tokens.sum()
    assert r.kv.prefix["hits"] == 0          # new requests share nothing
    assert r.kv.hit_tokens[1] == 16 and r.kv.prefix["evictions"] > 0
    assert np.all(np.isfinite(r.finish_time))


@pytest.mark.parametrize("scheduler", ["vllm-v1", "sarathi", "vllm", "orca"])
def test_invariants_under_memory_pressure(scheduler):
    """Engine.check after every batch (as LLMQUEUE_CHECKS=1): blocks held by running requests (a
    shared one counted once) + cached free + fresh = kv_blocks − 1, ref counts = holders, no
    request loses tokens; with sharing, preemptions and evictions."""
    w = Workload(PoissonArrivals(6.0), PROMPT, OUTPUT, SharedPrefix(300, 3))
    requests = w.generate(4, num_requests=250)
    engine, r = _run(requests, 200, prefix=True, scheduler=scheduler, checks=True, drain=True)
    assert np.all(np.isfinite(r.finish_time) | r.rejected)
    assert r.kv.prefix["evictions"] > 0 and r.kv.prefix["hits"] > 0
    assert engine.pool.in_use == 0 and engine.pool.free == 199
    pool = engine.pool
    block = next(iter(pool.lru.values()))
    block.ref = 1                               # corrupt it: the check must notice
    with pytest.raises(InternalError):
        pool.check([])


def test_block_keys_follow_the_spans():
    a, b, c = Request(0, 0.0, 100, 5), Request(1, 0.0, 60, 5), Request(2, 0.0, 100, 5)
    a.content = (("S", 100),)
    b.content = (("S", 50), ("T", 10))
    c.content = None
    assert block_key(a, 2, 16) == block_key(b, 2, 16) == (("S", 48),)    # first 48 tokens agree
    assert block_key(a, 3, 16) != block_key(b, 3, 16)                    # 50..63 differ
    assert block_key(a, 6, 16) == (("S", 100), (own_key(a), 12))        # its own tokens after
    assert block_key(c, 0, 16) != block_key(Request(3, 0.0, 100, 5), 0, 16)
    prev = Request(4, 0.0, 100, 5)               # 90 shared tokens, 10 own + 5 output tokens
    prev.content = (("S", 90),)
    nxt = Request(9, 0.0, 200, 5)                # an agent's next hop: the whole previous sequence
    nxt.content = (*prev.content, (own_key(prev), 15))
    assert block_key(nxt, 5, 16) == block_key(prev, 5, 16) == (("S", 90), (own_key(prev), 6))
    assert block_key(nxt, 6, 16) != block_key(prev, 6, 16)    # past prev's 105 tokens: nxt's own
    assert check_content((("S", 3),), 10) == (("S", 3),)


@pytest.mark.parametrize("engine, match", [
    ({"prefix_caching": True}, "kv_blocks"),
    ({"kv_blocks": 100, "prefix_caching": True, "kv_policy": "reserve"}, "recompute"),
    ({"kv_blocks": 100, "prefix_caching": "yes"}, "true or false"),
])
def test_bad_engine_options(engine, match):
    with pytest.raises(ConfigError, match=match):
        make_kv(engine)
    assert make_kv({"prefix_caching": False}) is None


@pytest.mark.parametrize("spec, match", [
    ({"tokens": 0, "groups": 2}, "tokens"),
    ({"tokens": 10}, "groups"),
    ({"tokens": 10, "groups": 2, "share": 1}, "share"),
    (5, "a table"),
])
def test_bad_shared_prefix(spec, match):
    with pytest.raises(ConfigError, match=match):
        make_shared_prefix(spec)
    with pytest.raises(ConfigError, match=match):
        parse_config({"workload": {"shared_prefix": spec}})


def test_config_keys_and_bad_content():
    config = parse_config({"engine": {"kv_blocks": 500, "prefix_caching": True},
                           "workload": {"shared_prefix": {"tokens": 64, "groups": 2}}})
    assert config.engine["prefix_caching"] is True and make_kv(config.engine).prefix_caching
    for bad in ((("S", 0),), [("S", 3)], (("S", 20),)):
        with pytest.raises(ConfigError):
            check_content(bad, 10)


def test_expected_hit_and_capacity_against_simulation():
    """E[h] = B·Σ_j P(l ≥ jB + 1) and λ* = (b_max/t_{b_max})/(m_p + m_d − E[h]) against a run at 1.3×
    the λ* without caching (so 0.36× the λ* with it): memory ample, so only cold misses lower the
    hits.  Tolerances: the sampling error of the mean hit (4 standard errors) plus the cold misses
    (≤ 3 requests per group missing at most N tokens); the served computed tokens per second equal
    λ·(m_p + m_d − E[h]) up to the run's own sampling of arrivals and lengths (5 %)."""
    tokens, groups, n = 512, 4, 1500
    eh = expected_hit(PROMPT, tokens, 16)
    lengths = np.arange(300, 901)
    assert eh == pytest.approx(np.mean([hit_tokens(int(l), tokens, 16) for l in lengths]))
    cap = prefix_capacity(BT, 512, PROMPT.mean, OUTPUT.mean, eh)
    rate = 1.3 * cap.max_stable_rate_rps
    assert rate < cap.max_stable_rate_prefix_rps
    requests = Workload(PoissonArrivals(rate), PROMPT, OUTPUT, SharedPrefix(tokens, groups)).generate(3, num_requests=n)
    engine, r = _run(requests, 20000, prefix=True)
    hits = r.kv.hit_tokens
    best = (np.minimum(tokens, requests.num_prompt_tokens - 1) // 16) * 16
    assert np.all(hits <= best)
    sd = float(np.std(best))
    tolerance = 4 * sd / np.sqrt(n) + 3 * groups * tokens / n
    assert abs(hits.mean() - eh) <= tolerance, (hits.mean(), eh, tolerance)
    assert first_of_group(groups, n) == pytest.approx(groups)
    served = r.batch_tokens.sum() / r.end_time                  # computed tokens per second
    offered = rate * (requests.num_prompt_tokens.mean() + requests.num_output_tokens.mean() - hits.mean())
    assert served == pytest.approx(offered, rel=0.05)
    off = simulate(Engine(make_scheduler("vllm-v1"), 512, BT, kv=KVCache(20000, 16)), requests)
    assert np.isnan(off.finish_time).sum() > 10 * max(1, np.isnan(r.finish_time).sum())   # off is overloaded


def test_stepper_with_content_matches_simulate(monkeypatch):
    """A stepped run (the agent networks' engine interface) given the same content runs the same
    batches as simulate; also under LLMQUEUE_CHECKS (the engine's CHECKS default)."""
    from llmqueue.core import engine as engine_module
    from llmqueue.core.stepper import Stepper

    monkeypatch.setattr(engine_module, "CHECKS", True)
    requests = Workload(PoissonArrivals(6.0), PROMPT, OUTPUT, SharedPrefix(256, 2)).generate(8, num_requests=150)
    engine, r = _run(requests, 300, prefix=True, drain=True)
    assert engine.checks
    stepper = Stepper(Engine(make_scheduler("vllm-v1"), 512, BT, kv=KVCache(300, 16, prefix_caching=True)))
    assert stepper.method == "reference (prefix caching runs on the reference interpreter)"
    content = [requests.content[i] for i in range(len(requests))]
    stepper.admit(requests.arrival_time, requests.num_prompt_tokens, requests.num_output_tokens, content)
    done = stepper.advance(float("inf"))
    np.testing.assert_array_equal(done.finish_time, r.finish_time[done.finished])
    assert len(done.finished) == len(requests) and stepper.engine.pool.hits == r.kv.prefix["hits"] > 0
    with pytest.raises(ConfigError, match="prefix_caching"):
        Stepper(Engine(make_scheduler("vllm-v1"), 512, BT, kv=KVCache(300, 16))).admit([0.0], [10], [1], [None])


def test_trace_with_shared_prefix():
    from llmqueue.model.workload import Trace

    base = Requests(np.array([0.0, 0.5, 1.0, 1.5]), np.array([100, 200, 50, 300]), np.array([5, 5, 5, 5]))
    trace = Trace(base, "t.csv", "vidur", 4, 0, 0, 0, 0)
    requests = Workload(trace, shared_prefix={"tokens": 64, "groups": 1}).generate(0)
    assert [requests.content[i] for i in range(4)] == [((("system", 0), n),) for n in (64, 64, 50, 64)]
    engine, r = _run(requests, 100, prefix=True, drain=True)
    assert list(r.kv.hit_tokens) == [0, 64, 48, 64]   # ⌊min(64, l − 1)/16⌋·16 for l = 200, 50, 300


def test_eviction_takes_fresh_blocks_first_then_the_tail():
    """The engine on the oracle's hand-checked case (tests/test_vllm_oracle.py): 5 usable blocks of 4;
    the second request evicts the tail of the first one's cached prompt, so the third finds one block."""
    same = Requests(np.array([0.0, 1.0, 2.0]), np.array([10, 13, 10]), np.array([0, 0, 0]),
                    [(("P", 10),), None, (("P", 10),)])
    engine = Engine(make_scheduler("vllm-v1"), 64, BT, kv=KVCache(6, 4, prefix_caching=True), checks=True)
    r = simulate(engine, same, drain=True)
    assert list(r.kv.hit_tokens) == [0, 0, 4] and r.kv.prefix["evictions"] == 2   # 1 by each later request
