"""Every registered scheduler against the model's constraints (arXiv 2504.07347 §3.1, Eqs. 8–9, §4), on generated workloads.

The test keeps its own ledger of every request's remaining prefill and decode tokens,
updated only from the batch plans, and checks each batch against it: budget (6d), request
cap, prefill before decode (6a), one decode token per request (6c), chunk sizes, the
engine's demand and work-conserving bound (Eqs. 8-9, cap-aware), and each policy's
ordering rules.  At the end every request must have received exactly its tokens.
"""

from __future__ import annotations

import pytest
from conftest import drive, make_engine
from hypothesis import given, settings
from hypothesis import strategies as st

from llmqueue.model.request import Request
from llmqueue.schedulers import SCHEDULERS

CONFIGS = (
    [pytest.param(name, {}, id=name) for name in SCHEDULERS]
    + [pytest.param(name, {"split_prompts": True}, id=f"{name}-split")
       for name, cls in SCHEDULERS.items() if "split_prompts" in cls.options]
    + [pytest.param("vllm-v1", {"max_num_seqs": 2, "long_prefill_token_threshold": 3}, id="vllm-v1-limited"),
       pytest.param("vllm-v1", {"long_prefill_token_threshold": 3, "long_prefill_threshold_when_alone": True},
                    id="vllm-v1-threshold-when-alone")]
)


@st.composite
def workloads(draw):
    """(token budget, request cap, requests as (arrival batch index, prompt, output) in arrival order)."""
    budget = draw(st.integers(1, 64))
    cap = draw(st.none() | st.integers(1, 8))
    requests = draw(st.lists(st.tuples(st.integers(0, 25), st.integers(1, 40), st.integers(0, 10)),
                             min_size=1, max_size=12))
    return budget, cap, sorted(requests, key=lambda r: r[0])


def splits(name: str, options: dict) -> bool:
    """Whether the policy may split a prompt: always, unless it has a split_prompts option
    (the non-mixed policies, an open point of §4), which is off unless set."""
    return "split_prompts" not in SCHEDULERS[name].options or options.get("split_prompts", False)


class Ledger:
    """Remaining tokens per request, from the plans alone (never from the engine's counters)."""

    def __init__(self, specs):
        self.prompt = {rid: p for rid, (_, p, _) in enumerate(specs)}
        self.output = {rid: d for rid, (_, _, d) in enumerate(specs)}
        self.p_left = dict(self.prompt)
        self.d_left = dict(self.output)
        self.inside: set[int] = set()          # admitted, not finished
        self.admitted: list[int] = []
        self.rejected: list[int] = []
        self.first_token: dict[int, float] = {}
        self.finish: dict[int, float] = {}
        self.violations = 0

    def admit(self, request: Request, accepted: bool) -> None:
        self.admitted.append(request.rid)
        if accepted:
            self.inside.add(request.rid)
        else:
            self.rejected.append(request.rid)

    def share(self, rid: int) -> int:
        """The request's part of the demand (Eq. 8)."""
        return self.p_left[rid] or (1 if self.d_left[rid] else 0)

    def reference_bound(self, budget: int, cap: int | None) -> int:
        """min(b_max, most tokens any <= cap requests could take), found by sorting the shares."""
        shares = sorted((self.share(rid) for rid in self.inside), reverse=True)
        return min(budget, sum(shares if cap is None else shares[:cap]))


def check_policy(name: str, options: dict, ledger: Ledger, prefill: list[tuple[int, int]],
                 decode: list[int], tokens: int, budget: int) -> None:
    """Each policy's ordering rules (§4, Table 1), given the state at the batch's start."""
    if name == "vllm-v1":
        check_vllm_v1(options, ledger, prefill, decode, tokens, budget)
        if options:
            return    # with limits vLLM v1 is not K-FCFS
    elif name not in ("fastertransformer", "vllm", "orca", "sarathi"):
        return        # a new scheduler: the generic checks only
    order = sorted(ledger.inside)                          # rid order = arrival order
    prefilling = [rid for rid in order if ledger.p_left[rid]]
    decoding = [rid for rid in order if not ledger.p_left[rid]]
    rids = [rid for rid, _ in prefill]
    # FCFS within each queue: the served requests are the oldest of their queue.
    assert sorted(rids) == prefilling[:len(rids)], (prefilling, prefill)
    assert sorted(decode) == decoding[:len(decode)], (decoding, decode)
    # At most one partial prefill chunk, the last one, and only when the budget is used up;
    # the non-splitting policies never split.
    partial = [rid for rid, n in prefill if n < ledger.p_left[rid]]
    assert partial in ([], rids[-1:]), prefill
    if partial:
        assert tokens == budget and splits(name, options), prefill
    if name == "fastertransformer":   # decode first, never mixed
        assert not (prefill and decode) and (not decoding or decode)
    elif name == "vllm":              # prefill first, never mixed
        assert not (prefill and decode) and (not prefilling or prefill)
    elif name == "orca":              # prefill first, mixed: decodes only after every prompt fits
        assert not decode or (rids == prefilling and not partial)
    else:                             # sarathi, vllm-v1 without limits: K-FCFS
        served = sorted(rids + decode)
        assert served == order[:len(served)], (order, served)


