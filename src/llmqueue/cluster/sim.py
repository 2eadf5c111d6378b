"""A pool of replicas behind a router, simulated (docs/cluster.md; arXiv 2504.07347 §3.1 per replica).

Each replica is one engine of the paper's model (its own scheduler, token budget, batch time, KV
memory).  The arrivals are generated once (common random numbers across routers) and the
router's decisions draw from their own stream (seed, :data:`ROUTING_STREAM`), so one seed gives
one run.

* **Static routers** decide without looking at the replicas: every decision is drawn at once and
  each replica's requests run in one :func:`~llmqueue.core.simulator.simulate` call.
* **Dynamic routers** decide at each arrival from what the replicas reported.  Each replica is a
  :class:`~llmqueue.core.stepper.Stepper` (the engine core advanced piecewise, identical to one
  simulate() run however cut).  At an arrival at time t the event loop advances each replica that
  holds requests to t − report_delay_s (only those whose clock is behind: a replica whose batch
  straddles that time has already reported everything finished by then), applies the finishes
  reported by then to the router's :class:`~llmqueue.cluster.routers.View`, asks the router, and
  queues the request on the chosen replica.  A request routed while its replica's batch runs joins
  the next batch boundary, as in one engine.  For the built-in jsq, least-tokens and power-of-d
  routers on replicas the compiled core steps, the same loop runs in C (``_fastcore.run_pool``:
  the same decisions and batches, tests/test_cluster.py).
"""

from __future__ import annotations

import heapq
import time as _time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from llmqueue.cluster.config import ClusterConfig
from llmqueue.cluster.routers import JoinShortestQueue, LeastTokens, PowerOfD, Router, View, make_router
from llmqueue.core import fastcore
from llmqueue.core.simulator import KVRecord, Result, simulate
from llmqueue.core.stepper import Stepper
from llmqueue.errors import ConfigError, InternalError
from llmqueue.model.workload import Requests

#: The routing stream of a seed: np.random.default_rng([seed, ROUTING_STREAM]) (arrivals and
#: lengths draw from the workload's own streams, so every router sees the same requests).
ROUTING_STREAM = 0x52_4F_55_54   # "ROUT"
SESSION_STREAM = 0x53_45_53_53   # "SESS": the session of each request


@dataclass
class PoolResult:
    """A pool run: the requests, the replica of each, and each replica's :class:`Result`
    (its requests in arrival order: ``replica_requests[j]`` are their positions in ``requests``)."""

    requests: Requests
    replica: np.ndarray                  # int64 per request
    results: list[Result]
    replica_requests: list[np.ndarray]
    horizon_s: float
    router: str
    session: np.ndarray | None = None
    wall_s: float = 0.0
    meta: dict = field(default_factory=dict)


def sessions_of(cfg: ClusterConfig, n: int) -> np.ndarray:
    """Each request's session id: drawn uniformly from ``cluster.sessions`` (its own stream), or the
    request's own index when sessions are not configured."""
    if cfg.sessions is None:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([cfg.base.run.seed, SESSION_STREAM]).integers(0, cfg.sessions, n, dtype=np.int64)


def capacities_of(cfg: ClusterConfig) -> list[float]:
    from llmqueue.analysis import capacity
    from llmqueue.runner import batch_time_of

    return [capacity(batch_time_of(r.config), r.config.engine["token_budget"])[1] for r in cfg.replicas]


def build_router(cfg: ClusterConfig) -> Router:
    rng = np.random.default_rng([cfg.base.run.seed, ROUTING_STREAM])
    return make_router(cfg.router_cls, capacities_of(cfg), rng, cfg.router_options)


def pool_horizon(cfg: ClusterConfig, requests: Requests) -> float:
    rc = cfg.base.run
    if rc.drain:
        return float("inf")
    if rc.horizon_s is not None:
        return float(rc.horizon_s)
    return float(requests.arrival_time[-1]) if len(requests) else 0.0


def _subset(requests: Requests, idx: np.ndarray) -> Requests:
    return Requests(requests.arrival_time[idx], requests.num_prompt_tokens[idx], requests.num_output_tokens[idx])


