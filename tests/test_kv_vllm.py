"""The engine's KV rules against vLLM's, batch by batch (docs/memory.md).

``tests/vllm_oracle.py`` transcribes vLLM v1's ``Scheduler.schedule`` / ``allocate_slots`` /
``_preempt_request`` from its source, independently of the engine.  Here both run the same
generated workloads, with memory binding (hundreds of preemptions, requests preempted several
times, self-preemption), and every step must agree: the tokens scheduled per request, the
requests preempted and their order, the free blocks, and the running requests' order.

Our request (v_p, v_d) is vLLM's prompt of v_p tokens with ``max_tokens = v_d + 1`` (the batch that
finishes the prompt emits the first output token).
"""

from __future__ import annotations

import numpy as np
import pytest

from llmqueue.core.engine import Engine
from llmqueue.model.batch_time import make_batch_time
from llmqueue.model.kv import KVCache
from llmqueue.model.request import Request
from llmqueue.schedulers import make_scheduler
from llmqueue.schedulers.plan import Memory, running_list
from tests.vllm_oracle import VllmOracle

BATCH_TIME = make_batch_time({"model": "staircase", "c_ms": 11.28, "a_ms": 35.47, "b0": 128})


def _jobs(n: int, per_step: float, seed: int, prompt: int, output: int, longest: int):
    rng = np.random.default_rng(seed)
    steps = np.floor(np.cumsum(rng.exponential(1 / per_step, n))).astype(int)
    prompts = np.clip(rng.poisson(prompt, n), 1, None)
    outputs = rng.poisson(output, n)
    keep = prompts + outputs <= longest   # vLLM refuses what can never fit (max_model_len); so do we
    return [(i, int(s), int(p), int(o)) for i, (s, p, o) in enumerate(zip(steps[keep], prompts[keep], outputs[keep]))]


def _differential(jobs, *, blocks, block_size, budget, max_num_seqs, threshold, when_alone=False):
    kv = KVCache(blocks, block_size)
    options = {"max_num_seqs": max_num_seqs, "long_prefill_token_threshold": threshold,
               "long_prefill_threshold_when_alone": when_alone}
    engine = Engine(make_scheduler("vllm-v1", **options), budget, BATCH_TIME, kv=kv, checks=True)
    oracle = VllmOracle(num_gpu_blocks=blocks, block_size=block_size, max_num_batched_tokens=budget,
                        max_num_seqs=max_num_seqs, long_prefill_token_threshold=threshold,
                        threshold_when_alone=when_alone)
    j, step, steps, preempted, again = 0, 0, 0, 0, 0
    while j < len(jobs) or engine.has_work:
        while j < len(jobs) and jobs[j][1] <= step:
            rid, at, prompt, output = jobs[j]
            assert engine.admit(Request(rid, float(at), prompt, output))
            oracle.add_request(rid, prompt, output + 1)
            j += 1
        if not engine.has_work:
            step = jobs[j][1]
            continue
        record = oracle.schedule()
        victims = list(record.preempted)
        while not record.scheduled and victims:   # everyone preempted: vLLM's next step plans again
            oracle.update_from_output(record)
            record = oracle.schedule()
            victims += record.preempted
            again += 1
        s = engine.step(float(step))
        plan = s.plan
        ours = {r.rid: n for r, n in plan.prefill} | {r.rid: 1 for r in plan.decode}
        theirs = dict(record.scheduled)
        assert ours == theirs, f"step {step}: scheduled tokens differ"
        assert [r.rid for r in plan.preempted] == victims[len(victims) - len(plan.preempted):], f"step {step}"
        assert kv.usable - engine.kv_series[-1] == record.free_blocks, f"step {step}: free blocks differ"
        finished = oracle.update_from_output(record)
        assert sorted(r.rid for r in s.finished) == sorted(finished), f"step {step}: finished differ"
        assert [r.rid for r in running_list(engine.state)] == [rid for rid in record.running if rid not in finished]
        preempted += len(victims)
        steps += 1
        step += 1
    assert not oracle.has_unfinished()
    return steps, preempted, again, oracle