def check_vllm_v1(options: dict, ledger: Ledger, prefill: list[tuple[int, int]], decode: list[int],
                  tokens: int, budget: int) -> None:
    """vLLM v1's loop (schedulers/vllm_v1.py): running requests (started or decoding) in
    admission order, then waiting ones FCFS while fewer than max_num_seqs run; chunks are at
    most long_prefill_token_threshold unless one request is alone at the batch's start (vLLM >= 0.32;
    long_prefill_threshold_when_alone: capped then too), and only the last request served may get
    less than it could take, when the budget is used up."""
    defaults = {k: o.default for k, o in SCHEDULERS["vllm-v1"].options.items()}
    settings_ = {**defaults, **options}
    order = sorted(ledger.inside)
    lifted = len(order) <= 1 and not settings_["long_prefill_threshold_when_alone"]
    threshold = (None if lifted else settings_["long_prefill_token_threshold"]) or float("inf")
    waiting = [rid for rid in order if ledger.p_left[rid] == ledger.prompt[rid]]
    running = [rid for rid in order if ledger.p_left[rid] < ledger.prompt[rid]]
    chunk = dict(prefill)
    served_running = [rid for rid in running if rid in chunk or rid in decode]
    served_waiting = [rid for rid in waiting if rid in chunk]
    assert served_running == running[:len(served_running)], (running, prefill, decode)
    assert served_waiting == waiting[:len(served_waiting)], (waiting, prefill)
    if served_waiting:
        assert served_running == running and len(running) + len(served_waiting) <= settings_["max_num_seqs"]
    assert all(n <= threshold for n in chunk.values()), prefill
    short = [rid for rid, n in prefill if n < min(ledger.p_left[rid], threshold)]
    assert short in ([], (served_running + served_waiting)[-1:]), prefill
    if short:
        assert tokens == budget, prefill


@pytest.mark.parametrize("name,options", CONFIGS)
@settings(max_examples=200, deadline=None)
@given(workload=workloads())
def test_scheduler_conformance(name, options, workload):
    budget, cap, specs = workload
    engine = make_engine(name, budget, cap=cap, **options)
    requests = [Request(rid, float(t), p, d) for rid, (t, p, d) in enumerate(specs)]
    ledger = Ledger(specs)
    claims_wc = SCHEDULERS[name].work_conserving
    finished_seen: list[int] = []

    def on_step(step):
        plan = step.plan
        prefill = [(r.rid, n) for r, n in plan.prefill]
        decode = [r.rid for r in plan.decode]
        rids = [rid for rid, _ in prefill]
        tokens = sum(n for _, n in prefill) + len(decode)
        assert plan.num_tokens == tokens and plan.num_prefill_tokens == tokens - len(decode)
        assert 1 <= tokens <= budget                                       # (6d)
        assert len(set(rids)) == len(rids)
        assert len(set(decode)) == len(decode)                             # (6c)
        assert not set(rids) & set(decode)                                 # (6a)
        assert cap is None or len(rids) + len(decode) <= cap               # k_max
        assert set(rids) | set(decode) <= ledger.inside
        for rid, n in prefill:
            assert 1 <= n <= ledger.p_left[rid], (rid, n)
        for rid in decode:
            assert ledger.p_left[rid] == 0 and ledger.d_left[rid] > 0, rid   # (6a)
        assert step.demand == sum(ledger.share(rid) for rid in ledger.inside)
        bound = ledger.reference_bound(budget, cap)
        assert step.bound == bound
        ledger.violations += tokens != bound
        if claims_wc and cap is None:
            assert tokens == bound, "a work-conserving scheduler left room unused"
        if name == "vllm-v1" and not options and cap is None:
            assert tokens == bound, "vLLM v1 without limits fills every batch (its docstring)"
        check_policy(name, options, ledger, prefill, decode, tokens, budget)
        assert step.end_time == step.start_time + 1.0

        done = []
        for rid, n in prefill:
            ledger.p_left[rid] -= n
            if ledger.p_left[rid] == 0:
                ledger.first_token[rid] = step.end_time
        for rid in decode:
            ledger.d_left[rid] -= 1
        for rid in rids + decode:
            if ledger.p_left[rid] == 0 and ledger.d_left[rid] == 0:
                ledger.finish[rid] = step.end_time
                ledger.inside.discard(rid)
                done.append(rid)
        assert sorted(r.rid for r in step.finished) == sorted(done)
        finished_seen.extend(done)
        # The engine keeps decoders in arrival order (FCFS) and exactly the decoding ones.
        assert [r.rid for r in engine.state.decoding] == sorted(
            rid for rid in ledger.inside if ledger.p_left[rid] == 0)

    total = sum(p + d for _, p, d in specs)
    drive(engine, requests, max_steps=total, on_admit=ledger.admit, on_step=on_step)

    # Conservation: every request was admitted once and either rejected or finished once.
    assert ledger.admitted == list(range(len(specs)))
    assert sorted(finished_seen + ledger.rejected) == ledger.admitted
    assert [r.rid for r in engine.rejected] == ledger.rejected
    assert not ledger.inside
    assert engine.num_in_engine == 0 and not engine.has_work
    assert not engine.state.prefilling and not engine.state.decoding
    assert engine.state.total_prefill_left == 0
    assert engine.violations == ledger.violations

    for request in requests:
        rid = request.rid
        if rid in ledger.rejected:
            assert request.first_token_time is None and request.finish_time is None
        else:
            assert ledger.p_left[rid] == 0 and ledger.d_left[rid] == 0
            assert request.first_token_time == ledger.first_token[rid]
            assert request.finish_time == ledger.finish[rid]
            assert request.finish_time >= request.first_token_time > request.arrival_time
        # Rejected exactly when the policy cannot split and the prompt exceeds the budget.
        assert (rid in ledger.rejected) == (not splits(name, options)
                                            and request.num_prompt_tokens > budget)
