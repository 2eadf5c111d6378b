"""Traffic equations of a network of engines (arXiv 2504.07347 §5).

For each class k the route is a finite Markov chain on (hop, round counters) plus forks and
joins (:mod:`llmqueue.network.routes`).  The expected visits v per job solve
``v = e_first + Wᵀ v`` — a fork sends one branch to each listed hop, a join runs once per
fork (each arriving branch counts 1/n) — and the expected carried output (for hops with
``add_previous_output``) solves the same kind of linear system, as does the expected *context*
(``add_previous_context``: the previous LLM visit's whole sequence; its prompt may itself hold a
context, so the system feeds an engine state's context through it).  Then per job

    T_{k,j} = Σ_{hops h of k at engine j} v_h (m_p,h + m_d,h) + [grows_h] E[carried output into h]
                                                           + [context_h] E[context into h],

and engine j is offered ``Σ_k λ_k T_{k,j}`` tokens/s against its capacity b_max / t_{b_max}
(:func:`llmqueue.analysis.capacity`).  ρ_j = offered / capacity; the largest stable scaling
of all arrival rates is α* = 1 / max_j ρ_j, attained at the bottleneck engine.

What it promises (paper §5): ρ_j < 1 at every engine is necessary for stability under any
policy.  For routes whose engine graph is acyclic (chains, DAGs, fork-join) with
work-conserving, K-FCFS engines it is also sufficient; with cyclic routing (a job returns to
an engine it left, e.g. Rybko–Stolyar) it is not: stability then depends on the policy.
Delay stations are infinite servers: they add latency, never a capacity limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmqueue.analysis import capacity
from llmqueue.network.model import Network
from llmqueue.schedulers import scheduler_class


@dataclass(frozen=True)
class ClassLoad:
    """Per-job expectations of one class, from its route's traffic equations."""

    visits: np.ndarray            # expected visits per hop
    tokens: np.ndarray            # expected tokens per hop (prompt incl. growth + output)
    prompt_tokens: np.ndarray     # expected prompt tokens per hop (incl. growth)
    delay_s: float                # expected seconds spent in delay stations (service time only)
    succ: dict                    # hop -> {engine hop: expected visits right after (through delays)}
    context_tokens: np.ndarray | None = None   # expected context tokens per hop (add_previous_context)
    # per state of the route's chain (Route.states: hop, round counters), for the fluid model
    # (network/fluid.py): expected visits and prompt tokens (growth and context included) per job
    state_visits: np.ndarray | None = None
    state_prompt: np.ndarray | None = None


