"""The fluid model of a network of token engines under static priority and FCFS (arXiv 2504.07347 §5.4).

**Fluid rates.**  At full budget engine e serves C_e = b_max / t(b_max) tokens/s
(:func:`llmqueue.analysis.capacity`, the paper's Theorem 2).  Each engine state s of a class's route
(a hop and its round counters, :mod:`llmqueue.network.routes`) is a *visit*; it is split into a
prefill buffer and a decode buffer at its engine, with m_b = E[tokens of that phase of the visit] / C_e
seconds of engine time per visit (prompt growth and context included: the traffic equations,
:mod:`llmqueue.network.analysis`).  A departure from the prefill buffer enters the decode buffer; a
departure from the decode buffer enters the next visits of the route (looking through delay
stations, which are instantaneous at fluid scale), with the expected multiplicities of the traffic
equations (a fork's branches count one each, a join's arriving branch 1/n).

**Policies as priority levels.**  At fluid scale an engine holding a positive amount of fluid has
more requests than its budget, so its scheduler's phase order is a strict priority: Sarathi serves
the running decodes first (decode above prefill) and fills its budget with prompt chunks.  Only
Sarathi is modelled (:data:`PHASE_ORDER` says why not Orca).
Each engine's buffers therefore form priority *levels*, highest first, served FCFS within a level:

* ``fcfs``: [every decode buffer], [every prefill buffer];
* ``priority``: per class in ``class_priority`` order (the unlisted classes together, last), its
  levels in the scheduler's phase order;
* ``max-pressure`` has no static levels: not modelled here (Dai & Lin 2005 prove max-pressure
  stable whenever ρ < 1 for the unbatched network; with token batches docs/network.md shows it by
  simulation).

**The trajectory** (:func:`fluid_path`) is exact and piecewise linear, event by event.  Each level
is a queue of *segments* — fluid that arrived while the level's inflow composition was constant —
so FCFS is exact: the head segment is served at the level's share of the engine, in the
composition it arrived with.  Between events every rate is constant; the rates at an event are the
fixed point of "each engine gives its time to its levels in priority order; a non-empty level takes
what is left; an empty level passes its inflow through while it fits".  An event is a head segment
running empty.  From a standard initial backlog (one visit's buffer holding fluid worth 1 token of
remaining work) the path either **drains** (stable, with the drain time), **grows** (the peaks of the
remaining work grow by a factor per cycle), or stays **undecided** within the event budget.  Dai
(1995): if the fluid model is stable (every fluid path drains), the stochastic network is stable.

**Virtual stations** (:func:`virtual_stations`).  Rybko & Stolyar (1992): in two engines under static
priority, a visit b at engine i and a visit c at engine j ≠ i such that every inflow of c comes from
buffers at i of lower priority than b (served only when b's buffers are empty) and every inflow of b
from buffers at j of lower priority than c cannot be served at the same time; their *virtual station*
has load λ_b m_b + λ_c m_c, and > 1 is unstable although every engine has ρ < 1.  Dai & Vande Vate
(2000) show for two-station fluid networks that these conditions with ρ < 1 are the whole stability
region of such priority networks; the trajectory checks it for any network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from llmqueue.network.model import FCFS, MAX_PRESSURE, PRIORITY, Network

PREFILL, DECODE = 0, 1
PHASE_NAMES = ("prefill", "decode")
#: the scheduler's phase order at fluid scale (more requests than budget): highest first.  Only Sarathi:
#: it serves every running decode and fills the rest of the budget with prompt chunks, so an engine with
#: work waiting runs full batches.  A prefill-first engine (Orca) serving only decodes gives each one
#: token per batch, below its budget while there are fewer decoders than b_max: the fluid limit misses
#: that, and fork-join with Orca diverges at ρ = 0.9 in simulation while its fluid model drains.
PHASE_ORDER = {"sarathi": (DECODE, PREFILL)}
DRAINS, GROWS, UNDECIDED = "drains", "grows", "undecided"
MAX_BUFFERS = 400
MAX_EVENTS = 4000
_TOL = 1e-11


class NotFluid(Exception):
    """The network is outside what the fluid model here covers (the message says why)."""


@dataclass(frozen=True)
class FluidModel:
    """The network's fluid buffers (two per visit: prefill, decode), their rates and levels."""

    names: tuple[str, ...]                    # "A.long.prefill" (with round counters where a loop has them)
    engine: np.ndarray                        # engine of each buffer
    work_s: np.ndarray                        # m_b: engine seconds per visit at full budget
    tokens: np.ndarray                        # tokens per visit of this phase
    visit: np.ndarray                         # the visit (class, state) each buffer belongs to
    visit_names: tuple[str, ...]              # "A.long"
    visit_class: np.ndarray
    arrivals: np.ndarray                      # exogenous visits/s into each buffer at the network's rates
    routing: np.ndarray                       # P[b, c]: expected visits into c per departure from b
    remaining_tokens: np.ndarray              # tokens from entering b until the job leaves
    levels: tuple[tuple[np.ndarray, ...], ...]   # per engine: buffer indices per level, highest first
    capacity: np.ndarray                      # C_e tokens/s
    engines: tuple[str, ...]
    level_of: np.ndarray = field(default=None)   # buffer -> its level's rank at its engine (0 highest)

    def scaled(self, alpha: float) -> FluidModel:
        """The same network with every arrival rate multiplied by alpha."""
        from dataclasses import replace

        return replace(self, arrivals=self.arrivals * alpha)

    @property
    def visit_rate(self) -> np.ndarray:
        """Visits/s through each buffer (the traffic equations at fluid scale): λ = α + Pᵀλ."""
        n = len(self.names)
        return np.linalg.solve(np.eye(n) - self.routing.T, self.arrivals)

    def rho(self) -> np.ndarray:
        load = self.visit_rate * self.work_s
        return np.bincount(self.engine, load, minlength=len(self.engines))