CASES = [   # (blocks, block_size, budget, max_num_seqs, threshold, per_step, prompt, output)
    (120, 16, 512, 256, 0, 0.6, 129, 112),
    (120, 16, 512, 256, 64, 0.6, 129, 112),
    (300, 4, 256, 16, 0, 0.5, 60, 90),
    (60, 16, 128, 256, 32, 0.4, 100, 60),
    (18, 8, 64, 3, 0, 0.3, 20, 40),
]


@pytest.fixture
def self_preemptions(monkeypatch):
    """Counts the requests that preempt themselves (Memory.grow returns False)."""
    count = [0]
    grow = Memory.grow

    def counting(mem, request, n):
        ok = grow(mem, request, n)
        count[0] += not ok
        return ok

    monkeypatch.setattr(Memory, "grow", counting)
    return count


@pytest.mark.parametrize("case", CASES)
def test_engine_matches_vllm_batch_by_batch(case, self_preemptions):
    blocks, bs, budget, seqs, threshold, rate, prompt, output = case
    jobs = _jobs(300, rate, 7, prompt, output, (blocks - 1) * bs)
    steps, preempted, again, oracle = _differential(jobs, blocks=blocks, block_size=bs, budget=budget,
                                                    max_num_seqs=seqs, threshold=threshold)
    counts = [r.num_preemptions for r in oracle.requests.values()]
    assert preempted >= 100 and max(counts) >= 2, (steps, preempted)
    assert self_preemptions[0] >= 1


@pytest.mark.parametrize("when_alone", [False, True], ids=["vllm>=0.32", "vllm<0.32"])
def test_the_threshold_and_a_lone_request_as_vllm(when_alone):
    # Sparse arrivals (often one request in the engine) and a threshold well under the prompts: vLLM's
    # rule for a lone request decides many chunks, under either version of it (the oracle's D11).
    jobs = _jobs(200, 0.02, 3, 200, 20, 10_000)
    steps, _, _, oracle = _differential(jobs, blocks=2000, block_size=16, budget=256, max_num_seqs=256,
                                        threshold=32, when_alone=when_alone)
    alone = _differential(jobs, blocks=2000, block_size=16, budget=256, max_num_seqs=256, threshold=32,
                          when_alone=not when_alone)[0]
    assert steps != alone   # the two rules give different runs on this workload


def test_small_cache_preempts_and_self_preempts(self_preemptions):
    """Three requests of 100 tokens in a cache of 7 blocks (112 tokens): they take turns, with
    preemptions of the tail and a request preempting itself."""
    jobs = [(0, 0, 40, 60), (1, 0, 40, 60), (2, 1, 40, 60)]
    _, preempted, again, oracle = _differential(jobs, blocks=8, block_size=16, budget=64, max_num_seqs=8,
                                                threshold=0)
    assert preempted >= 2 and self_preemptions[0] >= 1


# ---- automatic prefix caching (docs/prefix_caching.md) -------------------------------------------

def _shared_jobs(n: int, per_step: float, seed: int, prompt: int, output: int, longest: int, tokens: int,
                 groups: int):
    """Jobs whose prompts start with one of ``groups`` system prompts of ``tokens`` tokens (rid, step,
    prompt, output, group)."""
    rng = np.random.default_rng(seed)
    jobs = _jobs(n, per_step, seed, prompt, output, longest)
    group = rng.integers(0, groups, len(jobs))
    return [(*job, int(g)) for job, g in zip(jobs, group)]


def _prompt_tokens(rid: int, prompt: int, group: int, tokens: int) -> list[int]:
    """Real token ids for the oracle: the group's system prompt, then tokens of this request only."""
    shared = min(tokens, prompt)
    return [group * 1_000_000 + j for j in range(shared)] + [(rid + 1) * 1_000_000_000 + j
                                                               for j in range(prompt - shared)]