def simulate_pool(cfg: ClusterConfig, requests: Requests, *, router: Router | None = None,
                  compiled: bool | None = None, engines: list | None = None,
                  progress: Callable[[float], None] | None = None) -> PoolResult:
    """Route ``requests`` to the pool's replicas and simulate them (module note).  ``compiled``:
    the compiled pool loop for a built-in dynamic router (None: wherever it can run; False: the
    Python loop over steppers; True: it or an error).  ``engines``: the replicas' fresh engines,
    one per replica (default: built from their configs).  ``progress``: called now and then with
    the share of the requests routed (or, static routers, simulated) so far."""
    from llmqueue.runner import build_engine

    started = _time.perf_counter()
    router = build_router(cfg) if router is None else router
    if getattr(router, "capacities", None) is None:
        router.capacities = np.asarray(capacities_of(cfg))
    if engines is None:
        engines = [build_engine(r.config, stream=j) for j, r in enumerate(cfg.replicas)]
    elif len(engines) != len(cfg.replicas):
        raise InternalError(f"simulate_pool: {len(engines)} engines for {len(cfg.replicas)} replicas")
    horizon = pool_horizon(cfg, requests)
    session = sessions_of(cfg, len(requests))
    rc = cfg.base.run
    if router.static:
        replica = np.asarray(router.assign(requests.num_prompt_tokens, requests.num_output_tokens, session),
                             dtype=np.int64)
        if len(replica) != len(requests) or (len(replica) and not 0 <= replica.min() <= replica.max() < len(engines)):
            raise ConfigError("cluster.router", cfg.router, f"a router whose assign() returns one replica index "
                                                            f"(0..{len(engines) - 1}) per request")
        parts = [np.flatnonzero(replica == j) for j in range(len(engines))]
        results = []
        done, total = 0, max(len(requests), 1)
        for engine, idx in zip(engines, parts):
            sub = _subset(requests, idx)
            hook = None if progress is None else (lambda now, n, done=done: progress((done + n) / total))
            results.append(simulate(engine, sub, horizon_s=None if rc.drain else horizon, drain=rc.drain,
                                    record_batches=rc.record_batches, method=rc.method, progress=hook))
            done += len(idx)
            if not rc.drain:
                results[-1].end_time = horizon
    else:
        why = "not asked for" if compiled is False else _compiled_reason(router, engines, rc.method)
        if why is None:
            replica, results, parts = _dynamic_compiled(cfg, router, engines, requests, horizon, progress)
        elif compiled:
            raise ConfigError("run.method", "compiled pool", f"a pool the compiled loop runs ({why})")
        else:
            replica, results, parts = _dynamic(cfg, router, engines, requests, session, horizon, progress)
    out = PoolResult(requests, replica, results, parts, horizon if not rc.drain else max(
        [r.end_time for r in results] + [float(requests.arrival_time[-1]) if len(requests) else 0.0]),
        cfg.router, session)
    out.wall_s = _time.perf_counter() - started
    out.meta["method"] = sorted({r.meta.get("method", "fast") for r in results})
    return out


#: The built-in dynamic routers the compiled pool loop runs (its router codes, _fastcore.c run_pool).
COMPILED_ROUTERS = {JoinShortestQueue: 0, LeastTokens: 1, PowerOfD: 2}


def _compiled_reason(router: Router, engines, method: str) -> str | None:
    """Why this pool cannot run on the compiled pool loop (None: it can)."""
    if method != "fast":
        return f"run.method = {method!r}"
    if type(router) not in COMPILED_ROUTERS:
        return f"router {router.name!r} decides in Python"
    if fastcore.unavailable() is not None:
        return fastcore.unavailable()
    for j, engine in enumerate(engines):
        why = fastcore.reason(engine, piecewise=True)
        if why is not None:
            return f"replica {j}: {why}"
    return None