def engine_policies(net: Network) -> list[tuple[str, tuple[int, ...]]]:
    """(policy, class_priority) of each engine as configured."""
    return [(e.policy, tuple(e.class_priority)) for e in net.engines]


def fluid_model(net: Network, analysis, policies: list[tuple[str, tuple[int, ...]]] | None = None) -> FluidModel:
    """The fluid buffers of ``net`` under ``policies`` (default: as configured); NotFluid where the
    model does not apply (its message says why)."""
    policies = engine_policies(net) if policies is None else policies
    for j, (spec, (policy, _)) in enumerate(zip(net.engines, policies)):
        if policy == MAX_PRESSURE:
            raise NotFluid(f"engine {spec.name} runs max-pressure (no static priority levels)")
        if spec.scheduler not in PHASE_ORDER:
            raise NotFluid(f"engine {spec.name}'s scheduler {spec.scheduler!r} has no fluid phase order here "
                           f"(modelled: {', '.join(PHASE_ORDER)})")
        if spec.max_batch_requests is not None:
            raise NotFluid(f"engine {spec.name} has a request cap k_max (its batches need not be full at fluid "
                           "scale; paper §6)")
        pool = analysis.pools[j] if analysis.pools else None
        if pool is not None and len(pool.replicas) > 1 and pool.kind != "pooled":
            raise NotFluid(f"engine {spec.name} is a pool under router {pool.router} (its replicas are separate "
                           "stations; the fluid model takes a pool as one server of the pooled capacity only under "
                           "a JSQ-type router)")
    names, engine, tokens, visit, vnames, vclass, arr = [], [], [], [], [], [], []
    edges: list[tuple[int, int, float]] = []
    cap = np.asarray(analysis.capacity_tokens_per_s, dtype=float)
    for k, (cls, route) in enumerate(zip(net.classes, net.routes)):
        for h in cls.hops:
            if h.fork and len(set(h.fork)) > 1:
                raise NotFluid(f"class {cls.name}'s fork at hop {h.id!r} has different branches (a fluid join "
                               "waits for the slowest branch: not modelled)")
        load = analysis.classes[k]
        states = route.states
        n = len(states)
        is_eng = np.array([cls.hops[h].is_engine for h, _ in states])
        if len(names) + 2 * int(is_eng.sum()) > MAX_BUFFERS:
            raise NotFluid(f"more than {MAX_BUFFERS} fluid buffers (routes with many loop rounds)")
        W = np.zeros((n, n))
        for a, b, wv, _ in route.edges:
            W[a, b] += wv
        E, D = np.flatnonzero(is_eng), np.flatnonzero(~is_eng)
        # through delay stations: E -> E directly, or E -> D ... D -> E
        if len(D):
            through = np.linalg.solve(np.eye(len(D)) - W[np.ix_(D, D)], W[np.ix_(D, E)])
            Q = W[np.ix_(E, E)] + W[np.ix_(E, D)] @ through
            start = np.zeros(n)
            start[0] = 1.0
            entry = start[E] + start[D] @ through
        else:
            Q = W[np.ix_(E, E)]
            entry = np.zeros(len(E))
            entry[0] = 1.0
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for i, s in enumerate(E):
            h, counters = states[s]
            hop = cls.hops[h]
            v = float(load.state_visits[s])
            prompt = float(load.state_prompt[s]) / v if v > 0 else hop.prompt.mean
            label = f"{cls.name}.{hop.id}" + ("" if not counters else "[" + ",".join(
                f"{cls.hops[lh].id}:{r}" for lh, r in counters) + "]")
            vi = len(vnames)
            vnames.append(label)
            vclass.append(k)
            phases = [(PREFILL, prompt)] + ([(DECODE, hop.output.mean)] if hop.output.mean > 0 else [])
            prev = None
            for phase, tok in phases:
                b = len(names)
                names.append(f"{label}.{PHASE_NAMES[phase]}")
                engine.append(hop.engine)
                tokens.append(tok)
                visit.append(vi)
                arr.append(0.0)
                if prev is None:
                    first[i] = b
                    arr[b] = analysis.rates[k] * float(entry[i])
                else:
                    edges.append((prev, b, 1.0))
                prev = b
            last[i] = prev
        for i in range(len(E)):
            for t in range(len(E)):
                if Q[i, t] > 0:
                    edges.append((last[i], first[t], float(Q[i, t])))
    nb = len(names)
    P = np.zeros((nb, nb))
    for a, b, w in edges:
        P[a, b] += w
    engine_a = np.asarray(engine, dtype=int)
    tokens_a = np.asarray(tokens, dtype=float)
    work = tokens_a / cap[engine_a]
    remaining = np.linalg.solve(np.eye(nb) - P, tokens_a)
    visit_a = np.asarray(visit, dtype=int)
    buf_class = np.asarray(vclass, dtype=int)[visit_a]
    phase = np.array([PREFILL if x.endswith(".prefill") else DECODE for x in names])
    levels = []
    level_of = np.zeros(nb, dtype=int)
    for j, (spec, (policy, order)) in enumerate(zip(net.engines, policies)):
        here = np.flatnonzero(engine_a == j)
        if policy == PRIORITY:
            listed = list(order)
            groups = [[k] for k in listed] + [[k for k in range(len(net.classes)) if k not in listed]]
        else:   # FCFS: one group
            groups = [list(range(len(net.classes)))]
        lv = []
        for g in groups:
            for ph in PHASE_ORDER[spec.scheduler]:
                idx = here[np.isin(buf_class[here], g) & (phase[here] == ph)]
                if len(idx):
                    level_of[idx] = len(lv)
                    lv.append(idx)
        levels.append(tuple(lv))
    return FluidModel(tuple(names), engine_a, work, tokens_a, visit_a, tuple(vnames), np.asarray(vclass, dtype=int),
                      np.asarray(arr), P, remaining, tuple(levels), cap, tuple(e.name for e in net.engines), level_of)