def _differential_prefix(jobs, *, blocks, block_size, budget, max_num_seqs, threshold, tokens):
    from tests.vllm_oracle import VllmPrefixOracle

    kv = KVCache(blocks, block_size, prefix_caching=True)
    options = {"max_num_seqs": max_num_seqs, "long_prefill_token_threshold": threshold}
    engine = Engine(make_scheduler("vllm-v1", **options), budget, BATCH_TIME, kv=kv, checks=True)
    pool = engine.pool
    oracle = VllmPrefixOracle(num_gpu_blocks=blocks, block_size=block_size, max_num_batched_tokens=budget,
                              max_num_seqs=max_num_seqs, long_prefill_token_threshold=threshold)
    requests = {}
    j, step, preempted, evicted_steps = 0, 0, 0, 0
    while j < len(jobs) or engine.has_work:
        while j < len(jobs) and jobs[j][1] <= step:
            rid, at, prompt, output, group = jobs[j]
            request = Request(rid, float(at), prompt, output)
            request.content = ((("system", group), min(tokens, prompt)),)
            requests[rid] = request
            assert engine.admit(request)
            oracle.add_request(rid, _prompt_tokens(rid, prompt, group, tokens), output + 1)
            j += 1
        if not engine.has_work:
            step = jobs[j][1]
            continue
        record = oracle.schedule()
        victims = list(record.preempted)
        while not record.scheduled and victims:
            oracle.update_from_output(record)
            record = oracle.schedule()
            victims += record.preempted
        before = pool.evictions
        s = engine.step(float(step))
        plan = s.plan
        ours = {r.rid: n for r, n in plan.prefill} | {r.rid: 1 for r in plan.decode}
        assert ours == dict(record.scheduled), f"step {step}: scheduled tokens differ"
        assert [r.rid for r in plan.preempted] == victims[len(victims) - len(plan.preempted):], f"step {step}"
        assert kv.usable - engine.kv_series[-1] == record.free_blocks, f"step {step}: free blocks differ"
        finished = oracle.update_from_output(record)
        oracle.check_invariants()
        assert sorted(r.rid for r in s.finished) == sorted(finished), f"step {step}: finished differ"
        assert pool.free == oracle.free_blocks(), f"step {step}: free blocks after the step differ"
        assert len(pool.lru) == oracle.cached_free_blocks(), f"step {step}: cached free blocks differ"
        assert pool.evictions == oracle.evictions, f"step {step}: evictions differ"
        assert [r.rid for r in running_list(engine.state)] == [rid for rid in record.running if rid not in finished]
        evicted_steps += pool.evictions > before
        preempted += len(victims)
        step += 1
    assert not oracle.has_unfinished()
    for rid, request in requests.items():
        assert request.hit == sum(oracle.hits_per_request[rid]), f"request {rid}: hit tokens differ"
    stats = pool.stats()
    assert {k: stats[k] for k in oracle.stats} == oracle.stats
    return preempted, evicted_steps, stats, oracle


PREFIX_CASES = [   # (blocks, block_size, budget, max_num_seqs, threshold, per_step, prompt, output, tokens, groups)
    (120, 16, 512, 256, 0, 0.6, 129, 112, 100, 3),
    (120, 16, 512, 256, 64, 0.6, 129, 112, 64, 2),
    (300, 4, 256, 16, 0, 0.5, 60, 90, 40, 4),
    (60, 16, 128, 256, 32, 0.4, 100, 60, 80, 1),
    (30, 8, 64, 4, 0, 0.3, 40, 60, 33, 2),
]


@pytest.mark.parametrize("case", PREFIX_CASES)
def test_prefix_caching_matches_vllm_batch_by_batch(case):
    """With shared system prompts and memory binding: the same tokens scheduled per request, hits per
    request, preemptions in order, free and cached free blocks, evictions, and vLLM's hit counters."""
    blocks, bs, budget, seqs, threshold, rate, prompt, output, tokens, groups = case
    jobs = _shared_jobs(250, rate, 11, prompt, output, (blocks - 1) * bs, tokens, groups)
    preempted, evicted_steps, stats, oracle = _differential_prefix(
        jobs, blocks=blocks, block_size=bs, budget=budget, max_num_seqs=seqs, threshold=threshold, tokens=tokens)
    assert stats["hits"] > 0 and stats["evictions"] > 0 and evicted_steps > 0, stats
    assert preempted >= 20 and stats["preempted_hits"] > 0, (preempted, stats)