def _dynamic_compiled(cfg: ClusterConfig, router: Router, engines, requests: Requests, horizon: float,
                      progress: Callable[[float], None] | None = None):
    """:func:`_dynamic` in C (``_fastcore.run_pool``): the same decisions and batches, without a
    Python call per arrival."""
    n = len(requests)
    arrivals = np.ascontiguousarray(requests.arrival_time, dtype=np.float64)
    prompts = np.ascontiguousarray(requests.num_prompt_tokens, dtype=np.int64)
    outputs = np.ascontiguousarray(requests.num_output_tokens, dtype=np.int64)
    code = COMPILED_ROUTERS[type(router)]
    d = 0
    picks = np.zeros(0, np.int64)
    if isinstance(router, PowerOfD):
        d = router.d
        picks = np.ascontiguousarray(router.picks(n), dtype=np.int64).reshape(-1)
    replica = np.zeros(n, np.int64)
    first, finish = np.full(n, np.nan), np.full(n, np.nan)
    rejected = np.zeros(n, np.int64)
    try:
        hook = None if progress is None else (lambda now, i: progress(i / max(n, 1)))
        per = fastcore.core().run_pool(tuple(fastcore.engine_spec(e) for e in engines), arrivals, prompts, outputs,
                                       code, picks, d, float(cfg.report_delay_s), float(horizon), fastcore.RING,
                                       replica, first, finish, rejected, hook)
    except RuntimeError as exc:  # an impossible plan: a bug, as in Engine.step
        raise InternalError(f"pool core: {exc}") from exc
    rc = cfg.base.run
    results, parts = [], []
    for j, (engine, (ends, tokens, violations, _in_engine, now)) in enumerate(zip(engines, per, strict=True)):
        idx = np.flatnonzero(replica == j)
        parts.append(idx)
        sub = _subset(requests, idx)
        engine.violations += violations
        last = float(sub.arrival_time[-1]) if len(idx) else 0.0
        result = Result(engine.scheduler.name, engine.token_budget, max(now, last) if rc.drain else horizon,
                        sub.arrival_time, sub.num_prompt_tokens, sub.num_output_tokens, first[idx], finish[idx],
                        rejected[idx].astype(bool), np.frombuffer(ends, dtype=np.float64),
                        np.frombuffer(tokens, dtype=np.int64), engine.violations)
        result.meta["method"] = "fast"
        results.append(result)
    return replica, results, parts


def _dynamic(cfg: ClusterConfig, router: Router, engines, requests: Requests, session: np.ndarray, horizon: float,
             progress: Callable[[float], None] | None = None):
    """The event loop of a dynamic router (module note)."""
    rc = cfg.base.run
    n_rep = len(engines)
    steppers = [Stepper(e, method=rc.method) for e in engines]
    view = View(list(router.capacities))
    delay = cfg.report_delay_s
    arrivals = requests.arrival_time.tolist()
    prompts = requests.num_prompt_tokens.tolist()
    outputs = requests.num_output_tokens.tolist()
    sessions = session.tolist()
    replica = np.empty(len(arrivals), dtype=np.int64)
    # perf: admissions are buffered per replica and handed over in one admit() call before its next
    # advance (an admit() call costs ~50 µs of checks; a request, with the buffer, ~1 µs)
    pending: list[list[int]] = [[] for _ in range(n_rep)]
    mine: list[list[int]] = [[] for _ in range(n_rep)]     # global index of each replica's local request id
    clock = [0.0] * n_rep
    holding = [0] * n_rep      # requests admitted and not yet finished (what the engine really holds)
    reports: list[tuple[float, int, int, int]] = []   # (time, seq, replica, tokens) of finishes not yet seen
    seq = 0
    first: list[dict[int, float]] = [{} for _ in range(n_rep)]
    finish: list[dict[int, float]] = [{} for _ in range(n_rep)]
    rejected: list[list[int]] = [[] for _ in range(n_rep)]
    ends: list[list[np.ndarray]] = [[] for _ in range(n_rep)]
    tokens: list[list[np.ndarray]] = [[] for _ in range(n_rep)]
    memory = [e.kv is not None for e in engines]
    victims = [_watch_preemptions(e) if m else {} for e, m in zip(engines, memory)]

    def advance(j: int, until: float) -> None:
        nonlocal seq
        s = steppers[j]
        if pending[j]:
            idx = pending[j]
            s.admit([arrivals[i] for i in idx], [prompts[i] for i in idx], [outputs[i] for i in idx])
            mine[j].extend(idx)
            pending[j] = []
        a = s.advance(until)
        clock[j] = a.now
        if len(a.batch_end_time):
            ends[j].append(a.batch_end_time)
            tokens[j].append(a.batch_tokens)
        local = mine[j]
        done = a.finished.tolist()
        if done:
            holding[j] -= len(done)
            first[j].update(zip(done, a.first_token_time.tolist()))
            finish[j].update(zip(done, a.finish_time.tolist()))
            for rid, t in zip(done, a.finish_time.tolist()):
                i = local[rid]
                heapq.heappush(reports, (t, seq, j, prompts[i] + outputs[i]))
                seq += 1
        for rid in a.rejected.tolist():   # turned away at admission: the router hears at once
            holding[j] -= 1
            rejected[j].append(rid)
            i = local[rid]
            heapq.heappush(reports, (arrivals[i], seq, j, prompts[i] + outputs[i]))
            seq += 1
        if memory[j]:   # the blocks of its last batch; an emptied replica holds none
            e = s.engine
            view.kv_use[j] = (e.kv_series[-1] / max(e.kv.usable, 1)) if e.kv_series and holding[j] else 0.0

    in_flight, outstanding = view.in_flight, view.outstanding_tokens
    choose, candidates = router.choose, router.candidates
    everyone = range(n_rep)
    for i, t in enumerate(arrivals):
        if progress is not None and not i & 4095:
            progress(i / len(arrivals))
        seen = t - delay
        wanted = candidates()
        for j in everyone if wanted is None else wanted:
            if holding[j] and clock[j] < seen:
                advance(j, seen)
        while reports and reports[0][0] <= seen:   # (a replica refreshed late reports its past finishes now)
            _, _, j, work = heapq.heappop(reports)
            in_flight[j] -= 1
            outstanding[j] -= work
        j = choose(view, prompts[i], outputs[i], sessions[i])
        replica[i] = j
        pending[j].append(i)
        holding[j] += 1
        in_flight[j] += 1
        outstanding[j] += prompts[i] + outputs[i]
    results, parts = [], []
    for j, engine in enumerate(engines):
        advance(j, horizon)
        idx = np.asarray(mine[j], dtype=np.int64)
        parts.append(idx)
        results.append(_replica_result(engine, steppers[j], _subset(requests, idx), first[j], finish[j], rejected[j],
                                       ends[j], tokens[j], horizon, rc.drain, victims[j]))
    return replica, results, parts