# ---- the trajectory ----------------------------------------------------------------------------

@dataclass
class FluidPath:
    """A fluid trajectory: the state at each event, and what it shows."""

    times: np.ndarray             # event times (s)
    contents: np.ndarray          # [event, buffer] visits in each buffer
    outcome: str                  # drains | grows | undecided
    drain_time: float | None      # drains: when the fluid is (within 1e-9 of its start) empty
    growth_factor: float | None   # grows / drains by cycles: ratio of successive peaks of the remaining work
    cycle_factor: float | None    # ratio of peaks two apart (a full cycle when peaks alternate engines)
    peaks: list[tuple[float, float]]   # (time, remaining tokens) at the local maxima
    events: int
    start: str                    # the initial backlog

    def remaining_tokens(self, model: FluidModel) -> np.ndarray:
        """Σ_b x_b R_b at each event: the fluid's network backlog (tokens still to compute)."""
        return self.contents @ model.remaining_tokens

    def engine_tokens(self, model: FluidModel) -> np.ndarray:
        """[event, engine] tokens of the visits present at each engine (a prefill buffer holds its decode too)."""
        here = np.where(np.isin(np.arange(len(model.names)), _first_phase(model)),
                        model.tokens + _decode_tokens(model), model.tokens)
        out = np.zeros((len(self.times), len(model.engines)))
        for j in range(len(model.engines)):
            m = model.engine == j
            out[:, j] = self.contents[:, m] @ here[m]
        return out

    def at(self, model: FluidModel, t: np.ndarray) -> np.ndarray:
        """The network backlog (tokens) at times t, linear between events (the path is piecewise linear)."""
        return np.interp(t, self.times, self.remaining_tokens(model))