@dataclass(frozen=True)
class NetworkAnalysis:
    engines: tuple[str, ...]
    rates: tuple[float, ...]                  # λ_k, jobs/s
    capacity_tokens_per_s: np.ndarray         # per engine, b_max / t_{b_max}
    offered_tokens_per_s: np.ndarray          # per engine
    rho: np.ndarray                           # per engine
    tokens_per_job: np.ndarray                # [class, engine]
    visits_per_job: np.ndarray                # [class, engine]
    max_scaling: float                        # α* = 1 / max ρ
    bottleneck: str
    cyclic: bool                              # some job returns to an engine it left
    work_conserving: bool                     # every engine's policy claims it
    classes: tuple[ClassLoad, ...]
    pools: tuple = ()                         # per engine: its PoolLoad when it is a pool of replicas, else None

    @property
    def max_rho(self) -> float:
        return float(self.rho.max())

    def pool_verdict(self) -> tuple[str, str] | None:
        """What the pools' routers add below max ρ ≤ 1 (docs/cluster.md, "Capacity and prediction"):
        ("unstable", why) when a static router sends a replica more than its capacity, ("not predicted",
        why) when a router is not known to keep every replica below its own capacity; None otherwise."""
        for p in self.pools:
            if p is not None and p.replica_rho is not None and max(p.replica_rho) > 1:
                return "unstable", p.reason
        for p in self.pools:
            if p is not None and p.kind == "unknown" and self.max_rho <= 1:
                return "not predicted", p.reason
        return None

    def prediction(self) -> str:
        """What the traffic equations say about this network at these rates."""
        if self.max_rho > 1:
            return "unstable"
        pool = self.pool_verdict()
        if pool is not None and pool[0] == "unstable":
            return "unstable"
        if pool is not None and self.max_rho < 1:
            return f"not predicted ({pool[1]})"
        if self.max_rho < 1 and not self.cyclic and self.work_conserving:
            return "stable"
        if self.max_rho < 1:
            why = ("cyclic routing: jobs return to an engine they left" if self.cyclic
                   else "an engine that is not work-conserving")
            return f"not predicted ({why}: ρ < 1 is necessary, not sufficient)"
        return "boundary"

    def to_dict(self) -> dict:
        return {
            "engines": [
                {"name": n, "capacity_tokens_per_s": float(c), "offered_tokens_per_s": float(o), "rho": float(r)}
                for n, c, o, r in zip(self.engines, self.capacity_tokens_per_s, self.offered_tokens_per_s, self.rho)
            ],
            "rates": list(self.rates),
            "tokens_per_job": self.tokens_per_job.tolist(),
            "max_scaling": self.max_scaling,
            "bottleneck": self.bottleneck,
            "cyclic": self.cyclic,
            "work_conserving": self.work_conserving,
            "predicted": self.prediction(),
            **({"pools": {self.engines[j]: p.to_dict() for j, p in enumerate(self.pools) if p is not None}}
               if any(p is not None for p in self.pools) else {}),
        }


@dataclass(frozen=True)
class PoolLoad:
    """A pool node's load split over its replicas (docs/network.md, "Pools as engines"; the pool capacity of
    docs/cluster.md, llmqueue.cluster.capacity): each replica's Theorem 2 capacity C_r (arXiv 2504.07347
    §3.2), the pooled C = Σ C_r, and for a static router each replica's share s_r of the node's visits (for
    session affinity: of its jobs, whose hops there stay together) and ρ_r = offered · s_r / C_r."""

    engine: str
    router: str
    kind: str                                 # "static", "pooled" (JSQ-type: stable below C) or "unknown"
    replicas: tuple[str, ...]
    capacity_tokens_per_s: tuple[float, ...]  # C_r
    pooled_capacity_tokens_per_s: float       # C = Σ C_r
    offered_tokens_per_s: float
    shares: tuple[float, ...] | None          # static routers
    replica_rho: tuple[float, ...] | None     # static routers
    binding: str | None                       # static routers: the replica of the largest ρ_r
    reason: str

    def to_dict(self) -> dict:
        return {"router": self.router, "kind": self.kind, "replicas": list(self.replicas),
                "capacity_tokens_per_s": list(self.capacity_tokens_per_s),
                "pooled_capacity_tokens_per_s": self.pooled_capacity_tokens_per_s,
                "offered_tokens_per_s": self.offered_tokens_per_s, "rho": self.offered_tokens_per_s
                / self.pooled_capacity_tokens_per_s, "shares": None if self.shares is None else list(self.shares),
                "replica_rho": None if self.replica_rho is None else list(self.replica_rho), "binding": self.binding,
                "reason": self.reason}


def replica_capacities(spec) -> list[float]:
    """Theorem 2's capacity b_max / t_{b_max} of each engine of a node (its replicas, or itself)."""
    return [capacity(r.batch_time, r.token_budget)[1] for r in spec.replicas]


def node_capacity(spec) -> float:
    """The node's capacity: one engine's, or a pool's pooled capacity Σ_r C_r (docs/cluster.md)."""
    caps = replica_capacities(spec)
    return caps[0] if len(caps) == 1 else float(np.sum(caps))


