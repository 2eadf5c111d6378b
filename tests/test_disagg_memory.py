"""Decode admission under the decode replica's KV memory (prefill/decode disaggregation, docs/cluster.md):
requests admitted with computed context hold its blocks from admission, wait (FCFS) while blocks for their
whole sequence are short, recompute their whole context after a preemption; a P/D run with ample memory is
exactly the run without memory, tight memory slows decoding; bad input names the key."""

from __future__ import annotations

import numpy as np
import pytest

from llmqueue.config import parse_config
from llmqueue.core.stepper import Stepper
from llmqueue.errors import ConfigError
from llmqueue.model.request import Request
from llmqueue.runner import build_engine
from llmqueue.schedulers.plan import seq_len

STAIRCASE = {"model": "staircase", "c_ms": 11.28, "a_ms": 35.47, "b0": 128}


def engine(scheduler="vllm-v1", budget=64, blocks=40, block_size=4, policy="recompute"):
    e = build_engine(parse_config({"engine": {"scheduler": scheduler, "token_budget": budget, "kv_blocks": blocks,
                                              "block_size": block_size, "kv_policy": policy,
                                              "batch_time": STAIRCASE}}))
    e.checks = True
    return e


def workload(seed, n=60):
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0.0, 3.0, n))
    prompts = rng.integers(2, 40, n)
    outputs = rng.integers(0, 25, n)
    computed = rng.integers(0, prompts)           # 0 .. prompt − 1 tokens arrive computed
    return times, prompts, outputs, computed


def growth(e) -> int:
    """Blocks the running requests take in the next batch at most (the admission's headroom)."""
    kv, state = e.kv, e.state
    need = sum(1 for r in state.decoding if seq_len(r) % kv.block_size == 0)
    for r in state.prefilling:
        if r.prefill_left == seq_len(r):
            break
        done = seq_len(r) - r.prefill_left
        need += kv.blocks_for(done + min(r.prefill_left, e.token_budget)) - kv.blocks_for(done)
    return need


