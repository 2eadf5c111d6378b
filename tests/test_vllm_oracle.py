"""Hand-worked checks of tests/vllm_oracle.py, the transcription of vLLM v1's scheduling + KV rules.

Every expected value below is derived on paper from the vLLM source (see the oracle's docstring for
files and commits); the derivation is in the comment above each assertion block.  Notation: bs =
block_size, N = num_gpu_blocks (N - 1 usable: block 0 is the null block), "need" = blocks to allocate
= cdiv(computed + n, bs) - held, "gate" = the full-sequence check cdiv(num_tokens, bs) <= free.
"""

from __future__ import annotations

import random

import pytest
from vllm_oracle import FINISHED, PREEMPTED, StepRecord, VllmOracle, cdiv, run


def engine(blocks: int, bs: int, budget: int = 100, seqs: int = 8, **extra) -> dict:
    """VllmOracle / run() keyword arguments."""
    return dict(num_gpu_blocks=blocks, block_size=bs, max_num_batched_tokens=budget, max_num_seqs=seqs, **extra)


def sched(trace):
    return [r.scheduled for r in trace]


def step(oracle: VllmOracle) -> tuple[StepRecord, list[int]]:
    rec = oracle.schedule()
    fin = oracle.update_from_output(rec)
    oracle.check_invariants()
    return rec, fin


# ---------------------------------------------------------------- (1) no memory pressure
def test_chunked_prefill_and_budget_cut():
    # N=1000, bs=16, budget 10.  A: prompt 25, max 3; B: prompt 4, max 2; both at step 0.
    # s0: waiting A: n=25 -> min(25, budget 10) = 10 (gate cdiv(25,16)=2 <= 999); budget 0 ends the
    #     scan (B not looked at).  A computed 10 < 25: the runner discards its token.  free 999-1.
    # s1: running A: n=15 -> 10; budget 0 -> no waiting scan.  computed 20 (2 blocks): free 997.
    # s2: A: n=5; budget 5: B: n=4 <= 5 -> B:4.  A reaches 25 = num_tokens -> token 1; B 4 -> token 1.
    #     A 2 blocks + B 1 block: free 996.
    # s3: A:1 (26 tokens, 2 blocks), B:1 (5, 1 block) -> B has 2 = max_tokens: finishes, frees 1.
    #     free right after schedule 996.
    # s4: A:1 -> 3 outputs: finishes.  free after schedule 997.
    t = run([(0, 0, 25, 3), (1, 0, 4, 2)], **engine(1000, 16, budget=10))
    assert sched(t) == [[(0, 10)], [(0, 10)], [(0, 5), (1, 4)], [(0, 1), (1, 1)], [(0, 1)]]
    assert [r.free_blocks for r in t] == [998, 997, 996, 996, 997]
    assert [r.finished for r in t] == [[], [], [], [1], [0]]
    assert [r.waiting for r in t] == [[1], [1], [], [], []]
    assert all(r.preempted == [] for r in t)
    assert t.oracle.free_blocks() == 999


def test_long_prefill_threshold():
    # threshold 8, budget 100, the rule before vLLM 0.32 (D11).  A: prompt 20, max 1; B: prompt 5, max 1.
    # s0: A: n=20 > 8 -> 8; B: n=5 (not above 8) -> 5, finishes (5 = num_tokens, 1 output).
    # s1: running A: n=12 -> 8 (the threshold caps running chunks too).  s2: A: 4 -> finishes.
    t = run([(0, 0, 20, 1), (1, 0, 5, 1)], **engine(100, 16, long_prefill_token_threshold=8,
                                                    threshold_when_alone=True))
    assert sched(t) == [[(0, 8), (1, 5)], [(0, 8)], [(0, 4)]]
    assert [r.finished for r in t] == [[1], [], [0]]


def test_long_prefill_threshold_spares_a_lone_request():
    # The same with vLLM >= 0.32's rule (D11): s0 as above (two requests); s1: A is alone, so its
    # 12 tokens left are not capped -> finishes.  Alone from the start: C (prompt 20) in one step.
    t = run([(0, 0, 20, 1), (1, 0, 5, 1)], **engine(100, 16, long_prefill_token_threshold=8))
    assert sched(t) == [[(0, 8), (1, 5)], [(0, 12)]]
    assert [r.finished for r in t] == [[1], [0]]
    assert sched(run([(2, 0, 20, 1)], **engine(100, 16, long_prefill_token_threshold=8))) == [[(2, 20)]]