def pool_router(spec, rng=None):
    """The pool's router, built as the stand-alone cluster builds it (its options checked), on ``rng``
    (default: a throw-away stream, for the analysis)."""
    from llmqueue.cluster.routers import make_router

    pool = spec.pool
    return make_router(pool.router_cls, replica_capacities(spec),
                       np.random.default_rng(0) if rng is None else rng, pool.router_options)


def pool_load(spec, offered: float) -> PoolLoad:
    """How a pool node's offered tokens split over its replicas (llmqueue.cluster.capacity's rules)."""
    from types import SimpleNamespace

    from llmqueue.cluster.capacity import static_shares

    pool = spec.pool
    caps = np.asarray(replica_capacities(spec))
    pooled = float(caps.sum())
    router = pool_router(spec)
    names = tuple(pool.labels)
    # each job is a session (affinity hashes job ids, uniform over the ring: cluster's "no sessions" case)
    shares = static_shares(SimpleNamespace(sessions=None, size=len(caps)), router, caps)
    rho = offered / pooled
    if shares is not None:
        r_j = offered * shares / caps
        k = int(np.argmax(r_j))
        what = "jobs (each job a session)" if router.name == "affinity" else "visits"
        reason = (f"{pool.router} sends replica {spec.name}.{names[k]} {shares[k]:.1%} of the pool's {what}: ρ = "
                  f"{r_j[k]:.4f} there" + (f" although the pool's ρ = {rho:.4f}" if r_j[k] > 1 else ""))
        return PoolLoad(spec.name, pool.router, "static", names, tuple(caps.tolist()), pooled, offered,
                        tuple(shares.tolist()), tuple(r_j.tolist()), f"{spec.name}.{names[k]}", reason)
    if router.pooled_stable or len(caps) == 1 or (pool.router == "power-of-d" and len(set(caps.tolist())) == 1):
        reason = ("one replica: the router has no choice" if len(caps) == 1 else
                  f"{pool.router} never sends work to a longer queue while a shorter one waits: stable below the "
                  f"pooled capacity (ρ = {rho:.4f})")
        return PoolLoad(spec.name, pool.router, "pooled", names, tuple(caps.tolist()), pooled, offered, None, None,
                        None, reason)
    reason = (f"pool {spec.name}: {pool.router} is not known to keep every replica below its own capacity "
              f"(pooled ρ = {rho:.4f})")
    return PoolLoad(spec.name, pool.router, "unknown", names, tuple(caps.tolist()), pooled, offered, None, None, None,
                    reason)


def _solve(n: int, edges: list[tuple[int, int, float]], rhs: np.ndarray, diag: np.ndarray | None = None) -> np.ndarray:
    """x = rhs + Wᵀ D x for the edge weights W (D = diag, default identity), by one sparse solve."""
    from scipy import sparse   # here, not at the top: the CLI starts without scipy
    from scipy.sparse.linalg import spsolve

    rows = [b for _, b, _ in edges]
    cols = [a for a, _, _ in edges]
    vals = [w * (1.0 if diag is None else diag[a]) for a, _, w in edges]
    m = sparse.identity(n, format="csc") - sparse.csc_matrix((vals, (rows, cols)), shape=(n, n))
    return np.atleast_1d(spsolve(m, rhs))


