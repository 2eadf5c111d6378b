"""The event loop of a network of engines and delay stations (paper §5).

Each engine is a single-engine :class:`~llmqueue.core.engine.Engine` used through its public API,
with the same conventions as :func:`llmqueue.core.simulator.simulate`: batches run back to back,
a request arriving during a batch waits for the next batch boundary, one arriving exactly at a
boundary joins that batch's planning, an idle engine starts a batch at the next arrival.
A delay station is an infinite server: each visit waits its own sampled time.

The loop is a heap of plain tuples ``(time, seq, kind, payload)``; ``seq`` breaks ties in
insertion order, so a run is deterministic.  All events at one time are handled before any idle
engine starts a batch at that time.  Jobs are sampled whole up front
(:meth:`~llmqueue.network.routes.Route.sample`), so every policy sees the same jobs.  A
sub-request gets the next id of one counter when it is admitted to an engine, so ids follow
the order of arrival at each engine (the FCFS order the schedulers use).

Horizon: batches start only before ``horizon_s``; events up to it are handled (a batch
running at the horizon still completes its tokens, as in the single-engine simulator).

KV memory: an engine with ``kv_blocks`` gets its :class:`~llmqueue.model.kv.KVCache`, with the
single engine's rules (preemption, recompute, rejection of a visit larger than the cache); such
a network runs on this loop (the compiled network core has no memory).

Prefix caching (``prefix_caching``; docs/network.md, "Prefix caching in networks"): each branch
of a job carries its context as content spans (the previous LLM visit's spans and its own span,
``own_key``); a visit with ``add_previous_context`` at an engine with prefix caching gets them as
its ``content``, so it finds the previous visit's full blocks if they are still cached there.

Pools (an engine with ``replicas``; docs/network.md, "Pools as engines"): each replica is an engine of
its own (the loop's engines are the replicas, node by node), and the node's router picks one at each
sub-request's admission (:class:`PoolRouter`), the job being the session.  Only this loop runs pools.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import time as _time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from llmqueue.cluster.routers import RoundRobin, Random, View
from llmqueue.cluster.sim import ROUTING_STREAM
from llmqueue.core.engine import Engine
from llmqueue.errors import ConfigError
from llmqueue.network import fast
from llmqueue.network.analysis import NetworkAnalysis, analyze_network, pool_router
from llmqueue.network.model import FCFS, MAX_PRESSURE, PRIORITY, Network
from llmqueue.network.policies import ClassPriority, GroupedScheduler, MaxPressure
from llmqueue.network.routes import Segment
from llmqueue.model.kv import check_content, own_key
from llmqueue.model.request import Request
from llmqueue.schedulers import make_scheduler
from llmqueue.core.simulator import BATCH_COLUMNS, KVRecord, Result
from llmqueue.model.workload import make_arrivals

ARRIVAL, BATCH_END, DELAY_END = 0, 1, 2
Jobs = list[list[tuple[float, Segment, int]]]   # per class: (entry time, root segment, total tokens)


class SubRequest(Request):
    """A request for one hop of a job at one engine."""

    __slots__ = ("buffer", "covered", "group", "hop", "job", "phys", "spans", "token")


class Job:
    __slots__ = ("cls", "entry_time", "exit_time", "index", "rejected", "total_tokens")

    def __init__(self, index: int, cls: int, entry_time: float, total_tokens: int) -> None:
        self.index = index
        self.cls = cls
        self.entry_time = entry_time
        self.exit_time: float | None = None
        self.total_tokens = total_tokens
        self.rejected = False


class _Token:
    """Where one branch of a job is: its segment, the next visit, and the join it reports to; with
    ``add_previous_context`` hops also which branch of that join it is and the job's context so far
    as content spans (``spans``: the previous LLM visit's whole sequence, docs/network.md)."""

    __slots__ = ("branch", "job", "join", "pos", "segment", "spans")

    def __init__(self, job: Job, segment: Segment, join: _Join | None, branch: int = 0, spans: tuple = ()) -> None:
        self.job, self.segment, self.pos, self.join = job, segment, 0, join
        self.branch, self.spans = branch, spans


class _Join:
    __slots__ = ("branch", "parent", "remaining", "segment", "spans")

    def __init__(self, remaining: int, segment: Segment, parent: _Join | None, branch: int = 0) -> None:
        self.remaining, self.segment, self.parent = remaining, segment, parent
        self.branch = branch                 # the forking branch's place in its own join
        self.spans: list[tuple] = [()] * remaining   # each branch's context when it arrives, in fork order


def generate_jobs(net: Network, seed: int, horizon_s: float) -> Jobs:
    """Every class's jobs arriving in (0, horizon_s], routes sampled (independent streams per class)."""
    jobs: Jobs = []
    for k, (cls, route) in enumerate(zip(net.classes, net.routes)):
        seq = np.random.SeedSequence([int(seed), k])
        arrival_seq, route_seq = seq.spawn(2)
        process = make_arrivals({**cls.arrivals.to_dict(), "rate": net.rates[k]}, field=cls.field)
        times = process.sample(np.random.default_rng(arrival_seq), horizon_s=horizon_s).tolist()
        streams = route.streams(route_seq)
        jobs.append([(t, *route.sample(streams)) for t in times])
    return jobs


def buffers_of(net: Network) -> dict[tuple[int, int], int]:
    """Global buffer id of every (class, engine hop)."""
    ids: dict[tuple[int, int], int] = {}
    for k, cls in enumerate(net.classes):
        for h in cls.hops:
            if h.is_engine:
                ids[(k, h.index)] = len(ids)
    return ids


def check_caches(net: Network, analysis: NetworkAnalysis) -> None:
    """An engine's KV cache must hold a visit of mean size (prompt, growth included, + output) at each
    of its hops, as a single engine's must hold a request of mean size: else most visits there would
    be rejected (a larger visit is rejected, and its job counted as rejected).  A pool: every replica's."""
    for j, node in enumerate(net.engines):
        worst = None
        for k, cls in enumerate(net.classes):
            load = analysis.classes[k]
            for h in cls.hops:
                if h.engine == j and load.visits[h.index] > 0:
                    mean = float(load.tokens[h.index] / load.visits[h.index])
                    if worst is None or mean > worst[0]:
                        worst = (mean, cls, h)
        if worst is None:
            continue
        mean, cls, h = worst
        size = math.ceil(round(mean, 6))
        for kv in [r.kv for r in node.replicas if r.kv is not None]:
            if not kv.fits(size, 0):
                raise ConfigError(f"engines[{j}].kv_blocks", kv.blocks,
                                  f"at least {kv.blocks_for(size) + 1} blocks of {kv.block_size} tokens: the cache must "
                                  f"hold a visit of mean size ({size} tokens, prompt + output, at hop {h.id!r} of class "
                                  f"{cls.name!r}, prompt growth included; block 0 is reserved); larger visits are "
                                  "rejected and their jobs counted as rejected")


def build_engines(net: Network, analysis: NetworkAnalysis, counts: list[int]) -> list[Engine]:
    """One Engine per [[engines]] entry (a pool: one per replica, node by node), its scheduler wrapped
    by the engine's policy, its KV cache (``kv_blocks``) checked against the mean visit (:func:`check_caches`)."""
    check_caches(net, analysis)
    buffers = buffers_of(net)
    engines = []
    for j, spec in ((j, r) for j, node in enumerate(net.engines) for r in node.replicas):
        scheduler = make_scheduler(spec.scheduler, **spec.options)
        if spec.policy != FCFS and scheduler.program is not None and scheduler.program.load is not None:
            raise ConfigError(f"engines[{j}].scheduler", spec.scheduler,
                              f"a scheduler without a load rule under policy {spec.policy!r} ({spec.scheduler} "
                              "chooses each batch's load from the whole engine's queues, not group by group); "
                              "or policy 'fcfs'")
        local = [(k, h) for (k, h) in buffers if net.classes[k].hops[h].engine == j]
        if spec.policy == PRIORITY:
            rank = {k: i for i, k in enumerate(spec.class_priority)}
            n = len(spec.class_priority)
            scheduler = ClassPriority(scheduler, {(k, h): rank.get(k, n) for k, h in local}, n + 1, kv=spec.kv)
        elif spec.policy == MAX_PRESSURE:
            group_of = {kh: g for g, kh in enumerate(local)}
            downstream, mean_tokens = [], []
            for k, h in local:
                load = analysis.classes[k]
                downstream.append([(buffers[(k, t)], p) for t, p in load.succ.get(h, {}).items()])
                visits = load.visits[h]
                mean_tokens.append(load.tokens[h] / visits if visits > 0 else 1.0)
            scheduler = MaxPressure(scheduler, group_of, [buffers[kh] for kh in local], downstream, mean_tokens,
                                    counts, kv=spec.kv)
        engines.append(Engine(scheduler, spec.token_budget, spec.batch_time, spec.max_batch_requests, spec.kv))
    return engines


@dataclass
class NetworkResult:
    """What a network run recorded.  Sub-request arrays are indexed by sub-request id."""

    network: Network
    analysis: NetworkAnalysis
    end_time: float
    engines: list[Engine]
    sub_engine: np.ndarray
    sub_class: np.ndarray
    sub_hop: np.ndarray
    sub_job: np.ndarray
    arrival_time: np.ndarray             # admission at the engine
    num_prompt_tokens: np.ndarray
    num_output_tokens: np.ndarray
    first_token_time: np.ndarray
    finish_time: np.ndarray
    rejected: np.ndarray
    batches: list[dict[str, np.ndarray]]  # per engine, BATCH_COLUMNS + duration
    job_class: np.ndarray
    job_entry_time: np.ndarray
    job_exit_time: np.ndarray            # NaN: not yet (or rejected)
    job_tokens: np.ndarray
    job_rejected: np.ndarray
    seed: int = 0
    wall_s: float = 0.0
    meta: dict = field(default_factory=dict)
    kv: list[KVRecord | None] = field(default_factory=list)   # per engine with kv_blocks (empty: none has)
    # pools (docs/network.md, "Pools as engines"); None when no engine is a pool.  The loop's engines are
    # the replicas, node by node ("physical" engines): node j's are replica_of[j], sub-request i ran on
    # sub_phys[i], and replica_engines / replica_batches / replica_kv are indexed by physical engine.
    # Then engines[j] is node j's first replica, batches[j] its replicas' batches merged in time order, and
    # kv[j] its replica's record for a pool of one (None for a larger pool: see its replicas').
    replica_of: list[list[int]] | None = None
    sub_phys: np.ndarray | None = None
    replica_engines: list[Engine] | None = None
    replica_batches: list[dict[str, np.ndarray]] | None = None
    replica_kv: list[KVRecord | None] | None = None

    def _physical(self) -> tuple[list[Engine], list[dict], list, np.ndarray]:
        if self.replica_of is None:
            return self.engines, self.batches, self.kv, self.sub_engine
        return self.replica_engines, self.replica_batches, self.replica_kv, self.sub_phys

    @property
    def violations(self) -> int:
        """Work-conservation violations (Eqs. 8–9) over every engine, each replica of a pool included."""
        return int(sum(e.violations for e in self._physical()[0]))

    def is_pool(self, j: int) -> bool:
        return self.replica_of is not None and self.network.engines[j].pool is not None

    def replica_result(self, j: int, r: int) -> Result:
        """Replica r of pool node j as a single-engine :class:`Result`: its visits and its batches."""
        p = self.replica_of[j][r]
        m = self.sub_phys == p
        b = self.replica_batches[p]
        engine = self.replica_engines[p]
        return Result(scheduler=engine.scheduler.name, token_budget=engine.token_budget, end_time=self.end_time,
                      arrival_time=self.arrival_time[m], num_prompt_tokens=self.num_prompt_tokens[m],
                      num_output_tokens=self.num_output_tokens[m], first_token_time=self.first_token_time[m],
                      finish_time=self.finish_time[m], rejected=self.rejected[m], batch_end_time=b["end_time"],
                      batch_tokens=b["num_prefill_tokens"] + b["num_decode_tokens"], violations=engine.violations,
                      batches=b, kv=self.replica_kv[p] if self.replica_kv else None)

    def engine_result(self, j: int) -> Result:
        """Engine j's sub-requests and batches as a single-engine :class:`Result` (for its metrics); a pool
        node's: every visit, its replicas' batches in time order (a pool of one: its replica's own)."""
        if self.is_pool(j):
            if len(self.replica_of[j]) == 1:
                return self.replica_result(j, 0)
            return self._pool_result(j)
        m = self.sub_engine == j
        b = self.batches[j]
        engine = self.engines[j]
        return Result(scheduler=engine.scheduler.name, token_budget=engine.token_budget, end_time=self.end_time,
                      arrival_time=self.arrival_time[m], num_prompt_tokens=self.num_prompt_tokens[m],
                      num_output_tokens=self.num_output_tokens[m], first_token_time=self.first_token_time[m],
                      finish_time=self.finish_time[m], rejected=self.rejected[m], batch_end_time=b["end_time"],
                      batch_tokens=b["num_prefill_tokens"] + b["num_decode_tokens"], violations=engine.violations,
                      batches=b, kv=self.kv[j] if self.kv else None)

    def _pool_result(self, j: int) -> Result:
        """The pool as one system, as llmqueue.cluster.run.merged_result: recomputed tokens are no progress."""
        m = self.sub_engine == j
        phys = self.replica_of[j]
        b = self.batches[j]
        tokens = b["num_prefill_tokens"] + b["num_decode_tokens"]
        if self.replica_kv and any(self.replica_kv[p] is not None for p in phys):
            tokens = tokens - b["recomputed"]
        names = {self.replica_engines[p].scheduler.name for p in phys}
        return Result(scheduler=names.pop() if len(names) == 1 else "pool",
                      token_budget=int(sum(self.replica_engines[p].token_budget for p in phys)), end_time=self.end_time,
                      arrival_time=self.arrival_time[m], num_prompt_tokens=self.num_prompt_tokens[m],
                      num_output_tokens=self.num_output_tokens[m], first_token_time=self.first_token_time[m],
                      finish_time=self.finish_time[m], rejected=self.rejected[m], batch_end_time=b["end_time"],
                      batch_tokens=tokens, violations=int(sum(self.replica_engines[p].violations for p in phys)),
                      batches={k: v for k, v in b.items() if k != "recomputed"})

    def total_result(self) -> Result:
        """The whole network as one queue of jobs: backlog = unprocessed tokens of every job in it.

        A job brings all its tokens (every hop's prompt and output, sampled at entry) when it
        enters; every engine's batches take them away.  Rejected jobs count as never arrived
        (the few tokens they were served before the rejection are not subtracted back).  With KV
        memory, tokens computed again after a preemption take nothing away (no progress).  With prefix
        caching, the tokens a visit finds cached at its first admission are work the job never brings
        (as one engine's backlog, metrics._Backlog): they leave the job's tokens.
        """
        engines, batches, kvs, sub_engine = self._physical()   # a pool: each replica's batches
        ends = np.concatenate([b["end_time"] for b in batches])
        tokens = np.concatenate([b["num_prefill_tokens"] + b["num_decode_tokens"]
                                 - (0 if not kvs or kvs[j] is None else kvs[j].batch_recomputed)
                                 for j, b in enumerate(batches)])
        by_end = np.argsort(ends, kind="stable")
        n = len(self.job_entry_time)
        work = self.job_tokens
        hits = [(j, r.first_hit_tokens) for j, r in enumerate(kvs or [])
                if r is not None and r.first_hit_tokens is not None]
        if hits:
            work = work.copy()
            for j, first in hits:
                np.subtract.at(work, self.sub_job[sub_engine == j], first)
        return Result(scheduler="network", token_budget=0, end_time=self.end_time,
                      arrival_time=self.job_entry_time, num_prompt_tokens=work,
                      num_output_tokens=np.zeros(n, dtype=np.int64), first_token_time=np.full(n, np.nan),
                      finish_time=self.job_exit_time, rejected=self.job_rejected, batch_end_time=ends[by_end],
                      batch_tokens=tokens[by_end], violations=sum(e.violations for e in engines))


class PoolRouter:
    """A pool node's router inside the network loop (docs/network.md, "Pools as engines").

    It decides at each sub-request's admission at the pool, from what a real router sees
    (:class:`~llmqueue.cluster.routers.View`): the visits it sent and their prompt + output tokens, less
    the finishes reported by now − ``report_delay_s``; with memory, each replica's share of KV blocks in
    use at its last batch started by then.  The job's index is the session (affinity keeps a job's
    hops at the pool on one replica).  Round robin and random decide in order of arrival at the pool
    from blocks of their own ``assign``; other static routers (affinity, one's own) are asked one
    visit at a time.  Every decision draws from the node's routing stream
    ``default_rng([seed, ROUTING_STREAM, j])`` (llmqueue.cluster.sim's stream, one per pool node)."""

    def __init__(self, spec, j: int, seed: int, engines: list[Engine]) -> None:
        self.router = pool_router(spec, np.random.default_rng([int(seed), ROUTING_STREAM, j]))
        self.n = len(engines)
        self.engines = engines
        self.field = f"engines[{j}].router"
        self.name = spec.pool.router
        self.delay = spec.pool.report_delay_s
        self.view = View(list(self.router.capacities))
        self.reports: list[tuple[float, int, int, int]] = []   # (time, seq, replica, tokens) not yet seen
        self.seq = 0
        self.static = self.router.static
        self.blocked = isinstance(self.router, (RoundRobin, Random))
        self.block: list[int] = []
        self.next = 0
        self.memory = [e.kv is not None for e in engines]

    def route(self, r: SubRequest, session: int, now: float) -> int:
        """The replica (0..N−1) of a sub-request admitted at ``now``."""
        if self.static:
            if self.blocked:   # their decisions depend only on the order of arrival (and the stream)
                if self.next >= len(self.block):
                    z = np.zeros(self.n * 1024, dtype=np.int64)   # a multiple of N: round robin's turns carry on
                    self.block = np.asarray(self.router.assign(z, z, z), dtype=np.int64).tolist()
                    self.next = 0
                j = self.block[self.next]
                self.next += 1
            else:
                one = lambda x: np.array([x], dtype=np.int64)
                j = int(np.asarray(self.router.assign(one(r.num_prompt_tokens), one(r.num_output_tokens),
                                                      one(session)))[0])
        else:
            view, seen = self.view, now - self.delay
            reports = self.reports
            while reports and reports[0][0] <= seen:
                _, _, k, work = heapq.heappop(reports)
                view.in_flight[k] -= 1
                view.outstanding_tokens[k] -= work
            for k, e in enumerate(self.engines):
                if self.memory[k]:   # the blocks of its last batch started by `seen`; an emptied replica holds none
                    i = bisect.bisect_right(e.kv_starts, seen) - 1
                    view.kv_use[k] = e.kv_series[i] / max(e.kv.usable, 1) if i >= 0 and view.in_flight[k] else 0.0
            j = self.router.choose(view, r.num_prompt_tokens, r.num_output_tokens, session)
            view.in_flight[j] += 1
            view.outstanding_tokens[j] += r.num_prompt_tokens + r.num_output_tokens
        if not (isinstance(j, (int, np.integer)) and 0 <= j < self.n):
            raise ConfigError(self.field, self.name, f"a router whose decisions are replica indices 0..{self.n - 1}")
        return int(j)

    def finished(self, j: int, r: SubRequest, t: float) -> None:
        """Replica j reports ``r`` finished (or turned away) at ``t``."""
        if not self.static:
            heapq.heappush(self.reports, (t, self.seq, j, r.num_prompt_tokens + r.num_output_tokens))
            self.seq += 1


class _Simulation:
    def __init__(self, net: Network, analysis: NetworkAnalysis, seed: int | None = None) -> None:
        self.net = net
        self.buffer = buffers_of(net)
        self.counts = [0] * len(self.buffer)
        self.engines = build_engines(net, analysis, self.counts)   # a pool: one per replica, node by node
        self.first, self.replica_of, self.node_of = [], [], []
        for j, node in enumerate(net.engines):
            self.first.append(len(self.node_of))
            self.replica_of.append(list(range(len(self.node_of), len(self.node_of) + len(node.replicas))))
            self.node_of.extend([j] * len(node.replicas))
        seed = net.seed if seed is None else seed
        self.routers = [None if node.pool is None else
                        PoolRouter(node, j, seed, [self.engines[p] for p in self.replica_of[j]])
                        for j, node in enumerate(net.engines)]
        self.pools = any(r is not None for r in self.routers)
        self.grouped = [e.scheduler if isinstance(e.scheduler, GroupedScheduler) else None for e in self.engines]
        self.busy = [False] * len(self.engines)
        self.records: list[list[tuple]] = [[] for _ in self.engines]
        self.subs: list[SubRequest] = []
        self.jobs: list[Job] = []
        self.heap: list[tuple] = []
        self.seq = itertools.count()
        # add_previous_context: follow each branch's context as content spans (docs/network.md)
        self.track = any(h.context for c in net.classes for h in c.hops)
        self.prefix = [spec.prefix_caching for spec in net.engines]

    def advance(self, token: _Token, now: float) -> None:
        """Move a branch on from where it is: to its next visit, a fork, its join, or out."""
        job = token.job
        while not job.rejected:
            seg = token.segment
            if token.pos < len(seg.visits):
                visit = seg.visits[token.pos]
                token.pos += 1
                hop = visit.hop
                if hop.engine is None:
                    heapq.heappush(self.heap, (now + visit.delay_duration, next(self.seq), DELAY_END, token))
                    return
                r = SubRequest(len(self.subs), now, visit.num_prompt_tokens, visit.num_output_tokens)
                r.job, r.token, r.hop = job, token, hop
                if self.track:
                    spans = token.spans if hop.context else ()
                    r.spans = spans
                    r.covered = sum(n for _, n in spans)
                    if spans and self.prefix[hop.engine]:   # its prompt starts with the context's tokens
                        if self.engines[hop.engine].checks:
                            check_content(spans, r.num_prompt_tokens - 1, "visit content")
                        r.content = spans
                r.buffer = self.buffer[(job.cls, hop.index)]
                self.subs.append(r)
                p = self.first[hop.engine]
                router = self.routers[hop.engine]
                if router is not None:   # a pool: its router picks the replica (the job is the session)
                    p += router.route(r, job.index, now)
                r.phys = p
                grouped = self.grouped[p]
                if grouped is not None:
                    r.group = grouped.group_of[(job.cls, hop.index)]
                if self.engines[p].admit(r):
                    self.counts[r.buffer] += 1
                    if grouped is not None:
                        grouped.admitted(r)
                else:
                    if router is not None:   # turned away: the router hears at once
                        router.finished(p - self.first[hop.engine], r, now)
                    job.rejected = True
                return
            if seg.branches:
                join = _Join(len(seg.branches), seg.join, token.join, token.branch)
                for i, branch in enumerate(seg.branches):
                    self.advance(_Token(job, branch, join, i, token.spans), now)
                return
            join = token.join
            if join is None:
                job.exit_time = now
                return
            join.remaining -= 1
            if self.track:
                join.spans[token.branch] = token.spans
            if join.remaining:
                return
            spans = tuple(span for branch in join.spans for span in branch) if self.track else ()
            token = _Token(job, join.segment, join.parent, join.branch, spans)

    def start(self, j: int, now: float) -> None:
        engine = self.engines[j]
        s = engine.step(now)
        if self.grouped[j] is not None:
            self.grouped[j].applied(s.plan, s.finished)
            if engine.checks:   # LLMQUEUE_CHECKS: the groups still mirror the engine
                self.grouped[j].check(engine.state)
        plan = s.plan
        router = self.routers[self.node_of[j]] if self.pools else None
        if router is not None:   # the batch's finishes, reported when it ends
            for r in s.finished:
                router.finished(j - self.first[self.node_of[j]], r, s.end_time)
        self.records[j].append((s.start_time, s.end_time, plan.num_prefill_tokens, len(plan.decode),
                                plan.num_requests, s.demand, s.bound))
        self.busy[j] = True
        heapq.heappush(self.heap, (s.end_time, next(self.seq), BATCH_END, (j, s.finished)))

    def run(self, jobs: Jobs, horizon: float, progress: Callable[[float], None] | None) -> float:
        heap = self.heap
        for k, stream in enumerate(jobs):
            if stream:
                heapq.heappush(heap, (stream[0][0], next(self.seq), ARRIVAL, (k, 0)))
        now = 0.0
        steps, next_report = 0, 0
        engines, busy = self.engines, self.busy
        while heap and heap[0][0] <= horizon:
            now = heap[0][0]
            while heap and heap[0][0] == now:
                _, _, kind, payload = heapq.heappop(heap)
                if kind == ARRIVAL:
                    k, i = payload
                    entry, segment, total = jobs[k][i]
                    job = Job(len(self.jobs), k, entry, total)
                    self.jobs.append(job)
                    self.advance(_Token(job, segment, None), now)
                    if i + 1 < len(jobs[k]):
                        heapq.heappush(heap, (jobs[k][i + 1][0], next(self.seq), ARRIVAL, (k, i + 1)))
                elif kind == BATCH_END:
                    j, finished = payload
                    busy[j] = False
                    for r in finished:
                        self.counts[r.buffer] -= 1
                        if self.track:   # the context is now this visit's whole sequence
                            r.token.spans = (*r.spans, (own_key(r), r.num_prompt_tokens - r.covered
                                                        + r.num_output_tokens))
                        self.advance(r.token, now)
                else:
                    self.advance(payload, now)
            if now < horizon:
                for j, engine in enumerate(engines):
                    if not busy[j] and engine.has_work:
                        self.start(j, now)
                        steps += 1
            if progress is not None and steps >= next_report:
                progress(now)
                next_report = steps + 2000
        return now


METHODS = ("fast", "reference")


def simulate_network(net: Network, *, seed: int | None = None, horizon_s: float | None = None,
                     drain: bool | None = None, jobs: Jobs | None = None,
                     progress: Callable[[float], None] | None = None, method: str | None = None) -> NetworkResult:
    """Run the network (config values unless given); ``jobs`` replaces the sampled jobs.

    ``method`` (default: the config's ``run.method``): ``"fast"`` runs on the compiled core
    (:mod:`llmqueue.network.fast`) where it can (else the reference loop); ``"reference"`` runs
    this module's loop over :meth:`Engine.step`.
    Both give identical results; ``result.meta["method"]`` says which ran ("fast" or
    "reference (why)").  A network with an engine with ``kv_blocks`` always runs on the
    reference loop (the compiled network core has no KV memory): ``"fast"`` falls back, with the
    reason "KV memory: network runs with kv_blocks use the reference loop".
    """
    method = net.method if method is None else method
    if method not in METHODS:
        raise ConfigError("run.method", method, f"one of {', '.join(METHODS)}")
    started = _time.perf_counter()
    seed = net.seed if seed is None else seed
    horizon_s = net.horizon_s if horizon_s is None else horizon_s
    drain = net.drain if drain is None else drain
    analysis = analyze_network(net)
    horizon = float("inf") if drain else horizon_s
    sim = _Simulation(net, analysis, seed)
    why = fast.reason(sim.engines, net) if method == "fast" else "selected"
    if why is None:
        groups = fast.groups_of(sim.engines)
        if jobs is None and sim.track:   # the compiled sampler does not grow contexts: the same jobs from Python
            jobs = generate_jobs(net, seed, horizon_s)
        if jobs is None:
            flat = fast.sample(net, analysis, seed, horizon_s, sim.buffer, groups)
        else:
            flat = fast.Flat.from_jobs(jobs, sim.buffer, groups)
        last, arrays = fast.run(sim.engines, flat, len(sim.buffer), horizon, progress)
        end_time = max(last, horizon_s) if drain else horizon_s
        batches = [_batch_columns(rec) for rec in arrays.pop("batches")]
        result = NetworkResult(network=net, analysis=analysis, end_time=end_time, engines=sim.engines,
                               batches=batches, **arrays)
    else:
        if jobs is None:
            jobs = generate_jobs(net, seed, horizon_s)
        last = sim.run(jobs, horizon, progress)
        end_time = max(last, horizon_s) if drain else horizon_s
        result = _collect(sim, analysis, end_time)
    result.seed = seed
    result.meta["method"] = "fast" if why is None else f"reference ({why})"
    result.wall_s = _time.perf_counter() - started
    return result


def _batch_columns(cols: np.ndarray) -> dict[str, np.ndarray]:
    cols = np.asarray(cols, dtype=float).reshape(-1, len(BATCH_COLUMNS))
    b = {name: cols[:, i] if i < 2 else cols[:, i].astype(np.int64) for i, name in enumerate(BATCH_COLUMNS)}
    b["duration"] = b["end_time"] - b["start_time"]
    return b


def _collect(sim: _Simulation, analysis: NetworkAnalysis, end_time: float) -> NetworkResult:
    subs, jobs = sim.subs, sim.jobs
    nan = float("nan")
    batches = [_batch_columns(np.array(rec, dtype=float)) for rec in sim.records]
    rejected = np.zeros(len(subs), dtype=bool)
    for engine in sim.engines:
        rejected[[r.rid for r in engine.rejected]] = True
    kv: list[KVRecord | None] = []
    if any(e.kv is not None for e in sim.engines):
        for j, engine in enumerate(sim.engines):
            if engine.kv is None:
                kv.append(None)
                continue
            mine = [r for r in subs if r.phys == j]   # by id, as engine_result's arrays
            record = KVRecord(engine.kv.blocks, engine.kv.block_size, engine.kv.policy,
                              np.asarray(engine.kv_starts, dtype=float), np.asarray(engine.kv_series, dtype=np.int64),
                              np.asarray(engine.kv_waste, dtype=np.int64),
                              np.array([r.preemptions for r in mine], dtype=np.int64),
                              np.array([r.recomputed for r in mine], dtype=np.int64), engine.memory_limited)
            if engine.pool is not None:   # prefix caching: tokens found cached, per visit (docs/prefix_caching.md)
                first = engine.pool.first_hits
                record.hit_tokens = np.array([r.hit for r in mine], dtype=np.int64)
                record.first_hit_tokens = np.array([first.get(r.rid, 0) for r in mine], dtype=np.int64)
                record.prefix = engine.pool.stats()
            kv.append(record)
    engines, pools = sim.engines, {}
    if sim.pools:   # per node: its first replica, its replicas' batches merged, its replica's KV for a pool of one
        pools = {"replica_of": sim.replica_of, "sub_phys": np.array([r.phys for r in subs], dtype=np.int64),
                 "replica_engines": sim.engines, "replica_batches": batches, "replica_kv": kv}
        engines = [sim.engines[rs[0]] for rs in sim.replica_of]
        node_kv = [kv[rs[0]] if kv and len(rs) == 1 else None for rs in sim.replica_of]
        kv = node_kv if any(k is not None for k in node_kv) or kv else []
        batches = [batches[rs[0]] if len(rs) == 1 else _merged_batches([batches[p] for p in rs],
                                                                        [kv_of(pools, p) for p in rs])
                   for rs in sim.replica_of]
    return NetworkResult(
        network=sim.net, analysis=analysis, end_time=end_time, engines=engines,
        sub_engine=np.array([r.hop.engine for r in subs], dtype=np.int64),
        sub_class=np.array([r.job.cls for r in subs], dtype=np.int64),
        sub_hop=np.array([r.hop.index for r in subs], dtype=np.int64),
        sub_job=np.array([r.job.index for r in subs], dtype=np.int64),
        arrival_time=np.array([r.arrival_time for r in subs], dtype=float),
        num_prompt_tokens=np.array([r.num_prompt_tokens for r in subs], dtype=np.int64),
        num_output_tokens=np.array([r.num_output_tokens for r in subs], dtype=np.int64),
        first_token_time=np.array([nan if r.first_token_time is None else r.first_token_time for r in subs]),
        finish_time=np.array([nan if r.finish_time is None else r.finish_time for r in subs]),
        rejected=rejected, batches=batches,
        job_class=np.array([j.cls for j in jobs], dtype=np.int64),
        job_entry_time=np.array([j.entry_time for j in jobs], dtype=float),
        job_exit_time=np.array([nan if j.exit_time is None else j.exit_time for j in jobs]),
        job_tokens=np.array([j.total_tokens for j in jobs], dtype=np.int64),
        job_rejected=np.array([j.rejected for j in jobs], dtype=bool), kv=kv, **pools,
    )


def kv_of(pools: dict, p: int) -> KVRecord | None:
    kv = pools["replica_kv"]
    return kv[p] if kv else None


def _merged_batches(parts: list[dict[str, np.ndarray]], kvs: list[KVRecord | None]) -> dict[str, np.ndarray]:
    """A pool's replicas' batches in time order (stable: replica order at equal ends), with each batch's
    recomputed tokens (``recomputed``: 0 without memory)."""
    cols = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    cols["recomputed"] = np.concatenate([np.zeros(len(b["end_time"]), np.int64) if kv is None else kv.batch_recomputed
                                         for b, kv in zip(parts, kvs)])
    order = np.argsort(cols["end_time"], kind="stable")
    return {k: v[order] for k, v in cols.items()}
