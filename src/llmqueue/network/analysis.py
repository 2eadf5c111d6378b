"""Traffic equations of a network of engines (PAPER.md §6, paper §5).

For each class k the route is a finite Markov chain on (hop, round counters) plus forks and
joins (:mod:`llmqueue.network.routes`).  The expected visits v per job solve
``v = e_first + Wᵀ v`` — a fork sends one branch to each listed hop, a join runs once per
fork (each arriving branch counts 1/n) — and the expected carried output (for hops with
``add_previous_output``) solves the same kind of linear system.  Then per job

    T_{k,j} = Σ_{hops h of k at engine j} v_h (m_p,h + m_d,h) + [grows_h] E[carried output into h],

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

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import spsolve

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

    @property
    def max_rho(self) -> float:
        return float(self.rho.max())

    def prediction(self) -> str:
        """What the traffic equations say about this network at these rates."""
        if self.max_rho > 1:
            return "unstable"
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
        }


def _solve(n: int, edges: list[tuple[int, int, float]], rhs: np.ndarray, diag: np.ndarray | None = None) -> np.ndarray:
    """x = rhs + Wᵀ D x for the edge weights W (D = diag, default identity), by one sparse solve."""
    rows = [b for _, b, _ in edges]
    cols = [a for a, _, _ in edges]
    vals = [w * (1.0 if diag is None else diag[a]) for a, _, w in edges]
    m = sparse.identity(n, format="csc") - sparse.csc_matrix((vals, (rows, cols)), shape=(n, n))
    return np.atleast_1d(spsolve(m, rhs))


def class_load(route) -> ClassLoad:
    """Expected visits, tokens and delay per job for one route."""
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
    return ClassLoad(h_visits, prompt + h_visits * m_d, prompt, float(delay), succ)


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
    cap = np.array([capacity(e.batch_time, e.token_budget)[1] for e in net.engines])
    rates = np.asarray(net.rates if net.rates else [c.arrivals.rate for c in net.classes], dtype=float)
    offered = rates @ tokens
    rho = offered / cap
    top = int(np.argmax(rho))
    wc = all(scheduler_class(e.scheduler).work_conserving for e in net.engines)
    return NetworkAnalysis(
        engines=tuple(e.name for e in net.engines), rates=tuple(float(r) for r in rates),
        capacity_tokens_per_s=cap, offered_tokens_per_s=offered, rho=rho, tokens_per_job=tokens,
        visits_per_job=visits, max_scaling=float(1.0 / rho[top]) if rho[top] > 0 else float("inf"),
        bottleneck=net.engines[top].name, cyclic=engine_graph_cyclic(net), work_conserving=wc, classes=loads,
    )