@pytest.mark.parametrize("scheduler", ["vllm-v1", "sarathi", "orca"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocks_per_batch_and_admission_follow_the_rule(scheduler, seed):
    e = engine(scheduler)
    kv = e.kv
    times, prompts, outputs, computed = workload(seed)
    requests = [Request(i, float(t), int(p), int(o)) for i, (t, p, o) in enumerate(zip(times, prompts, outputs))]
    context = dict(enumerate(computed.tolist()))
    now, i, admitted_order, waited = 0.0, 0, [], 0
    done: list[Request] = []
    while i < len(requests) or e.has_work:
        while i < len(requests) and requests[i].arrival_time <= now:
            assert e.admit(requests[i], context[i])
            i += 1
        if not e.has_work:
            now = requests[i].arrival_time
            continue
        free = kv.usable - e.state.kv_used - (growth(e) if e.state.kv_used else 0)
        head = e.awaiting[0] if e.awaiting else None
        before = {id(r) for r in e.awaiting}
        step = e.step(now)
        now = step.end_time
        started = [r for r in before if r not in {id(x) for x in e.awaiting}]
        admitted_order += sorted((r for r in requests if id(r) in set(started)), key=lambda r: r.stamp)
        if head is not None and head in e.awaiting:   # the head waits only when its sequence does not fit
            waited += 1
            assert kv.blocks_for(seq_len(head)) > free
        elif head is not None:
            assert kv.blocks_for(seq_len(head)) <= free
        # blocks in use after the batch's allocation = Σ ⌈(context + computed) / B⌉ over the requests holding
        # blocks, the finished ones included (freed after the batch)
        holding = list(e.state.prefilling) + e.state.decoding
        held = sum(kv.blocks_for(seq_len(r) - r.prefill_left) for r in holding)
        assert e.state.kv_used == held
        assert e.kv_series[-1] == held + sum(kv.blocks_for(r.num_prompt_tokens + r.num_output_tokens)
                                             for r in step.finished)
        assert e.kv_series[-1] <= kv.usable
        done += step.finished
    assert len(done) == len(requests) and waited > 0
    assert [r.rid for r in admitted_order] == sorted(r.rid for r in admitted_order)   # first come first served
    preempted = [r for r in done if r.preemptions]
    assert preempted and e.preemptions > 0
    for r in preempted:   # a preempted request recomputes its whole context, prompt included
        assert r.recomputed >= context[r.rid]
    assert max(e.kv_series) <= kv.usable


def test_reserve_takes_the_whole_request_at_admission():
    e = engine(policy="reserve", blocks=30)
    times, prompts, outputs, computed = workload(4, 40)
    s = Stepper(e)
    s.admit(times, prompts, outputs, computed=computed)
    a = s.advance(np.inf)
    assert len(a.finished) == 40 and e.preemptions == 0 and max(e.kv_series) <= e.kv.usable


def test_stepper_cuts_and_zero_context_are_exact():
    times, prompts, outputs, computed = workload(5)

    def run(cuts, context):
        s = Stepper(engine())
        s.admit(times, prompts, outputs, computed=context)
        parts = [s.advance(t) for t in cuts]
        return (np.concatenate([p.finished for p in parts]), np.concatenate([p.finish_time for p in parts]),
                np.concatenate([p.batch_end_time for p in parts]))

    whole = run([np.inf], computed)
    cut = run([0.4, 0.41, 1.3, 2.0, np.inf], computed)
    for x, y in zip(whole, cut):
        np.testing.assert_array_equal(np.sort(x), np.sort(y))
    plain = Stepper(engine())
    plain.admit(times, prompts, outputs)
    a = plain.advance(np.inf)
    zero = run([np.inf], np.zeros(len(times), np.int64))
    np.testing.assert_array_equal(a.finish_time, zero[1])
    np.testing.assert_array_equal(a.batch_end_time, zero[2])


@pytest.mark.parametrize("kwargs, allowed", [
    ({"computed": [1, 2]}, "one count per request"),
    ({"computed": [5, 0, 0]}, "integers from 0 to the prompt's length − 1"),
    ({"computed": [-1, 0, 0]}, "integers from 0"),
])
def test_bad_computed_context_names_the_argument(kwargs, allowed):
    s = Stepper(engine())
    with pytest.raises(ConfigError) as exc:
        s.admit([0.0, 0.1, 0.2], [5, 6, 7], [1, 1, 1], **kwargs)
    assert exc.value.field == "admit.computed" and allowed in str(exc.value)


def test_computed_context_needs_memory():
    e = build_engine(parse_config({"engine": {"scheduler": "sarathi", "token_budget": 64,
                                              "batch_time": STAIRCASE}}))
    with pytest.raises(ConfigError, match="an engine with kv_blocks"):
        Stepper(e).admit([0.0], [5], [1], computed=[3])


# ---- prefill/decode disaggregation --------------------------------------------------------------

def pd(decode, router="round-robin", horizon=20.0, rate=72.6, prefill=4):
    from llmqueue.cluster.disagg import parse_disagg

    return parse_disagg({"engine": {"scheduler": "sarathi", "token_budget": 512},
                         "workload": {"arrival": "poisson", "rate": rate}, "run": {"horizon_s": horizon, "seed": 0},
                         "cluster": {"transfer_s": 0.01, "prefill": {"replicas": prefill, "router": "jsq"},
                                     "decode": {"replicas": decode, "router": router}}})


@pytest.mark.parametrize("router", ["round-robin", "jsq"])
def test_ample_decode_memory_is_exactly_no_memory(router):
    from llmqueue.cluster.disagg import run_disagg

    plain = run_disagg(pd(4, router))
    ample = run_disagg(pd([{"count": 4, "kv_blocks": 100_000}], router))
    np.testing.assert_array_equal(plain.finish_time, ample.finish_time)
    np.testing.assert_array_equal(plain.first_token_time, ample.first_token_time)
    for key in ("tpot_s", "e2e_s", "ttft_s", "completed", "verdict"):
        assert plain.summary[key] == ample.summary[key]
    for key in ("verdict", "completed", "token_throughput", "throughput_rps", "tbt_s"):
        assert plain.summary["decode"]["pool"][key] == ample.summary["decode"]["pool"][key]
    kv = ample.summary["decode_kv"]
    assert kv["preemptions"] == 0 and 0 < kv["peak_utilisation"] < 0.1


def test_tight_decode_memory_slows_decoding():
    from llmqueue.cluster.disagg import run_disagg

    plain = run_disagg(pd(4)).summary
    tight = run_disagg(pd([{"count": 4, "kv_blocks": 700}])).summary
    assert tight["tpot_s"]["mean"] > 1.1 * plain["tpot_s"]["mean"]
    assert tight["completed"] < plain["completed"]
    assert tight["decode"]["pool"]["token_throughput"] < plain["decode"]["pool"]["token_throughput"]
    assert tight["decode_kv"]["preemptions"] > 0 and tight["decode_kv"]["memory_limited_batches"] > 0
    assert tight["decode_kv"]["peak_utilisation"] <= 1.0
    assert all(r["summary"]["kv"]["kv_blocks"] == 700 for r in tight["decode"]["replicas"])
    # memory leaves Theorem 2 an upper bound: below it nothing is predicted (pool and replicas)
    assert plain["decode"]["pool"]["predicted"] == "stable"
    assert tight["decode"]["pool"]["predicted"] == "not predicted"
    assert {r["summary"]["predicted"] for r in tight["decode"]["replicas"]} == {"not predicted (memory)"}


def test_decode_memory_too_small_for_the_longest_request_names_the_key():
    from llmqueue.cluster.disagg import run_disagg

    cfg = pd([{"count": 2, "kv_blocks": 12}, {"count": 2}], horizon=2.0)
    with pytest.raises(ConfigError) as exc:
        run_disagg(cfg)
    assert exc.value.field == "cluster.decode.replicas[0].kv_blocks"
    assert "at least" in str(exc.value) and "longest" in str(exc.value) and "\n" not in str(exc.value)


def test_prefill_memory_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as exc:
        pd(4, prefill=[{"count": 4, "kv_blocks": 1000}])
    assert exc.value.field == "cluster.prefill.replicas" and "without engine.kv_blocks" in str(exc.value)
