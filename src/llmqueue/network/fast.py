"""A network run on the compiled core (paper §5; docs/architecture.md).

``_fastcore.run_network`` is the event loop of :mod:`llmqueue.network.sim` in C: the same heap of
(time, seq) events, the same routing of each branch of a job (visits, forks, joins, loops,
delay stations) and, at every engine, the same engine core as one engine (each policy's plan,
interpreted; class priority and max-pressure as group orders), so every batch, time and id is
what the reference loop gives, bit for bit (tests/test_golden.py, tests/test_network_core.py).
This module flattens the sampled jobs into arrays, describes each engine's policy, calls it, and
builds the :class:`~llmqueue.network.sim.NetworkResult`.

Flattened routes: a job's route is a tree of segments (:class:`~llmqueue.network.routes.Segment`);
segment s has visits ``seg_vstart[s] : + seg_vcount[s]`` and, if it ends in a fork, branches
``children[seg_bstart[s] : + seg_bcount[s]]`` joined by segment ``seg_join[s]``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llmqueue.core import fastcore
from llmqueue.core.engine import Engine
from llmqueue.errors import InternalError
from llmqueue.network.analysis import NetworkAnalysis
from llmqueue.network.model import Network
from llmqueue.network.policies import ClassPriority, GroupedScheduler, MaxPressure
from llmqueue.network.routes import Segment
from llmqueue.model.workload import make_arrivals

ORDER_STATIC, ORDER_PRESSURE = 0, 1   # the core's group orders (_fastcore.c)
#: Draws made ahead per stream: this many times the expected number (traffic equations), plus 64;
#: a stream that runs out is drawn twice as long and its class sampled again.  Tests set it to 0.
AHEAD = 1.25


def reason(engines: list[Engine], net: Network | None = None) -> str | None:
    """Why this network cannot run on the compiled core (None: it can).  A network with a pool of
    replicas (docs/network.md, "Pools as engines") runs on the reference loop: its router decides
    at each admission, which the compiled network core does not model."""
    pools = [f"{e.name}: {len(e.pool.replicas)} replica{'s' if len(e.pool.replicas) > 1 else ''}, "
             f"router {e.pool.router}"
             for e in (net.engines if net is not None else ()) if e.pool is not None]
    if pools:
        return f"pools run on the reference network simulator ({'; '.join(pools)})"
    with_prefix = [j for j, engine in enumerate(engines) if engine.kv is not None and engine.kv.prefix_caching]
    if with_prefix:   # the compiled cores have no prefix cache (docs/prefix_caching.md)
        which = ", ".join(map(str, with_prefix))
        return f"prefix caching: network runs with prefix_caching use the reference loop (engine {which})"
    with_kv = [j for j, engine in enumerate(engines) if engine.kv is not None]
    if with_kv:   # the compiled network core has no memory (the single-engine core has)
        which = ", ".join(map(str, with_kv))
        return f"KV memory: network runs with kv_blocks use the reference loop (engine {which})"
    if fastcore.unavailable() is not None:
        return fastcore.unavailable()
    for j, engine in enumerate(engines):
        scheduler = engine.scheduler
        inner = scheduler.inner if isinstance(scheduler, GroupedScheduler) else scheduler
        if isinstance(scheduler, GroupedScheduler) and type(scheduler) not in (ClassPriority, MaxPressure):
            return f"engine {j}: policy {scheduler.policy!r} has no compiled form"
        why = fastcore.policy_reason(inner, engine.batch_time)
        if why is not None:
            return f"engine {j}: {why}"
    return None


def _engine_spec(engine: Engine) -> tuple:
    """The tuple run_network reads for one engine (:func:`llmqueue.core.fastcore.engine_spec`), with
    the queue groups of a class-aware policy."""
    scheduler = engine.scheduler
    if not isinstance(scheduler, GroupedScheduler):
        return fastcore.engine_spec(engine)
    i64, f64 = np.int64, np.float64
    groups = len(scheduler.prefilling)
    order = ORDER_STATIC
    buffers = np.zeros(groups, i64)
    ds_start, ds_buf, ds_p = np.zeros(groups + 1, i64), np.zeros(0, i64), np.zeros(0, f64)
    inv = np.ones(groups, f64)
    if isinstance(scheduler, MaxPressure):
        order = ORDER_PRESSURE
        buffers = np.asarray(scheduler.buffers, i64)
        ds_start = np.cumsum([0, *(len(d) for d in scheduler.downstream)]).astype(i64)
        ds_buf = np.asarray([b for d in scheduler.downstream for b, _ in d], i64)
        ds_p = np.asarray([p for d in scheduler.downstream for _, p in d], f64)
        inv = np.asarray(scheduler.inv_tokens, f64)
    return fastcore.engine_spec(engine, scheduler.inner, (groups, order, buffers, ds_start, ds_buf, ds_p, inv))


class Flat:
    """The sampled jobs as arrays (see the module docstring): from sampled :class:`Segment` jobs
    (:meth:`from_jobs`), or sampled straight into arrays by the compiled sampler (:func:`sample`)."""

    def __init__(self, visits: tuple, v_hop: np.ndarray, segments: tuple, jobs: tuple, job_class: np.ndarray,
                 job_tokens: np.ndarray) -> None:
        i64 = np.int64
        self.visits = (*(np.asarray(a, i64) for a in visits[:5]), np.asarray(visits[5], np.float64))
        self.v_hop = np.asarray(v_hop, i64)
        self.segments = tuple(np.asarray(a, i64) for a in segments)
        self.jobs = (np.asarray(jobs[0], i64), np.asarray(jobs[1], np.float64), np.asarray(jobs[2], i64))
        self.job_class = np.asarray(job_class, i64)
        self.job_tokens = np.asarray(job_tokens, i64)
        self.engine_visits = int(np.count_nonzero(self.visits[0] >= 0))

    @classmethod
    def from_jobs(cls, jobs, buffer: dict[tuple[int, int], int], groups: list[dict | None]) -> Flat:
        """Flatten :func:`~llmqueue.network.sim.generate_jobs`' jobs (Python: ~1 µs a visit)."""
        v_engine: list[int] = []
        v_hop: list[int] = []
        v_prompt: list[int] = []
        v_output: list[int] = []
        v_buffer: list[int] = []
        v_group: list[int] = []
        v_delay: list[float] = []
        vstart: list[int] = []
        vcount: list[int] = []
        bstart: list[int] = []
        bcount: list[int] = []
        join: list[int] = []
        children: list[int] = []

        def add(seg: Segment, k: int) -> int:
            s = len(vstart)
            vstart.append(len(v_engine))
            vcount.append(len(seg.visits))
            bstart.append(0)
            bcount.append(len(seg.branches))
            join.append(-1)
            for v in seg.visits:
                hop = v.hop
                e = hop.engine
                v_hop.append(hop.index)
                v_prompt.append(v.num_prompt_tokens)
                v_output.append(v.num_output_tokens)
                v_delay.append(v.delay_duration)
                if e is None:
                    v_engine.append(-1)
                    v_buffer.append(0)
                    v_group.append(0)
                else:
                    v_engine.append(e)
                    v_buffer.append(buffer[(k, hop.index)])
                    g = groups[e]
                    v_group.append(0 if g is None else g[(k, hop.index)])
            if seg.branches:
                kids = [add(b, k) for b in seg.branches]
                bstart[s] = len(children)
                children.extend(kids)
                join[s] = add(seg.join, k)
            return s

        roots: list[int] = []
        entry: list[float] = []
        tokens: list[int] = []
        classes: list[int] = []
        starts = [0]
        for k, stream in enumerate(jobs):
            for t, root, total in stream:
                roots.append(add(root, k))
                entry.append(t)
                tokens.append(total)
                classes.append(k)
            starts.append(len(roots))
        return cls((v_engine, v_prompt, v_output, v_buffer, v_group, v_delay), v_hop,
                   (vstart, vcount, bstart, bcount, children, join), (roots, entry, starts), classes, tokens)