def class_load(route) -> ClassLoad:
    """Expected visits, tokens and delay per job for one route."""
    from scipy import sparse

    hops = route.hops
    states = route.states
    n = len(states)
    start = np.zeros(n)
    start[0] = 1.0
    visits = _solve(n, [(a, b, wv) for a, b, wv, _ in route.edges], start)
    hop_of = np.array([h for h, _ in states])
    is_engine = np.array([hops[h].is_engine for h in hop_of])
    m_out = np.array([hops[h].output.mean if hops[h].is_engine else 0.0 for h in hop_of])
    # carried output: c_in = Wcᵀ (v m_d on engine states + c_in on delay states)
    produced = sparse.csc_matrix(([wc for *_, wc in route.edges], ([b for _, b, _, _ in route.edges],
                                  [a for a, _, _, _ in route.edges])), shape=(n, n)) @ (visits * m_out)
    carried = _solve(n, [(a, b, wc) for a, b, _, wc in route.edges], produced, diag=(~is_engine).astype(float))
    h_visits = np.bincount(hop_of, visits, minlength=len(hops))
    grow = np.array([hops[h].grow for h in hop_of])
    h_carry = np.bincount(hop_of, np.where(grow, carried, 0.0), minlength=len(hops))
    m_p = np.array([h.prompt.mean if h.is_engine else 0.0 for h in hops])
    m_d = np.array([h.output.mean if h.is_engine else 0.0 for h in hops])
    prompt = h_visits * m_p + h_carry
    s_prompt = np.where(is_engine, visits * m_p[hop_of] + np.where(grow, carried, 0.0), 0.0)
    h_context = np.zeros(len(hops))
    ctx = np.array([hops[h].context for h in hop_of], dtype=bool)
    if ctx.any():
        # context (add_previous_context): x_in = Wcᵀ (sequence out of engine states + x_in through delay states),
        # where an engine state's sequence is v(m_p + m_d) + its carried output (grow) + its context (context)
        own = np.where(is_engine, visits * (m_p[hop_of] + m_d[hop_of]) + np.where(grow, carried, 0.0), 0.0)
        wc = sparse.csc_matrix(([w for *_, w in route.edges], ([b for _, b, _, _ in route.edges],
                                [a for a, _, _, _ in route.edges])), shape=(n, n))
        context = _solve(n, [(a, b, w) for a, b, _, w in route.edges], wc @ own,
                         diag=np.where(is_engine, ctx.astype(float), 1.0))
        h_context = np.bincount(hop_of, np.where(ctx, context, 0.0), minlength=len(hops))
        prompt = prompt + h_context
        s_prompt = s_prompt + np.where(is_engine & ctx, context, 0.0)
    delay = sum(h_visits[h.index] * route.network.delays[h.delay].time.mean for h in hops if not h.is_engine)
    # Expected engine hops right after each hop (looking through delay hops): max-pressure's routing.
    flow: dict[int, dict[int, float]] = {}
    for a, b, wv, _ in route.edges:
        ha, hb = states[a][0], states[b][0]
        flow.setdefault(ha, {})
        flow[ha][hb] = flow[ha].get(hb, 0.0) + visits[a] * wv
    step = {h: {t: f / h_visits[h] for t, f in d.items()} for h, d in flow.items() if h_visits[h] > 0}
    succ: dict[int, dict[int, float]] = {}
    for h in range(len(hops)):
        out: dict[int, float] = {}
        todo = [(t, p) for t, p in step.get(h, {}).items()]
        seen = 0
        while todo and seen < 10_000:
            t, p = todo.pop()
            seen += 1
            if hops[t].is_engine:
                out[t] = out.get(t, 0.0) + p
            else:
                todo.extend((u, p * q) for u, q in step.get(t, {}).items() if u != t)
        succ[h] = out
    return ClassLoad(h_visits, prompt + h_visits * m_d, prompt, float(delay), succ, h_context, visits, s_prompt)


def engine_graph_cyclic(net: Network) -> bool:
    """True when some job can return to an engine it left (a cycle, or a self-loop, in the graph of
    moves between engines over all classes, looking through delay hops): paper §5's cyclic routing."""
    edges: dict[int, set[int]] = {}
    for route in net.routes:
        load = class_load(route)
        for h, nxt in load.succ.items():
            if route.hops[h].is_engine:
                for t, p in nxt.items():
                    if p > 0:
                        edges.setdefault(route.hops[h].engine, set()).add(route.hops[t].engine)
    color: dict[int, int] = {}

    def visit(u: int) -> bool:
        color[u] = 1
        for v in edges.get(u, ()):
            if color.get(v) == 1 or (v not in color and visit(v)):
                return True
        color[u] = 2
        return False

    return any(u not in color and visit(u) for u in list(edges))