def _watch_preemptions(engine) -> dict:
    """rid -> Request of every request ``engine`` preempts (its ``_preempt`` wrapped on this instance).
    Stepper reports no per-request preemptions; a request recomputes only after a preemption, so
    these objects give every nonzero preemption and recompute count of the run."""
    seen: dict = {}
    preempt = engine._preempt

    def watched(victims):
        victims = list(victims)
        for v in victims:
            seen[v.rid] = v
        return preempt(victims)

    engine._preempt = watched
    return seen


def _replica_result(engine, stepper: Stepper, requests: Requests, first: dict, finish: dict, rejected: list,
                    ends: list, tokens: list, horizon: float, drain: bool, victims: dict | None = None) -> Result:
    """The :class:`Result` simulate() would give for this replica's requests (Stepper's contract)."""
    n = len(requests)
    ft, fin = np.full(n, np.nan), np.full(n, np.nan)
    rids, times = stepper.in_engine()
    ft[rids] = times
    if first:
        k = np.fromiter(first.keys(), np.int64, len(first))
        ft[k] = np.fromiter(first.values(), np.float64, len(first))
        fin[k] = np.fromiter((finish[r] for r in first), np.float64, len(first))
    rej = np.zeros(n, dtype=bool)
    rej[rejected] = True
    be = np.concatenate(ends) if ends else np.zeros(0)
    bt = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
    last = float(requests.arrival_time[-1]) if n else 0.0
    result = Result(engine.scheduler.name, engine.token_budget, max(stepper.now, last) if drain else horizon,
                    requests.arrival_time, requests.num_prompt_tokens, requests.num_output_tokens, ft, fin, rej, be,
                    bt, engine.violations)
    if engine.kv is not None:   # stepped with memory: the reference loop (the engine kept its series)
        kv = engine.kv
        preemptions, recomputed = np.zeros(n, np.int64), np.zeros(n, np.int64)
        for rid, r in (victims or {}).items():
            preemptions[rid], recomputed[rid] = r.preemptions, r.recomputed
        result.kv = KVRecord(kv.blocks, kv.block_size, kv.policy, np.asarray(engine.kv_starts, dtype=float),
                             np.asarray(engine.kv_series, dtype=np.int64), np.asarray(engine.kv_waste, dtype=np.int64),
                             preemptions, recomputed, engine.memory_limited)
    result.meta["method"] = stepper.method
    return result


__all__ = ["PoolResult", "ROUTING_STREAM", "build_router", "capacities_of", "simulate_pool"]