def groups_of(engines: list[Engine]) -> list[dict | None]:
    """Each engine's (class, hop) -> group map under a class-aware policy (None: one queue)."""
    return [e.scheduler.group_of if isinstance(e.scheduler, GroupedScheduler) else None for e in engines]


def sample(net: Network, analysis: NetworkAnalysis, seed: int, horizon_s: float,
           buffer: dict[tuple[int, int], int], groups: list[dict | None]) -> Flat:
    """The jobs :func:`~llmqueue.network.sim.generate_jobs` samples, drawn by the compiled sampler
    straight into arrays: the same arrival times, and each route's walk (Route.sampling_table) on
    the same random streams, drawn ahead in the chunks the Python walk draws them in."""
    core = fastcore.core()
    i64 = np.int64
    parts = []
    for k, (cls, route) in enumerate(zip(net.classes, net.routes, strict=True)):
        arrival_seq, route_seq = np.random.SeedSequence([int(seed), k]).spawn(2)
        process = make_arrivals({**cls.arrivals.to_dict(), "rate": net.rates[k]}, field=cls.field)
        times = np.asarray(process.sample(np.random.default_rng(arrival_seq), horizon_s=horizon_s), np.float64)
        streams = route.streams(route_seq)
        hops = route.hops
        h_engine = np.asarray([-1 if h.engine is None else h.engine for h in hops], i64)
        h_grow = np.asarray([bool(h.grow) for h in hops], i64)
        h_buffer = np.asarray([buffer.get((k, h.index), 0) for h in hops], i64)
        h_group = np.asarray([0 if h.engine is None or groups[h.engine] is None else groups[h.engine][(k, h.index)]
                              for h in hops], i64)
        visits = analysis.classes[k].visits
        ahead = {}  # stream key -> its draws so far (whole chunks of 1024, as routes._Stream draws them)

        def draw(key, want: int, streams=streams, ahead=ahead) -> np.ndarray:
            stream = streams[key]
            have = ahead.get(key, np.zeros(0))
            chunks = [stream.draw(stream.rng, 1024) for _ in range(max(1, -(-(want - len(have)) // 1024)))]
            ahead[key] = np.concatenate([have, *chunks])
            return ahead[key]

        n = len(times)
        for h in hops:
            want = int(n * AHEAD * float(visits[h.index])) + 64
            for kind in (("p", "o") if h.is_engine else ("d",)):
                draw((kind, h.index), want)
        draw("u", int(n * AHEAD * float(visits.sum())) + 64)
        table = route.sampling_table()
        while True:
            p = tuple(np.asarray(ahead.get(("p", h.index), np.zeros(0)), i64) for h in hops)
            o = tuple(np.asarray(ahead.get(("o", h.index), np.zeros(0)), i64) for h in hops)
            d = tuple(np.asarray(ahead.get(("d", h.index), np.zeros(0)), np.float64) for h in hops)
            out = core.sample_jobs(table, (h_engine, h_grow, h_buffer, h_group), (p, o, d, ahead["u"]),
                                   n)
            if not isinstance(out, int):
                break
            h, kind = divmod(out, 3)   # a stream ran out: draw as many again
            key = "u" if h == len(hops) else (("p", "o", "d")[kind], h)
            draw(key, 2 * len(ahead[key]))
        parts.append((times, out))
    return _combine(net, parts)


def _combine(net: Network, parts) -> Flat:
    """One Flat from each class's sampled arrays (segment and visit indices offset)."""
    i64 = np.int64
    cols = [[] for _ in range(7)]
    segs = [[] for _ in range(6)]
    roots, entry, tokens, cls, starts = [], [], [], [], [0]
    nv = ns = 0
    for k, (times, (visits, segments, root, total)) in enumerate(parts):
        v = [np.frombuffer(a, i64 if j < 6 else np.float64) for j, a in enumerate(visits)]
        g = [np.frombuffer(a, i64) for a in segments]
        for j in range(7):
            cols[j].append(v[j])
        vstart, vcount, bstart, bcount, children, join = g
        segs[0].append(vstart + nv)
        segs[1].append(vcount)
        segs[2].append(bstart + sum(len(c) for c in segs[4]))
        segs[3].append(bcount)
        segs[4].append(children + ns)
        segs[5].append(np.where(join >= 0, join + ns, -1))
        roots.append(np.frombuffer(root, i64) + ns)
        tokens.append(np.frombuffer(total, i64))
        entry.append(times)
        cls.append(np.full(len(times), k, i64))
        starts.append(starts[-1] + len(times))
        nv += len(v[0])
        ns += len(vstart)
    cat = np.concatenate
    v_engine, v_hop, v_prompt, v_output, v_buffer, v_group, v_delay = (cat(c) if c else np.zeros(0) for c in cols)
    return Flat((v_engine, v_prompt, v_output, v_buffer, v_group, v_delay), v_hop, tuple(cat(c) for c in segs),
                (cat(roots), cat(entry), starts), cat(cls), cat(tokens))


def run(engines: list[Engine], flat: Flat, num_buffers: int, horizon: float,
        progress: Callable[[float], None] | None) -> tuple[float, dict]:
    """Run the network on the compiled core; returns (time of the last event, the arrays)."""
    s = max(flat.engine_visits, 1)
    subs = tuple(np.zeros(s, np.int64) for _ in range(7)) + tuple(np.full(s, np.nan) for _ in range(3))
    n_jobs = len(flat.job_class)
    job_out = (np.zeros(n_jobs, np.int64), np.zeros(n_jobs, np.int64), np.full(n_jobs, np.nan))
    counts = np.zeros(max(num_buffers, 1), np.int64)
    try:
        last, nsub, njobs, per = fastcore.core().run_network(
            tuple(_engine_spec(e) for e in engines), flat.visits, flat.segments, flat.jobs, subs, job_out, counts,
            float(horizon), fastcore.RING, progress)
    except RuntimeError as exc:  # an impossible plan: a bug, as in Engine.step
        raise InternalError(f"network core: {exc}") from exc
    visit, job, _token, prompt, output, _group, rejected, arrival, first, finish = (a[:nsub] for a in subs)
    src = job_out[0][:njobs]
    batches = []
    for engine, (_ends, _tokens, detail, violations, _planned, in_engine, total_prefill) in zip(engines, per,
                                                                                              strict=True):
        engine.violations += violations   # the counters reference stepping leaves (not the queues)
        engine.num_in_engine = in_engine
        engine.state.total_prefill_left = total_prefill
        batches.append(np.frombuffer(detail, dtype=np.float64).reshape(-1, 7))
    return last, {
        "sub_engine": flat.visits[0][visit], "sub_class": flat.job_class[src][job], "sub_hop": flat.v_hop[visit],
        "sub_job": job, "arrival_time": arrival, "num_prompt_tokens": prompt, "num_output_tokens": output,
        "first_token_time": first, "finish_time": finish, "rejected": rejected.astype(bool), "batches": batches,
        "job_class": flat.job_class[src], "job_entry_time": flat.jobs[1][src], "job_exit_time": job_out[2][:njobs],
        "job_tokens": flat.job_tokens[src], "job_rejected": job_out[1][:njobs].astype(bool),
    }