def analyze_network(net: Network) -> NetworkAnalysis:
    """Per-engine offered load, utilisation, α* and the bottleneck (traffic equations)."""
    loads = tuple(class_load(r) for r in net.routes)
    ne = len(net.engines)
    tokens = np.zeros((len(net.classes), ne))
    visits = np.zeros((len(net.classes), ne))
    for k, (route, load) in enumerate(zip(net.routes, loads)):
        for h in route.hops:
            if h.is_engine:
                tokens[k, h.engine] += load.tokens[h.index]
                visits[k, h.engine] += load.visits[h.index]
    cap = np.array([node_capacity(e) for e in net.engines])   # a pool: the pooled capacity Σ_r C_r
    rates = np.asarray(net.rates if net.rates else [c.arrivals.rate for c in net.classes], dtype=float)
    offered = rates @ tokens
    rho = offered / cap
    top = int(np.argmax(rho))
    wc = all(scheduler_class(r.scheduler).work_conserving for e in net.engines for r in e.replicas)
    pools = tuple(None if e.pool is None else pool_load(e, float(offered[j])) for j, e in enumerate(net.engines))
    return NetworkAnalysis(
        engines=tuple(e.name for e in net.engines), rates=tuple(float(r) for r in rates),
        capacity_tokens_per_s=cap, offered_tokens_per_s=offered, rho=rho, tokens_per_job=tokens,
        visits_per_job=visits, max_scaling=float(1.0 / rho[top]) if rho[top] > 0 else float("inf"),
        bottleneck=net.engines[top].name, cyclic=engine_graph_cyclic(net), work_conserving=wc, classes=loads,
        pools=pools if any(p is not None for p in pools) else (),
    )


# ---- KV-cache memory per engine (docs/network.md, "KV-cache memory") ----------------------------

#: jobs per class sampled to estimate the block rounding of growing prompts (E[w_B] at those hops)
MEMORY_SAMPLES = 20_000
MEMORY_SOURCES = {
    "visit_rate": "traffic equations (this module): Σ_k λ_k v_{k,h} over the engine's hops h",
    "work_tokens": ("exact: E[w] = E[l]·E[o] + (E[o] + E[o²])/2 per visit (Dong & Cao, arXiv 2604.11001; reserve: "
                    "E[l]·E[o] + E[o²]), with E[l] per visit from the traffic equations (prompt growth included) and "
                    "the hop's output law; a visit's output is drawn independently of its prompt"),
    "work_blocks": ("E[w_B] = Σ_j ceil((l + j)/B): exact from the hop's length laws where the prompt does not grow "
                    "(analysis.memory.length_stats); at a hop with add_previous_output the prompt's residue mod B "
                    "depends on earlier hops, so E[w]/B (exact) plus the block rounding E[w_B − w/B] estimated from "
                    "sampled jobs"),
    "memory_necessary_blocks_visits_per_s": ("Dong & Cao's necessary bound for the engine's visits: "
                                             "λ_j·E[w_B]·t̄ ≤ kv_blocks − 1, t̄ = t_b(b̄) at throughput balance; "
                                             "λ_mem = max_{b ≤ b_mem} b/(E[l+o]·t_b(b)), b_mem = (kv_blocks − 1)·"
                                             "E[l+o]/E[w_B] (analysis.memory.rate_under_load_cap, docs/memory.md)"),
    "memory_sufficient_isolated_visits_per_s": ("Nie, Si & Zhou (arXiv 2605.04595) for an isolated engine fed "
                                                "i.i.d. visits of this mix: μ(1 − δ_B); inside a network the visits "
                                                "depend on the other engines, so this is no guarantee for the network "
                                                "(paper arXiv 2504.07347 §5: with cyclic routing even ρ < 1 is not "
                                                "sufficient)"),
    "token_bound_visits_per_s": ("Theorem 2 (arXiv 2504.07347 §3.2) per engine: (b_max/t_{b_max})/E[l+o] visits/s "
                                 "(ρ_j = 1)"),
}


