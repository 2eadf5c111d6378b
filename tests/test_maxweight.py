"""The maxweight scheduler (schedulers/maxweight.py; docs/region.md): the batch shapes it picks,
its binding to the engine's batch time, and its stability where Sarathi-1024 diverges."""

from __future__ import annotations

import pytest
from conftest import drive, make_engine, put_decoding
from hypothesis import given, settings
from hypothesis import strategies as st

from llmqueue.config import parse_config
from llmqueue.errors import InternalError
from llmqueue.analysis.region import stability_region
from llmqueue.model.request import Request
from llmqueue.runner import compare
from llmqueue.schedulers import make_scheduler

STAIRCASE = None   # make_batch_time(None): the paper's staircase


def engine_with(decoders: int, prompts: list[int], budget: int = 1024, cap: int | None = 100, decode_left: int = 500,
                batch_time=STAIRCASE):
    engine = make_engine("maxweight", budget, cap=cap, batch_time=batch_time)
    for rid in range(decoders):
        r = Request(rid, 0.0, 10, decode_left)
        put_decoding(engine, r)
    for i, p in enumerate(prompts):
        engine.admit(Request(decoders + i, 0.0, p, 10))
    return engine


def shape(engine):
    plan = engine.scheduler.plan(engine.state)
    return plan.num_prefill_tokens, plan.num_decode_tokens


def test_vertex_c_shape_with_a_large_budget():
    """99 decoders with a large decode backlog and one 290-token prompt: the 128-token batch of
    vertex C (29 + 99), not Sarathi's 290 + 99 = 389 tokens in 153 ms."""
    assert shape(engine_with(99, [290])) == (29, 99)
    sarathi = make_engine("sarathi", 1024, cap=100, batch_time=STAIRCASE)
    for rid in range(99):
        put_decoding(sarathi, Request(rid, 0.0, 10, 500))
    sarathi.admit(Request(99, 0.0, 290, 10))
    plan = sarathi.scheduler.plan(sarathi.state)
    assert (plan.num_prefill_tokens, plan.num_decode_tokens) == (290, 99)


def test_cap_full_of_decoders():
    # A small prefill backlog against a large decode one: decode only, 100 decoders.
    assert shape(engine_with(150, [290])) == (0, 100)
    # A prefill backlog that outweighs the decodes: one decode slot goes to a prefill chunk, and
    # the batch grows to the budget.
    assert shape(engine_with(150, [100_000], decode_left=2)) == (1024 - 99, 99)


def test_prefill_only_picks_the_fastest_load_it_can_fill():
    # 290 tokens alone: 256 of them in 82.22 ms (3.11 tokens/ms) beat 290 in 117.69 ms (2.46).
    assert shape(engine_with(0, [290])) == (256, 0)
    assert shape(engine_with(0, [5000])) == (1024, 0)


def test_without_cap_and_a_constant_time_it_fills_the_budget():
    """With t constant every token is free, so the max-weight batch is a full one (work-conserving)."""
    constant = {"model": "constant", "duration_ms": 10.0}
    assert shape(engine_with(30, [500], budget=512, cap=None, batch_time=constant)) == (482, 30)
    steps = drive(engine_with(5, [40, 7, 300], budget=64, cap=None, batch_time=constant), [])
    assert all(s.plan.num_tokens == s.bound for s in steps)


def test_needs_the_engine_batch_time():
    scheduler = make_scheduler("maxweight")
    engine = engine_with(1, [10])
    with pytest.raises(InternalError, match="batch-time model"):
        scheduler.plan(engine.state)


@pytest.mark.slow
@pytest.mark.parametrize("shape_", [(50, 400), (290, 990)])
def test_stable_inside_where_sarathi_1024_diverges(shape_):
    """ρ = 0.9 of the b_max = 1024 region, Poisson arrivals and lengths, 30 minutes (docs/region.md
    evidence table): Sarathi-1024 diverges, maxweight-1024 keeps up with the same requests."""
    mp, md = shape_
    rate = 0.9 / stability_region(None, 1024, 100).gauge(mp, md)
    cfg = parse_config({
        "engine": {"scheduler": "sarathi", "token_budget": 1024, "max_batch_requests": 100},
        "workload": {"arrival": "poisson", "rate": rate, "prompt": {"dist": "poisson", "mean": mp},
                     "output": {"dist": "poisson", "mean": md}},
        "run": {"horizon_s": 1800.0, "seed": 0}})
    runs = {r.summary["scheduler"]: r.summary for r in compare(cfg, ["sarathi", "maxweight"])}
    assert runs["sarathi"]["verdict"] == "unstable", runs["sarathi"]["verdict_reason"]
    assert runs["maxweight"]["verdict"] in ("stable", "inconclusive"), runs["maxweight"]["verdict_reason"]
    assert runs["maxweight"]["final_in_system"] < 130 < runs["sarathi"]["final_in_system"]
    assert runs["maxweight"]["token_throughput"] == pytest.approx(runs["maxweight"]["offered_tokens_per_s"], rel=0.03)


@st.composite
def cases(draw):
    budget = draw(st.integers(1, 48))
    cap = draw(st.none() | st.integers(1, 12))
    if draw(st.booleans()):
        model = {"model": "staircase", "c_ms": draw(st.floats(0.0, 5.0)), "a_ms": draw(st.floats(0.5, 5.0)),
                 "b0": draw(st.integers(1, 12))}
    else:   # a measured table, possibly non-monotone
        ms = draw(st.lists(st.floats(0.5, 20.0), min_size=2, max_size=6))
        model = {"model": "table", "points_ms": [[1 + 9 * i, m] for i, m in enumerate(ms)], "extrapolate": "clamp"}
    requests = draw(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 60), st.integers(0, 30)),
                             min_size=1, max_size=12))
    return budget, cap, model, sorted(requests, key=lambda r: r[0])


@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_each_batch_is_the_max_weight_shape(case):
    """Every batch maximises (P·x + D·y)/t_b over the shapes the docstring names, checked by
    trying every load b: the search over a few candidate loads is exact for every model."""
    budget, cap, model, specs = case
    engine = make_engine("maxweight", budget, cap=cap, batch_time=model)
    seconds = engine.scheduler.load.seconds
    k = cap or budget

    def best_score(state):
        p = state.total_prefill_left
        d = sum(r.decode_left for r in state.decoding) if p else 0
        y_all = min(len(state.decoding), k, budget)
        best = -1.0
        for y in [y_all] + ([k - 1] if p and y_all == k else []):
            room = budget - y
            x_cap = min(room, sum(r.prefill_left for r in list(state.prefilling)[:k - y])) if p else 0
            for b in range(max(y, 1), y + x_cap + 1):
                best = max(best, (p * (b - y) + d * y) / seconds[b])
        return best, p, d

    requests = [Request(rid, float(t), p, d) for rid, (t, p, d) in enumerate(specs)]
    pending = list(reversed(requests))
    now = 0.0
    for _ in range(10_000):
        while pending and pending[-1].arrival_time <= now:
            engine.admit(pending.pop())
        if not engine.has_work:
            if not pending:
                break
            now = pending[-1].arrival_time
            continue
        best, p, d = best_score(engine.state)
        plan = engine.scheduler.plan(engine.state)
        score = (p * plan.num_prefill_tokens + d * plan.num_decode_tokens) / seconds[plan.num_tokens]
        assert score == pytest.approx(best, rel=1e-12), (plan.describe(), best)
        now = engine.step(now).end_time
    assert not engine.has_work and not pending
    assert all(r.prefill_left == 0 and r.decode_left == 0 for r in requests)