def _first_phase(model: FluidModel) -> np.ndarray:
    return np.array([i for i, n in enumerate(model.names) if n.endswith(".prefill")], dtype=int)


def _decode_tokens(model: FluidModel) -> np.ndarray:
    """For a prefill buffer, the decode tokens of its visit still to come (0 for decode buffers)."""
    out = np.zeros(len(model.names))
    for b in _first_phase(model):
        nxt = np.flatnonzero((model.routing[b] > 0) & (model.visit == model.visit[b]))
        if len(nxt):
            out[b] = model.tokens[nxt[0]]
    return out


class _Level:
    """One priority level's FCFS queue: segments [composition (visits/s per buffer), work (s)]."""

    __slots__ = ("idx", "m", "segs")

    def __init__(self, idx: np.ndarray, m: np.ndarray) -> None:
        self.idx = idx
        self.m = m
        self.segs: list[list] = []    # [comp, work], head first

    def work(self) -> float:
        return sum(s[1] for s in self.segs)

    def contents(self) -> np.ndarray:
        out = np.zeros(len(self.idx))
        for comp, w in self.segs:
            out += w * comp / float(comp @ self.m)
        return out


def _engine_rates(model: FluidModel, eng: list[_Level], a_ext: np.ndarray, cut: int) -> tuple[np.ndarray, int]:
    """One engine's departure rates given the inflow from outside it (``a_ext``, per buffer of the
    model), and its cut: the levels above the cut pass their inflow through, the cut level takes the
    engine time left (a non-empty level, or an empty one whose inflow does not fit: it starts to fill),
    the levels below get nothing.  Given the cut the rates solve one linear system (the engine's own
    routing, prefill into decode, included): a non-empty cut level departs in its head segment's
    composition, an empty one in its inflow's (a fixed point where it holds several buffers); the cut
    moves until it is consistent."""
    P, m = model.routing, model.work_s
    idx = np.concatenate([lv.idx for lv in eng])
    pos = {int(b): i for i, b in enumerate(idx)}
    n = len(idx)
    Pe = P[np.ix_(idx, idx)]
    cut = min(cut, next((i for i, lv in enumerate(eng) if lv.segs), len(eng)))
    comp: dict[int, np.ndarray] = {}
    seen: set = set()
    d = np.zeros(n)
    for _ in range(100):
        A = np.eye(n)
        rhs = np.zeros(n)
        above: list[int] = []
        for i, lv in enumerate(eng):
            loc = [pos[int(b)] for b in lv.idx]
            if i < cut:              # passes through: d_b − Σ_c Pe_cb d_c = a_ext_b
                A[loc, :] -= Pe[:, loc].T
                rhs[loc] = a_ext[lv.idx]
                above.extend(loc)
            elif i == cut:           # takes what is left: d_b = f_b (1 − Σ_above m_c d_c)
                c = lv.segs[0][0] if lv.segs else comp.get(i, np.ones(len(loc)))
                f = c / float(c @ lv.m)
                if above:
                    A[np.ix_(loc, above)] += np.outer(f, m[idx[above]])
                rhs[loc] = f
        d = np.linalg.solve(A, rhs)
        a = a_ext[idx] + Pe.T @ d
        moved = False
        r = 1.0
        for i, lv in enumerate(eng):
            if i > cut:
                break
            loc = [pos[int(b)] for b in lv.idx]
            w = float(a[loc] @ lv.m)
            if i < cut:
                if w > r + _TOL:          # this level's inflow does not fit: the cut moves up to it
                    cut, moved = i, True
                    break
                r -= w
            elif not lv.segs:
                if w <= r + _TOL:         # the empty cut level fits after all: the cut moves down
                    cut, moved = i + 1, True
                elif len(loc) > 1 and w > 0 and not _same(comp.get(i, np.ones(len(loc))), a[loc]):
                    comp[i] = a[loc].copy()
                    moved = True
        if not moved:
            break
        key = (cut, tuple((k, tuple(np.round(v / max(v.sum(), 1e-300), 12))) for k, v in sorted(comp.items())))
        if key in seen:
            break
        seen.add(key)
    return np.maximum(d, 0.0), cut