def _visits_of(segment, engine: int, hops: set[int], out: dict[int, list[tuple[int, int]]]) -> None:
    for v in segment.visits:
        h = v.hop.index
        if v.hop.engine == engine and h in hops:
            out[h].append((v.num_prompt_tokens, v.num_output_tokens))
    for branch in segment.branches:
        _visits_of(branch, engine, hops, out)
    if segment.join is not None:
        _visits_of(segment.join, engine, hops, out)


def _sampled_visits(net: Network, k: int, engine: int, hops: set[int], jobs: int) -> dict[int, np.ndarray]:
    """(prompt, output) of the visits to ``hops`` (at ``engine``) of the first ``jobs`` jobs of class k, on
    the class's own route stream (the jobs a run with seed run.seed samples, in order)."""
    route = net.routes[k]
    _, route_seq = np.random.SeedSequence([int(net.seed), k]).spawn(2)
    streams = route.streams(route_seq)
    out: dict[int, list[tuple[int, int]]] = {h: [] for h in hops}
    for _ in range(jobs):
        segment, _ = route.sample(streams)
        _visits_of(segment, engine, hops, out)
    return {h: np.asarray(rows, dtype=np.int64).reshape(-1, 2) for h, rows in out.items()}


def engine_memory(net: Network, analysis: NetworkAnalysis, samples: int = MEMORY_SAMPLES) -> list[dict | None]:
    """Per engine with ``kv_blocks`` (None for the others): the memory bounds of docs/memory.md for the
    engine's visits, in visits/s and as a scaling of all arrival rates.  Every number says where it
    comes from (``sources``; ``work_blocks_exact``: whether E[w_B] is exact or estimated)."""
    from llmqueue.analysis.memory import (
        block_iterations,
        length_stats,
        mean_batch_time,
        rate_under_load_cap,
        reserved_iterations,
        token_iterations,
    )
    from llmqueue.model.kv import RESERVE

    out: list[dict | None] = []
    for j, spec in enumerate(net.engines):
        kv = spec.kv
        if kv is None or kv.prefix_caching or spec.pool is not None:   # a pool: per replica (not yet); with prefix caching: engine_prefix (a visit's hits need no
            out.append(None)                  # iterations and shared blocks are held once: these bounds do not hold)
            continue
        reserve = kv.policy == RESERVE
        B, usable = kv.block_size, kv.usable
        rows = []            # (class, hop, visit rate, E[l], E[o], E[w], E[w_B], its SE, sup or None, exact, grows)
        notes: list[str] = []
        growing: dict[int, set[int]] = {}
        for k, cls in enumerate(net.classes):
            load = analysis.classes[k]
            for h in cls.hops:
                v = float(load.visits[h.index])
                if h.engine != j or v <= 0:
                    continue
                el = float(load.prompt_tokens[h.index]) / v
                eo, eo2 = h.output.mean, h.output.second_moment
                w = el * eo + (eo2 if reserve else (eo + eo2) / 2)
                grows = el - h.prompt.mean > 1e-9 * max(1.0, el)
                if grows:
                    growing.setdefault(k, set()).add(h.index)
                    rows.append([k, h, analysis.rates[k] * v, el, eo, w, None, None, None, False, True])
                else:
                    st = length_stats(h.prompt, h.output, block_size=B, kv_policy=kv.policy)
                    rows.append([k, h, analysis.rates[k] * v, el, eo, w, st.work_blocks, 0.0, st.max_request_tokens,
                                 st.exact, False])
        for k, hops in growing.items():
            drawn = _sampled_visits(net, k, j, hops, samples)
            for row in rows:
                if row[0] != k or row[1].index not in hops:
                    continue
                lo = drawn[row[1].index]
                l, o = lo[:, 0], lo[:, 1]
                if reserve:
                    corr = reserved_iterations(l, o, B) - reserved_iterations(l, o) / B
                else:
                    corr = block_iterations(l, o, B) - token_iterations(l, o) / B
                row[6] = row[5] / B + float(corr.mean())
                row[7] = float(corr.std(ddof=1) / np.sqrt(len(corr))) if len(corr) > 1 else float("nan")
            where = ", ".join(f"{net.classes[k].name}.{net.classes[k].hops[h].id}" for h in sorted(hops))
            notes.append(f"E[w_B] at hops with growing prompts ({where}): "
                         f"E[w]/B exact plus the block rounding estimated from the first {samples} jobs of class "
                         f"{net.classes[k].name!r} the run samples (seed {net.seed})")
        rate = sum(r[2] for r in rows)
        if rate <= 0:
            out.append(None)
            continue
        pi = [r[2] / rate for r in rows]
        m = sum(p * (r[3] + r[4]) for p, r in zip(pi, rows))
        ew = sum(p * r[5] for p, r in zip(pi, rows))
        ewb = sum(p * r[6] for p, r in zip(pi, rows))
        se = float(np.sqrt(sum((p * r[7]) ** 2 for p, r in zip(pi, rows))))
        exact = not growing and all(r[9] for r in rows)
        if not growing and not all(r[9] for r in rows):
            notes.append(f"block rounding: a length law's far tail is taken as evenly spread over residues mod {B} "
                         "(analysis.memory.length_stats)")
        cap = float(analysis.capacity_tokens_per_s[j])
        token_bound = cap / m
        cap_tokens = usable * B * m / ew if ew > 0 else float("inf")
        cap_blocks = usable * m / ewb if ewb > 0 else float("inf")
        nec = rate_under_load_cap(spec.batch_time, spec.token_budget, cap_tokens, m)
        nec_b = rate_under_load_cap(spec.batch_time, spec.token_budget, cap_blocks, m)
        suff = delta = None
        if reserve:
            reason = "not available: Nie, Si & Zhou's result is for memory allocated as tokens are computed (recompute)"
        elif growing:
            reason = "not computed: ess sup (l + o) of a growing prompt depends on the earlier hops"
        elif any(r[8] is None for r in rows):
            reason = "not available: a prompt or output law is unbounded, so δ is infinite; give the laws a max"
        else:
            need = math.ceil(max(r[8] for r in rows) / B)
            delta = need / usable
            if delta >= 1:
                reason = f"not available: the longest visit needs {need} blocks, the cache holds {usable}"
            else:
                reason = None
                suff = rate_under_load_cap(spec.batch_time, spec.token_budget, cap_blocks * (1 - delta), m)
        t_bar, b_bar = mean_batch_time(spec.batch_time, spec.token_budget, rate, m)
        out.append({
            "engine": spec.name, "kv_blocks": kv.blocks, "block_size": B, "kv_policy": kv.policy,
            "memory_tokens": kv.tokens, "visit_rate": rate, "mean_visit_tokens": m,
            "work_tokens": ew, "work_blocks": ewb, "work_blocks_exact": exact,
            "work_blocks_se": None if not growing else se,
            "token_bound_visits_per_s": token_bound,
            "memory_necessary_visits_per_s": nec, "memory_necessary_blocks_visits_per_s": nec_b,
            "memory_load_cap_blocks_tokens": cap_blocks,
            "delta_blocks": delta, "memory_sufficient_isolated_visits_per_s": suff, "sufficient_reason": reason,
            "batch_time_s": t_bar, "batch_tokens": b_bar, "memory_rho": rate * ewb * t_bar / usable,
            "memory_scaling": nec_b / rate, "token_scaling": token_bound / rate,
            "binding": "memory" if nec_b < token_bound else "tokens",
            "hops": [{"class": net.classes[r[0]].name, "hop": r[1].id, "visit_rate": r[2], "mean_prompt": r[3],
                      "mean_output": r[4], "work_tokens": r[5], "work_blocks": r[6],
                      "work_blocks_exact": r[9] and not r[10]} for r in rows],
            "sources": dict(MEMORY_SOURCES), "notes": notes,
        })
    return out