# ---------------------------------------------------------------- (2) decode across a block boundary
def test_decode_crossing_block_boundary_preempts_the_tail():
    # N=5 (4 usable), bs=4, budget 100.  A, B: prompt 8, max 5, at step 0.
    # s0: A:8 (gate 2 <= 4; 2 blocks, free 2), B:8 (gate 2 <= 2; free 0).  Both get token 1 (9 tokens).
    # s1: A: n=1, computed 8+1=9 -> need cdiv(9,4)-2 = 1 > 0 free -> running.pop() = B preempted
    #     (frees 2); retry: A gets 1 block (free 1).  A's token 2.  Waiting loop skipped.
    # s2..s4: A decodes 10, 11, 12 tokens computed -- all inside 3 blocks; B's gate cdiv(9,4)=3 > 1
    #     refuses it each step.  At s4 A has 5 outputs: finishes, frees 3 -> 4 free.
    # s5: B recomputes n = 9 (8 prompt + 1 output): gate 3 <= 4 -> B:9 (free 1); token 2.
    # s6..s8: B decodes to 12 computed (3 blocks), 5 outputs at s8.
    t = run([(0, 0, 8, 5), (1, 0, 8, 5)], **engine(5, 4))
    assert sched(t) == [[(0, 8), (1, 8)]] + [[(0, 1)]] * 4 + [[(1, 9)]] + [[(1, 1)]] * 3
    assert [r.preempted for r in t] == [[], [1], [], [], [], [], [], [], []]
    assert [r.free_blocks for r in t] == [0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert t[1].running == [0] and t[1].waiting == [1]
    b = t.oracle.requests[1]
    assert (b.num_preemptions, b.recomputed_tokens, b.num_output_tokens) == (1, 8, 5)
    assert b.num_scheduled_tokens_total == 8 + 5 - 1 + 8


# ---------------------------------------------------------------- (3) self-preemption
def test_only_running_request_preempts_itself():
    # N=3 (2 usable), bs=4.  A: prompt 8, max 3.
    # s0: A:8, 2 blocks, free 0; token 1 -> 9 tokens.
    # s1: A: n=1 -> need cdiv(9,4)-2 = 1 > 0; running.pop() is A itself -> preempted, loop ends:
    #     nothing scheduled, 2 free, A back in waiting with 0 computed and its 1 output kept.
    # s2: gate cdiv(9,4)=3 > 2: refused -- forever.
    o = VllmOracle(**engine(3, 4))
    assert o.free_blocks() == 2
    o.add_request(0, 8, 3)
    rec, fin = step(o)
    assert (rec.scheduled, rec.free_blocks, fin) == ([(0, 8)], 0, [])
    rec, fin = step(o)
    assert rec == StepRecord(scheduled=[], preempted=[0], free_blocks=2, running=[], waiting=[0])
    a = o.requests[0]
    assert (a.status, a.num_computed_tokens, a.num_output_tokens, a.num_preemptions) == (PREEMPTED, 0, 1, 1)
    rec, fin = step(o)
    assert rec == StepRecord(scheduled=[], preempted=[], free_blocks=2, running=[], waiting=[0])
    # run() refuses it up front: its last step computes 8+3-1 = 10 tokens = 3 blocks > 2 usable.
    with pytest.raises(RuntimeError, match="can never finish"):
        run([(0, 0, 8, 3)], **engine(3, 4))


def test_tail_request_preempts_itself_after_the_front_is_served():
    # N=5 (4 usable), bs=4.  A: prompt 4, max 10; B: prompt 8, max 10.
    # s0: A:4 (1 block, free 3), B:8 (gate 2 <= 3; free 1); tokens 5 and 9.
    # s1: A: 5 computed -> need 1 <= 1 (free 0).  B: 9 -> need 1 > 0 -> pop() = B itself.
    #     Scheduled A only; B frees 2.
    o = VllmOracle(**engine(5, 4))
    o.add_request(0, 4, 10)
    o.add_request(1, 8, 10)
    step(o)
    rec, _ = step(o)
    assert rec == StepRecord(scheduled=[(0, 1)], preempted=[1], free_blocks=2, running=[0], waiting=[1])


# ---------------------------------------------------------------- (4) recompute and resume
def test_preempted_request_recomputes_prompt_plus_outputs_from_the_front_of_waiting():
    # N=5 (4 usable), bs=4.  A, B: prompt 8, max 5 at step 0; C: prompt 4, max 1 at step 1.
    # s0: A:8, B:8 (free 0); tokens -> 9 each.
    # s1: C appended to waiting.  A needs a 3rd block -> B preempted and prepended: waiting [B, C].
    # s2..s4: B heads waiting; its gate cdiv(9,4)=3 > 1 refuses it, C (1 block) would fit but the
    #     scan has ended.  A finishes at s4 (frees 3 -> 4).
    # s5: B: n = 9 = 8 prompt + 1 output (gate 3 <= 4, free 1), then C: 4 (gate 1 <= 1, free 0).
    #     B's recompute reaches 9 = num_tokens -> its 2nd output; C finishes.
    # s6..s8: B decodes to 5 outputs.
    t = run([(0, 0, 8, 5), (1, 0, 8, 5), (2, 1, 4, 1)], **engine(5, 4))
    assert t[1].preempted == [1] and t[1].waiting == [1, 2]
    assert [r.waiting for r in t[2:5]] == [[1, 2]] * 3
    assert t[5].scheduled == [(1, 9), (2, 4)] and t[5].finished == [2]
    assert [r.step for r in t] == list(range(9))
    b, c = t.oracle.requests[1], t.oracle.requests[2]
    assert (b.num_preemptions, b.recomputed_tokens, b.finish_step) == (1, 8, 8)
    assert (c.arrival_step, c.finish_step) == (1, 5)


def test_multiple_victims_keep_their_running_order_at_the_head_of_waiting():
    # N=5 (4 usable), bs=4.  E: prompt 8, max 2; F, G: prompt 4, max 9.
    # s0: E:8 (2 blocks, free 2), F:4 (free 1), G:4 (free 0).  Tokens: E -> 9, F, G -> 5.
    # s1: E: need cdiv(9,4)-2 = 1 > 0 -> pop() = G (free 1) -> fits (free 0).  F: need
    #     cdiv(5,4)-1 = 1 > 0 -> pop() = F itself (free 1).  Victims [G, F]; prepending G then F
    #     leaves waiting [F, G]: their old running order, the last victim at the head.
    #     E's 2nd output finishes it: its 3 blocks come back (free 4).
    o = VllmOracle(**engine(5, 4))
    for rid, p, m in [(0, 8, 2), (1, 4, 9), (2, 4, 9)]:
        o.add_request(rid, p, m)
    rec, _ = step(o)
    assert (rec.scheduled, rec.free_blocks) == ([(0, 8), (1, 4), (2, 4)], 0)
    rec, fin = step(o)
    assert rec == StepRecord(scheduled=[(0, 1)], preempted=[2, 1], free_blocks=1, running=[0], waiting=[1, 2])
    assert fin == [0]
    assert o.free_blocks() == 4


# ---------------------------------------------------------------- (5) no admission after a preemption
def test_no_waiting_admission_in_a_step_with_a_preemption():
    # reserve_full_isl=False (the older vLLM rule, D1), so the victim's first chunk alone is checked;
    # threshold 4, N=5 (4 usable), bs=4.  A: prompt 8, max 5; B: prompt 4, max 5.
    # s0: A: n=8 -> 4 (1 block, free 3); B: 4 (1 block, free 2); B's token -> 5 tokens.
    # s1: A: 4 more -> 8 computed (2 blocks, free 1), token -> 9; B: 1 -> 5 (2 blocks, free 0) -> 6.
    # s2: A: 9 -> need 1 > 0 -> pop() = B (frees 2), A takes 1: free 1.  B would now be admissible
    #     (n = 6 -> threshold 4 -> 1 block <= 1 free), but the waiting loop is skipped.
    # s3: A: 10 computed, no new block; B: n=4, 1 block <= 1 -> admitted (free 0), no token yet.
    kw = engine(5, 4, long_prefill_token_threshold=4)
    o = VllmOracle(**kw, reserve_full_isl=False)
    o.add_request(0, 8, 5)
    o.add_request(1, 4, 5)
    recs = [step(o)[0] for _ in range(4)]
    assert [r.scheduled for r in recs] == [[(0, 4), (1, 4)], [(0, 4), (1, 1)], [(0, 1)], [(0, 1), (1, 4)]]
    assert recs[2] == StepRecord(scheduled=[(0, 1)], preempted=[1], free_blocks=1, running=[0], waiting=[1])
    assert recs[3].free_blocks == 0 and recs[3].running == [0, 1]
    # Same workload with the full-sequence gate (default): s0..s2 identical; at s3 B's gate
    # cdiv(6,4) = 2 > 1 refuses it.  (With the gate, the skip can never change the outcome: D8.)
    o = VllmOracle(**kw)
    o.add_request(0, 8, 5)
    o.add_request(1, 4, 5)
    recs2 = [step(o)[0] for _ in range(4)]
    assert recs2[:3] == recs[:3]
    assert recs2[3] == StepRecord(scheduled=[(0, 1)], preempted=[], free_blocks=1, running=[0], waiting=[1])
    # Both finish under run().
    for full in (False, True):
        t = run([(0, 0, 8, 5), (1, 0, 4, 5)], **kw, reserve_full_isl=full)
        assert all(r.status == FINISHED and r.num_output_tokens == 5 for r in t.oracle.requests.values())


# ---------------------------------------------------------------- (6) head-of-line blocking
def test_head_of_line_blocking_on_the_full_sequence():
    # N=5 (4 usable), bs=4.  A: prompt 12, max 2; B: prompt 8, max 1; C: prompt 4, max 1.
    # s0: A: gate 3 <= 4 -> A:12 (free 1).  B: gate 2 > 1 -> break; C (1 block) would fit.
    # s1: A: 13 computed -> need 1 <= 1 (free 0); B refused again; A's 2nd output: finishes (4 free).
    # s2: B: 8 (free 2), C: 4 (free 1); both finish.
    t = run([(0, 0, 12, 2), (1, 0, 8, 1), (2, 0, 4, 1)], **engine(5, 4))
    assert sched(t) == [[(0, 12)], [(0, 1)], [(1, 8), (2, 4)]]
    assert [r.waiting for r in t] == [[1, 2], [1, 2], []]
    assert [r.free_blocks for r in t] == [1, 0, 1]
    assert [r.finished for r in t] == [[], [0], [1, 2]]


# ---------------------------------------------------------------- (7) max_num_seqs
def test_max_num_seqs():
    # max_num_seqs 2, plenty of memory.  A, B, C: prompt 4, max 2.
    # s0: A:4, B:4, then len(running) = 2 >= 2 -> break (C waits).  s1: A:1, B:1 -> both finish.
    # s2: C:4.  s3: C:1 -> finishes.
    t = run([(0, 0, 4, 2), (1, 0, 4, 2), (2, 0, 4, 2)], **engine(100, 16, seqs=2))
    assert sched(t) == [[(0, 4), (1, 4)], [(0, 1), (1, 1)], [(2, 4)], [(2, 1)]]
    assert t[0].waiting == [2] and t[1].finished == [0, 1]


# ---------------------------------------------------------------- (8) chunked prefill disabled
def test_chunked_prefill_disabled():
    # budget 10, chunked prefill off.  A: prompt 6, max 2; B: prompt 6, max 1; C: prompt 3, max 1.
    # s0: A: 6 <= 10 -> A:6 (budget 4).  B: 6 > 4 -> break (C's 3 would fit: the scan still ends).
    # s1: A:1 (budget 9), B: 6 <= 9 (budget 3), C: 3 <= 3 (budget 0).  All three finish, in
    #     num_scheduled_tokens order: A (running loop), B, C (waiting loop).
    kw = engine(100, 16, budget=10)
    jobs = [(0, 0, 6, 2), (1, 0, 6, 1), (2, 0, 3, 1)]
    t = run(jobs, **kw, enable_chunked_prefill=False)
    assert sched(t) == [[(0, 6)], [(0, 1), (1, 6), (2, 3)]]
    assert t[1].finished == [0, 1, 2]
    # With chunked prefill B gets the budget's 4 remaining tokens at s0 instead.
    assert run(jobs, **kw)[0].scheduled == [(0, 6), (1, 4)]
    # A prompt above the budget is never admitted: the first step schedules nothing -> error.
    with pytest.raises(RuntimeError, match="scheduled nothing"):
        run([(0, 0, 20, 1)], **kw, enable_chunked_prefill=False)


# ---------------------------------------------------------------- (9) block 0 reserved
def test_null_block_is_never_free():
    # N=10 -> 9 free at start.  bs=4: prompt 36, max 1 needs cdiv(36,4) = 9 blocks: admitted with
    # 0 left.  prompt 37 needs 10 > 9: refused by the gate, and run() rejects it up front.
    o = VllmOracle(**engine(10, 4))
    assert o.free_blocks() == 9
    o.add_request(0, 36, 1)
    rec, fin = step(o)
    assert (rec.scheduled, rec.free_blocks, fin, o.free_blocks()) == ([(0, 36)], 0, [0], 9)
    o.add_request(1, 37, 1)
    rec, _ = step(o)
    assert (rec.scheduled, rec.waiting, rec.free_blocks) == ([], [1], 9)
    with pytest.raises(RuntimeError, match="null block"):
        run([(0, 0, 37, 1)], **engine(10, 4))


def test_idle_gap_advances_to_the_next_arrival():
    t = run([(0, 0, 4, 1), (1, 5, 4, 1)], **engine(10, 4))
    assert [(r.step, r.scheduled) for r in t] == [(0, [(0, 4)]), (5, [(1, 4)])]


# ---------------------------------------------------------------- (10) random workload invariants
def random_jobs(seed: int, n: int = 300) -> list[tuple[int, int, int, int]]:
    rng = random.Random(seed)
    jobs, t = [], 0
    for rid in range(n):
        t += rng.choice([0, 0, 0, 1, 1, 2, 3])
        jobs.append((rid, t, rng.randint(1, 600), rng.randint(1, 250)))
    return jobs


def replay_and_check(jobs, trace, kw) -> None:
    """Re-derive every request's state from the records alone and check the invariants."""
    bs, usable = kw["block_size"], kw["num_gpu_blocks"] - 1
    spec = {rid: (p, m) for rid, _a, p, m in jobs}
    arrival = {rid: a for rid, a, _p, _m in jobs}
    computed = {rid: 0 for rid in spec}
    outputs = {rid: 0 for rid in spec}
    lost = {rid: 0 for rid in spec}
    preemptions = {rid: 0 for rid in spec}
    done: set[int] = set()
    live: set[int] = set()  # arrived and unfinished
    held = 0  # sum of cdiv(computed, bs) over live requests, kept up to date
    next_job = 0
    prev_running: list[int] = []
    for rec in trace:
        while next_job < len(jobs) and jobs[next_job][1] <= rec.step:
            live.add(jobs[next_job][0])
            next_job += 1
        assert rec.scheduled, "every recorded step schedules something"
        assert sum(n for _, n in rec.scheduled) <= kw["max_num_batched_tokens"]
        assert len(rec.running) <= kw["max_num_seqs"]
        for rid in rec.preempted:
            assert rid in prev_running and rid not in dict(rec.scheduled)
            lost[rid] += computed[rid]
            held -= cdiv(computed[rid], bs)
            computed[rid] = 0
            preemptions[rid] += 1
        for rid, n in rec.scheduled:
            assert n > 0 and arrival[rid] <= rec.step
            held += cdiv(computed[rid] + n, bs) - cdiv(computed[rid], bs)
            computed[rid] += n
            # no request loses tokens: it never computes past prompt + outputs so far
            assert computed[rid] <= spec[rid][0] + outputs[rid]
        assert len(rec.running) + len(rec.waiting) == len(live)
        assert set(rec.running) | set(rec.waiting) == live
        assert all(computed[rid] == 0 for rid in rec.waiting)
        # block conservation right after schedule()
        assert rec.free_blocks + held == usable
        finished = []
        for rid, _n in rec.scheduled:
            p, m = spec[rid]
            if computed[rid] == p + outputs[rid]:
                outputs[rid] += 1
                if outputs[rid] == m:
                    finished.append(rid)
                    done.add(rid)
                    live.discard(rid)
                    held -= cdiv(computed[rid], bs)
        assert rec.finished == finished
        prev_running = [rid for rid in rec.running if rid not in done]
    assert done == set(spec)
    for rid, req in trace.oracle.requests.items():
        p, m = spec[rid]
        assert req.status == FINISHED and req.num_output_tokens == m == outputs[rid]
        assert req.num_preemptions == preemptions[rid]
        assert req.recomputed_tokens == lost[rid]
        assert req.num_scheduled_tokens_total == p + m - 1 + lost[rid]
        assert req.arrival_step == arrival[rid] and req.finish_step is not None
    assert trace.oracle.free_blocks() == usable


@pytest.mark.parametrize(
    "kw",
    [
        engine(100, 16, budget=512, seqs=64, long_prefill_token_threshold=64),
        engine(80, 16, budget=512, seqs=64),
        engine(100, 16, budget=1024, seqs=64, enable_chunked_prefill=False),
    ],
    ids=["threshold", "chunked", "no-chunked"],
)
def test_random_workload_under_memory_pressure(kw):
    jobs = random_jobs(1)
    trace = run(jobs, **kw)
    replay_and_check(jobs, trace, kw)
    pre = [r.num_preemptions for r in trace.oracle.requests.values()]
    assert sum(pre) >= 100  # heavy pressure: hundreds of preemptions ...
    assert max(pre) >= 2  # ... some requests preempted several times
    if kw.get("long_prefill_token_threshold"):
        assert sum(pre) >= 500 and sum(p >= 3 for p in pre) >= 50


def test_oracle_invariants_step_by_step():
    # The oracle's own bookkeeping (held blocks == cdiv(computed, bs) per request) after each step.
    kw = engine(60, 8, budget=256, seqs=32, long_prefill_token_threshold=32)
    rng = random.Random(7)
    o = VllmOracle(**kw)
    for rid in range(120):
        o.add_request(rid, rng.randint(1, 200), rng.randint(1, 120))
    n_steps = 0
    while o.has_unfinished():
        rec, _ = step(o)
        assert rec.scheduled
        n_steps += 1
    assert all(r.status == FINISHED for r in o.requests.values())
    assert sum(r.num_preemptions for r in o.requests.values()) > 50


# ---- the prefix-caching oracle on hand-checked cases ---------------------------------------------

def _serve(oracle, rid):
    """Schedule and run steps until request ``rid`` finishes."""
    while oracle.requests[rid].status != "FINISHED":
        record = oracle.schedule()
        oracle.update_from_output(record)
        oracle.check_invariants()


def test_prefix_oracle_hits_at_most_num_tokens_minus_one():
    from tests.vllm_oracle import VllmPrefixOracle

    o = VllmPrefixOracle(num_gpu_blocks=20, block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    o.add_request(0, list(range(1, 11)), 1)          # 10 tokens: blocks [1-4], [5-8] cached
    _serve(o, 0)
    o.add_request(1, list(range(1, 9)) + [100, 101], 1)
    o.add_request(2, list(range(1, 9)), 1)           # exactly 2 blocks: the last token is computed
    o.add_request(3, [1, 2, 3, 9, 9, 9], 1)          # differs inside block 0: no hit
    _serve(o, 1), _serve(o, 2), _serve(o, 3)
    assert o.hits_per_request == {0: [0], 1: [8], 2: [4], 3: [0]}
    assert o.stats["queries"] == 10 + 10 + 8 + 6 and o.stats["hits"] == 12


def test_prefix_oracle_evicts_fresh_first_then_tail_first():
    """5 usable blocks of 4.  Request 0 (10 tokens) leaves 2 cached free blocks and 3 fresh ones;
    request 1 needs 4 new blocks: the 3 fresh ones, then it evicts the *tail* of request 0 (freed
    in reverse order), so request 0's prompt again finds only its first block."""
    from tests.vllm_oracle import VllmPrefixOracle

    o = VllmPrefixOracle(num_gpu_blocks=6, block_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    o.add_request(0, list(range(1, 11)), 1)
    _serve(o, 0)
    assert o.free_blocks() == 5 and o.cached_free_blocks() == 2 and o.evictions == 0
    o.add_request(1, list(range(50, 63)), 1)         # 13 tokens: 4 blocks
    _serve(o, 1)
    assert o.evictions == 1
    o.add_request(2, list(range(1, 11)), 1)
    _serve(o, 2)
    assert o.hits_per_request[2] == [4] and o.evictions == 2   # its second block: one fresh, one evicted