def _rates(model: FluidModel, levels: list[list[_Level]], cuts: list[int], d: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The departure rates (visits/s per buffer) at an event: each engine's allocation
    (:func:`_engine_rates`) given the others' departures, engine after engine until they agree,
    starting from the last event's rates.  Where the allocation has several fixed points (the
    Rybko–Stolyar loop: an empty high buffer at each engine fed by the other's low buffer) this
    settles in the one the path was heading to, one engine taking its non-empty buffer's side, not in
    the balanced one, which the smallest perturbation leaves."""
    P, alpha = model.routing, model.arrivals
    d = d.copy()
    cuts = list(cuts)
    ne = len(levels)
    idxs = [np.concatenate([lv.idx for lv in eng]) if eng else np.zeros(0, dtype=int) for eng in levels]
    feeds = [sorted({int(model.engine[c]) for b in idxs[e] for c in np.flatnonzero(P[b] > 0)} - {e})
             for e in range(ne)]
    # a work list, depth first: an engine whose rates changed has the engines it feeds recomputed next,
    # so a change travels along the routes before it comes back (round robin can cycle with a period of
    # two when a loop of engines has a lag in it)
    todo = list(range(ne - 1, -1, -1))
    queued = set(todo)
    for _ in range(20_000):
        if not todo:
            break
        e = todo.pop()
        queued.discard(e)
        if not levels[e]:
            continue
        idx = idxs[e]
        mine = d[idx].copy()
        d[idx] = 0.0
        a_ext = alpha + P.T @ d
        new, cuts[e] = _engine_rates(model, levels[e], a_ext, cuts[e])
        d[idx] = new
        if float(np.max(np.abs(new - mine), initial=0.0)) > 1e-13 * (1.0 + float(np.max(np.abs(new), initial=0.0))):
            for f in reversed(feeds[e]):
                if f in queued:
                    todo.remove(f)
                todo.append(f)
                queued.add(f)
    return d, cuts


def fluid_path(model: FluidModel, x0: np.ndarray, *, max_events: int = MAX_EVENTS, start: str = "",
               horizon_s: float | None = None) -> FluidPath:
    """The exact fluid trajectory from contents x0 (visits per buffer), event by event."""
    m = model.work_s
    levels: list[list[_Level]] = []
    for eng in model.levels:
        row = []
        for idx in eng:
            lv = _Level(idx, m[idx])
            x = x0[idx]
            if float(x @ lv.m) > 0:
                lv.segs.append([x.astype(float).copy(), float(x @ lv.m)])
            row.append(lv)
        levels.append(row)
    R = model.remaining_tokens
    nb = len(model.names)
    t = 0.0
    d = np.zeros(nb)
    cuts = [len(eng) for eng in levels]
    times, states = [0.0], [x0.astype(float).copy()]
    total0 = float(x0 @ R)
    peaks: list[tuple[float, float]] = []
    rising = False
    outcome, drain_time = UNDECIDED, None
    gf = cf = None

    def snapshot() -> np.ndarray:
        x = np.zeros(nb)
        for eng in levels:
            for lv in eng:
                if lv.segs:
                    x[lv.idx] += lv.contents()
        return x

    for event in range(max_events):
        scale = max(sum(lv.work() for eng in levels for lv in eng), 1e-300)
        d, cuts = _rates(model, levels, cuts, d)
        a = model.arrivals + model.routing.T @ d
        if not _consistent(levels, a, d):   # no fixed point found: say so rather than guess
            break
        # the levels' inflow: a new tail segment where the composition changed; the head's drain
        dt = math.inf
        slope = 0.0
        plan = []
        for eng in levels:
            for lv in eng:
                ai = a[lv.idx]
                w_in = float(ai @ lv.m)
                served = float(d[lv.idx] @ lv.m)
                if not lv.segs and w_in <= served + _TOL:
                    continue      # empty, passes its inflow through
                if w_in > _TOL:
                    tail = lv.segs[-1] if lv.segs else None
                    if tail is None or not _same(tail[0], ai):
                        lv.segs.append([ai.copy(), 0.0])
                head = lv.segs[0]
                net_head = -served + (w_in if len(lv.segs) == 1 and w_in > _TOL else 0.0)
                plan.append((lv, served, w_in, net_head))
                if net_head < -_TOL and head[1] > 0:
                    dt = min(dt, head[1] / -net_head)
        x = snapshot()
        slope = float(model.arrivals @ R - d @ model.tokens)   # d/dt Σ x_b R_b = α·R − d·tokens
        total = float(x @ R)
        if total <= 1e-9 * total0:
            outcome, drain_time = DRAINS, t
            break
        # a local maximum of the remaining work: the slope turns negative here
        if slope < -1e-12 and rising:
            peaks.append((t, total))
            rising = False
            gf, cf, decided = _peak_trend(peaks)
            if decided is not None:
                outcome = decided
                if decided == DRAINS:   # geometric cycles: the rest drains in a convergent series
                    g = cf if cf is not None else gf
                    span = peaks[-1][0] - peaks[-3][0]
                    drain_time = peaks[-1][0] + span * g / (1 - g)
                break
        elif slope > 1e-12:
            rising = True
        if total > 1e12 * total0:
            outcome = GROWS
            break
        if dt == math.inf:
            outcome = GROWS if slope > 1e-12 else UNDECIDED   # no event ahead: grows linearly, or stuck
            break
        if horizon_s is not None and t + dt >= horizon_s:
            dt = horizon_s - t
        eps = 1e-12 * scale
        for lv, served, w_in, net_head in plan:
            if len(lv.segs) == 1:
                lv.segs[0][1] = max(lv.segs[0][1] + net_head * dt, 0.0)
            else:
                lv.segs[0][1] = max(lv.segs[0][1] - served * dt, 0.0)
                if w_in > _TOL:
                    lv.segs[-1][1] += w_in * dt
            if lv.segs[0][1] <= eps and net_head < 0:   # the head that ran empty (the event)
                lv.segs.pop(0)
        t += dt
        times.append(t)
        states.append(snapshot())
        if horizon_s is not None and t >= horizon_s:
            break
    return FluidPath(np.asarray(times), np.asarray(states), outcome, drain_time, gf, cf, peaks,
                     len(times) - 1, start)


def _consistent(levels: list[list[_Level]], a: np.ndarray, d: np.ndarray) -> bool:
    """Rates that a fluid path can follow: no engine busier than 1, no empty level served faster than
    its inflow, no lower level served while a higher one is not empty."""
    for eng in levels:
        busy, blocked = 0.0, False
        for lv in eng:
            served = float(d[lv.idx] @ lv.m)
            if blocked and served > 1e-9:
                return False
            if not lv.segs and served > float(a[lv.idx] @ lv.m) + 1e-9:
                return False
            busy += served
            blocked = blocked or bool(lv.segs)
        if busy > 1 + 1e-9:
            return False
    return True


def _same(u: np.ndarray, v: np.ndarray) -> bool:
    su, sv = float(u.sum()), float(v.sum())
    if su <= 0 or sv <= 0:
        return su <= 0 and sv <= 0
    return bool(np.allclose(u / su, v / sv, rtol=1e-9, atol=1e-12))


def _peak_trend(peaks: list[tuple[float, float]]) -> tuple[float | None, float | None, str | None]:
    """(ratio of the last two peaks, ratio two apart, a decision once the trend is clear)."""
    if len(peaks) < 2:
        return None, None, None
    v = [p[1] for p in peaks]
    gf = v[-1] / v[-2]
    cf = v[-1] / v[-3] if len(v) >= 3 else None
    if len(v) >= 5:
        two = [v[i] / v[i - 2] for i in range(len(v) - 3, len(v))]
        if all(r > 1 + 1e-6 for r in two):
            return gf, cf, GROWS
        if all(r < 1 - 1e-6 for r in two):
            return gf, cf, DRAINS
    return gf, cf, None


def standard_starts(model: FluidModel) -> list[tuple[str, np.ndarray]]:
    """The standard initial backlogs: each visit's first buffer alone, holding fluid worth 1 token of
    remaining work (the entry visits first)."""
    firsts = _first_phase(model)
    order = sorted(firsts, key=lambda b: (model.arrivals[b] <= 0, b))
    out = []
    for b in order[:24]:
        x = np.zeros(len(model.names))
        x[b] = 1.0 / model.remaining_tokens[b]
        out.append((model.visit_names[model.visit[b]], x))
    return out


# ---- decisions -----------------------------------------------------------------------------------

@dataclass
class FluidDecision:
    outcome: str                   # drains | grows | undecided (over all standard starts)
    paths: list[FluidPath]
    worst: FluidPath               # the one that decides (grows, else the slowest to drain)


def decide(model: FluidModel, max_events: int = MAX_EVENTS) -> FluidDecision:
    """Run the fluid from every standard start: grows if one grows, drains if all drain."""
    paths = [fluid_path(model, x, max_events=max_events, start=name) for name, x in standard_starts(model)]
    grows = [p for p in paths if p.outcome == GROWS]
    if grows:
        worst = max(grows, key=lambda p: p.growth_factor or 0.0)
        return FluidDecision(GROWS, paths, worst)
    if all(p.outcome == DRAINS for p in paths):
        return FluidDecision(DRAINS, paths, max(paths, key=lambda p: p.drain_time or 0.0))
    return FluidDecision(UNDECIDED, paths, next(p for p in paths if p.outcome == UNDECIDED))


# ---- virtual stations ------------------------------------------------------------------------------

def virtual_stations(model: FluidModel) -> list[dict]:
    """Rybko–Stolyar pairs of visits (module docstring) with their virtual-station load."""
    rate = model.visit_rate
    nv = len(model.visit_names)
    vbuf = [np.flatnonzero(model.visit == v) for v in range(nv)]
    veng = [int(model.engine[b[0]]) for b in vbuf]
    vload = [float(rate[b[0]] * model.work_s[b].sum()) for b in vbuf]   # λ_v m_v (prefill + decode)
    firsts = set(_first_phase(model).tolist())

    def fed_only_below(c: int, b: int) -> bool:
        """Every inflow of visit c comes from buffers at b's engine strictly below all of b's levels."""
        head = [x for x in vbuf[c] if x in firsts][0]
        if model.arrivals[head] > 0:
            return False
        feeders = np.flatnonzero(model.routing[:, head] > 0)
        low = int(model.level_of[vbuf[b]].max())
        return len(feeders) > 0 and all(model.engine[f] == veng[b] and model.level_of[f] > low for f in feeders)

    out = []
    for b in range(nv):
        for c in range(b + 1, nv):
            if veng[b] == veng[c]:
                continue
            if fed_only_below(c, b) and fed_only_below(b, c):
                tb, tc = vload[b], vload[c]
                # the fluid's growth per half-cycle (short feeder visits neglected): while one of the pair
                # drains, the other's feeder piles up; work ratio t_b / (1 − t_c), then t_c / (1 − t_b)
                half = [tb / (1 - tc), tc / (1 - tb)] if tb < 1 and tc < 1 else None
                out.append({"visits": [model.visit_names[b], model.visit_names[c]],
                            "engines": [model.engines[veng[b]], model.engines[veng[c]]],
                            "load": tb + tc, "terms": [tb, tc], "half_cycle_factors": half,
                            "cycle_factor": half[0] * half[1] if half else None})
    out.sort(key=lambda v: -v["load"])
    return out