# ---- prefix caching per engine (docs/network.md, "Prefix caching in networks") -----------------

PREFIX_SOURCES = {
    "offered_tokens_per_s": ("traffic equations (this module): Σ_k λ_k T_{k,j}, every prompt and output token "
                             "computed"),
    "context_tokens_per_s": ("traffic equations: Σ_k λ_k Σ_h E[context tokens into h] over the engine's hops with "
                             "add_previous_context (exact, the same linear system as the visits)"),
    "min_offered_tokens_per_s": ("offered − context: the tokens the engine must compute if every context token "
                                 "were found cached; a visit can hit at most its context (its own tokens are unique "
                                 "to it), so this is a lower bound on the work and ρ_min = min_offered / capacity < 1 "
                                 "is NECESSARY for stability (above it unstable); only full blocks are cached, so at "
                                 "most ⌊context/B⌋·B tokens are hit, up to B − 1 fewer per visit"),
    "capacity_tokens_per_s": "Theorem 2 (arXiv 2504.07347 §3.2): b_max / t_{b_max}",
    "prefix_scaling": "1 / ρ_min: the largest scaling of all arrival rates this bound allows",
}


def engine_prefix(net: Network, analysis: NetworkAnalysis) -> list[dict | None]:
    """Per engine with ``prefix_caching`` (None for the others): the token load without caching and with
    every context block found cached (a necessary bound: above it unstable), each with its source."""
    out: list[dict | None] = []
    for j, spec in enumerate(net.engines):
        if not spec.prefix_caching or spec.pool is not None:   # a pool: per replica (not yet)
            out.append(None)
            continue
        context = 0.0
        hops = []
        for k, cls in enumerate(net.classes):
            load = analysis.classes[k]
            for h in cls.hops:
                if h.engine != j or not h.context or load.context_tokens is None:
                    continue
                rate = analysis.rates[k] * float(load.context_tokens[h.index])
                visits = float(load.visits[h.index])
                context += rate
                hops.append({"class": cls.name, "hop": h.id, "context_tokens_per_s": rate,
                             "mean_context_tokens": float(load.context_tokens[h.index]) / visits if visits else 0.0})
        cap = float(analysis.capacity_tokens_per_s[j])
        offered = float(analysis.offered_tokens_per_s[j])
        low = offered - context
        out.append({
            "engine": spec.name, "kv_blocks": spec.kv.blocks, "block_size": spec.kv.block_size,
            "capacity_tokens_per_s": cap, "offered_tokens_per_s": offered, "rho": offered / cap,
            "context_tokens_per_s": context, "min_offered_tokens_per_s": low, "rho_min": low / cap,
            "token_scaling": cap / offered if offered > 0 else float("inf"),
            "prefix_scaling": cap / low if low > 0 else float("inf"),
            "hops": hops, "sources": dict(PREFIX_SOURCES),
        })
    return out


def prefix_scaling(analysis: NetworkAnalysis, prefix: list[dict | None]) -> float:
    """The largest scaling of all arrival rates with every context block cached at the engines with prefix
    caching (and no saving elsewhere): min over engines of capacity / (offered − context).  Necessary."""
    best = float("inf")
    for j, cap in enumerate(analysis.capacity_tokens_per_s):
        p = prefix[j] if j < len(prefix) else None
        low = float(analysis.offered_tokens_per_s[j]) if p is None else p["min_offered_tokens_per_s"]
        if low > 0:
            best = min(best, float(cap) / low)
    return best
