"""Stability of a network under its configured per-engine policies, and a policy advisor (arXiv 2504.07347 §5).

:func:`stability` says ``stable``, ``unstable`` or ``not predicted``, the reason, and the result it
rests on, in this order:

1. ρ_j > 1 at some engine: unstable under any policy (traffic equations; Theorem 2 per engine).
2. Acyclic routing between engines, work-conserving engines, ρ < 1: stable (paper §5).
3. Cyclic routing: the fluid model (:mod:`llmqueue.network.fluid`).  A virtual station of load > 1
   (Rybko & Stolyar 1992; Dai & Vande Vate 2000): unstable.  Otherwise the exact fluid trajectory
   from every standard initial backlog: all drain → stable (Dai 1995: a stable fluid model gives a
   stable network); one grows → unstable (its peaks grow by the reported factor per cycle).
4. Max-pressure at some engine: Dai & Lin (2005) prove maximum pressure stable whenever ρ < 1 for
   unbatched multiclass networks; for token-budget engines it is shown by simulation only
   (docs/network.md), so it is ``not predicted`` here.

``max_scaling`` is the largest scaling of every arrival rate that stays stable under the configured
policies: the traffic-equation bound 1 / max ρ, or less where a virtual station binds, confirmed (or
found by bisection) on the fluid trajectory.  :func:`advise` searches the per-engine class priority
orders (and FCFS) with the same criterion and recommends the order with the largest stable scaling.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from llmqueue.network.fluid import DRAINS, GROWS, FluidModel, NotFluid, decide, fluid_model, virtual_stations
from llmqueue.network.model import FCFS, MAX_PRESSURE, PRIORITY, Network

STABLE, UNSTABLE, NOT_PREDICTED = "stable", "unstable", "not predicted"
MAX_ORDERS = 720            # per-engine order combinations the advisor tries (beyond: FCFS and the configured)
BISECTION_STEPS = 14

REFS = {
    "traffic": "traffic equations: ρ_j < 1 at every engine is necessary (arXiv 2504.07347 §5, Theorem 2 per engine)",
    "acyclic": "arXiv 2504.07347 §5: work-conserving engines are stable below capacity when no job returns to an "
               "engine it left",
    "virtual": "virtual station (Rybko & Stolyar 1992; Dai & Vande Vate 2000, two-station fluid networks under "
               "static priority)",
    "fluid": "fluid model (Dai 1995: a fluid model that drains from every initial state gives a stable network)",
    "max_pressure": "Dai & Lin 2005 prove max-pressure stable whenever ρ < 1 for unbatched multiclass networks; "
                    "with token budgets this is shown by simulation here (docs/network.md), not proved",
}


@dataclass
class Stability:
    verdict: str                            # stable | unstable | not predicted
    reason: str
    rests_on: str
    max_scaling: float | None               # largest stable scaling of all rates under these policies
    traffic_max_scaling: float              # 1 / max ρ (necessary)
    virtual_stations: list[dict] = field(default_factory=list)
    fluid: dict | None = None               # the fluid decision at the configured rates
    fluid_reason: str | None = None         # why there is no fluid model (None: there is one)
    scaling_source: str = ""

    @property
    def predicted(self) -> str:
        return f"{self.verdict} ({self.reason}; {self.rests_on})"

    def to_dict(self) -> dict:
        return {"predicted": self.predicted, "verdict": self.verdict, "reason": self.reason,
                "rests_on": self.rests_on, "max_scaling": self.max_scaling,
                "max_scaling_source": self.scaling_source,
                "traffic_max_scaling": self.traffic_max_scaling, "virtual_stations": self.virtual_stations,
                "fluid": self.fluid, "fluid_not_applicable": self.fluid_reason}


def _fluid_summary(dec) -> dict:
    w = dec.worst
    return {"outcome": dec.outcome, "start": w.start, "drain_time_per_token_s": w.drain_time,
            "growth_factor": w.growth_factor, "cycle_factor": w.cycle_factor, "events": w.events,
            "starts": [{"start": p.start, "outcome": p.outcome, "drain_time_per_token_s": p.drain_time,
                        "growth_factor": p.growth_factor} for p in dec.paths]}


def fluid_scaling(model: FluidModel, upper: float) -> tuple[float, str]:
    """The largest α ≤ upper at which the fluid drains from every standard start.  The fluid is judged on
    a grid below ``upper`` (its paths need not be unique, so one point is not enough): draining at every
    grid point gives ``upper`` itself (a closed-form bound that binds); else bisection between the
    largest draining point and the first one above it that does not drain."""
    grid = [upper * f for f in (0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.995)]
    ok = [decide(model.scaled(x)).outcome == DRAINS for x in grid]
    if all(ok):
        return upper, "closed form; the fluid drains at 0.25–0.995 of it"
    first_bad = ok.index(False)
    lo, hi = (grid[first_bad - 1] if first_bad else 0.0), grid[first_bad]
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if decide(model.scaled(mid)).outcome == DRAINS:
            lo = mid
        else:
            hi = mid
    return lo, f"fluid trajectory, bisection to ±{(hi - lo):.1g}"


def _fmt_vs(v: dict) -> str:
    return (f"{{{v['visits'][0]} at {v['engines'][0]}, {v['visits'][1]} at {v['engines'][1]}}} load "
            f"{v['terms'][0]:.4g} + {v['terms'][1]:.4g} = {v['load']:.4g}")


def stability(net: Network, analysis, policies: list[tuple[str, tuple[int, ...]]] | None = None,
              scaling: bool = True) -> Stability:
    """What the theory says about ``net`` at its rates under ``policies`` (default: as configured)."""
    a = analysis
    traffic = float(a.max_scaling)
    pol = policies if policies is not None else [(e.policy, tuple(e.class_priority)) for e in net.engines]
    if a.max_rho > 1:
        j = int(np.argmax(a.rho))
        return Stability(UNSTABLE, f"ρ = {a.max_rho:.4f} > 1 at engine {a.engines[j]}", REFS["traffic"], traffic,
                         traffic, scaling_source="traffic equations")
    pool = a.pool_verdict()   # a pool's router (docs/network.md, "Pools as engines")
    if pool is not None:
        routed = min([traffic] + [1.0 / max(p.replica_rho) for p in a.pools
                                  if p is not None and p.replica_rho is not None and max(p.replica_rho) > 0])
        if pool[0] == UNSTABLE:
            return Stability(UNSTABLE, pool[1], REFS["traffic"], routed, traffic, scaling_source="static routing")
        if a.max_rho < 1:
            return Stability(NOT_PREDICTED, pool[1], REFS["traffic"], None, traffic)
    if not a.cyclic and a.work_conserving and a.max_rho < 1:
        return Stability(STABLE, f"acyclic routing between engines, work-conserving engines, max ρ = {a.max_rho:.4f}",
                         REFS["acyclic"], traffic, traffic, scaling_source="traffic equations")
    if a.max_rho == 1:
        return Stability(NOT_PREDICTED, "max ρ = 1: the boundary", REFS["traffic"], traffic, traffic,
                         scaling_source="traffic equations")
    if not a.cyclic:
        return Stability(NOT_PREDICTED, "an engine that is not work-conserving: ρ < 1 is necessary, not sufficient",
                         REFS["traffic"], None, traffic)
    mp = [net.engines[j].name for j, (p, _) in enumerate(pol) if p == MAX_PRESSURE]
    if mp:
        return Stability(NOT_PREDICTED, f"max-pressure at {', '.join(mp)}, max ρ = {a.max_rho:.4f}",
                         REFS["max_pressure"], None, traffic, fluid_reason="max-pressure has no static levels")
    try:
        model = fluid_model(net, a, pol)
    except NotFluid as exc:
        return Stability(NOT_PREDICTED, f"cyclic routing (a job returns to an engine it left): ρ < 1 is necessary, "
                         f"not sufficient, and the fluid model here does not apply ({exc})", REFS["traffic"], None,
                         traffic, fluid_reason=str(exc))
    vs = virtual_stations(model)
    dec = decide(model)
    fl = _fluid_summary(dec)
    upper = traffic
    if vs and vs[0]["load"] > 0:
        upper = min(upper, 1.0 / vs[0]["load"])
    alpha, source = (fluid_scaling(model, upper) if scaling else (None, ""))
    memory = [e.name for e in net.engines if any(r.kv is not None for r in e.replicas)]
    caching = [e.name for e in net.engines if any(r.prefix_caching for r in e.replicas)]
    if vs and vs[0]["load"] > 1:
        verdict, reason, rests = (UNSTABLE, f"virtual station {_fmt_vs(vs[0])} > 1 although max ρ = "
                                  f"{a.max_rho:.4f}" + _growth_note(fl), REFS["virtual"])
    elif dec.outcome == GROWS:
        verdict, reason, rests = UNSTABLE, f"the fluid model grows from the backlog at {fl['start']}" + \
            _growth_note(fl), REFS["fluid"]
    elif dec.outcome == DRAINS:
        extra = f"; virtual station {_fmt_vs(vs[0])} < 1" if vs else ""
        verdict, reason, rests = (STABLE, f"the fluid model drains from every standard initial backlog "
                                  f"({len(dec.paths)} starts){extra}, max ρ = {a.max_rho:.4f}", REFS["fluid"])
    else:
        verdict, reason, rests = (NOT_PREDICTED, f"the fluid model is undecided after {fl['events']} events from "
                                  f"the backlog at {fl['start']}", REFS["fluid"])
    if caching and verdict != NOT_PREDICTED:
        reason = (f"{verdict} without caching, but prefix caching at {', '.join(caching)} changes the work "
                  f"(the fluid model counts every token): {reason}")
        verdict = NOT_PREDICTED
    elif memory and verdict == STABLE:
        reason = (f"stable with unlimited memory, but KV memory at {', '.join(memory)} is not in the fluid model "
                  f"(its bounds are necessary only): {reason}")
        verdict = NOT_PREDICTED
    if (memory or caching) and source:
        source += "; tokens only: the fluid model has unlimited KV memory and no prefix caching"
    return Stability(verdict, reason, rests, alpha, traffic, vs, fl, None, source)


def _growth_note(fl: dict) -> str:
    g = fl.get("growth_factor")
    if fl["outcome"] != GROWS:
        return ""
    if g is None:
        return "; the fluid grows without bound"
    return f"; the fluid's peaks grow ×{g:.4g} per half-cycle (×{fl['cycle_factor']:.4g} per cycle)" \
        if fl.get("cycle_factor") else f"; the fluid's peaks grow ×{g:.4g}"


# ---- the advisor -----------------------------------------------------------------------------------

def _orders(net: Network) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Per-engine priority orders over the classes visiting each engine, all combinations (capped)."""
    per_engine = []
    for j, spec in enumerate(net.engines):
        here = [k for k, c in enumerate(net.classes) if any(h.engine == j for h in c.hops)]
        options = [(PRIORITY, p) for p in itertools.permutations(here)] if len(here) > 1 else [(FCFS, ())]
        per_engine.append(options)
    combos = 1
    for o in per_engine:
        combos *= len(o)
    if combos > MAX_ORDERS:
        return []
    return [list(c) for c in itertools.product(*per_engine)]


def policy_label(net: Network, pol: list[tuple[str, tuple[int, ...]]]) -> str:
    parts = []
    for spec, (p, order) in zip(net.engines, pol):
        if p == PRIORITY:
            parts.append(f"{spec.name}: " + " > ".join(net.classes[k].name for k in order))
        else:
            parts.append(f"{spec.name}: {p}")
    return "; ".join(parts)


def advise(net: Network, analysis) -> dict:
    """Every per-engine class priority order (and FCFS everywhere, and the configured policies) judged by
    the fluid criterion; the recommendation is the one predicted stable at the configured rates with the
    largest stable scaling (ties: the configured policies, then the fluid that drains fastest from the
    slowest standard start).  Max-pressure is listed with what is proved for it."""
    configured = [(e.policy, tuple(e.class_priority)) for e in net.engines]
    candidates = [("configured", configured), ("fcfs", [(FCFS, ()) for _ in net.engines])]
    orders = _orders(net)
    candidates += [("priority", o) for o in orders]
    seen, rows = set(), []
    for kind, pol in candidates:
        key = tuple((p, o if p == PRIORITY else ()) for p, o in pol)
        if key in seen and kind != "configured":
            continue
        seen.add(key)
        s = stability(net, analysis, pol)
        fl = s.fluid or {}
        rows.append({"kind": kind, "policies": policy_label(net, pol),
                     "drain_time_per_token_s": fl.get("drain_time_per_token_s") if fl.get("outcome") == DRAINS else None,
                     "engines": [{"engine": spec.name, "policy": p,
                                  "class_priority": [net.classes[k].name for k in o] if p == PRIORITY else []}
                                 for spec, (p, o) in zip(net.engines, pol)],
                     "verdict": s.verdict, "max_scaling": s.max_scaling, "predicted": s.predicted,
                     "virtual_station_load": s.virtual_stations[0]["load"] if s.virtual_stations else None})
    rows.append({"kind": "max-pressure", "policies": "; ".join(f"{e.name}: max-pressure" for e in net.engines),
                 "engines": [{"engine": e.name, "policy": MAX_PRESSURE, "class_priority": []} for e in net.engines],
                 "verdict": NOT_PREDICTED, "max_scaling": None, "drain_time_per_token_s": None,
                 "predicted": f"{NOT_PREDICTED} ({REFS['max_pressure']})", "virtual_station_load": None})
    rank = {"configured": 0, "priority": 1, "fcfs": 2, "max-pressure": 3}
    judged = [r for r in rows if r["max_scaling"] is not None and r["verdict"] == STABLE]
    # the largest stable scaling; ties: the configured policies, then the fluid that drains fastest
    best = min(judged, key=lambda r: (-round(r["max_scaling"], 6), rank[r["kind"]] != 0,
                                      r["drain_time_per_token_s"] or float("inf"), rank[r["kind"]]), default=None)
    return {"candidates": rows, "recommended": best, "searched_orders": len(orders),
            "traffic_max_scaling": float(analysis.max_scaling),
            "note": ("orders searched: every permutation of the classes visiting each engine, combined over the engines"
                     if orders else f"more than {MAX_ORDERS} order combinations: only FCFS and the configured policies "
                     "were judged")}


def advised_overrides(net: Network, row: dict) -> list[str]:
    """``--set`` overrides that configure a candidate row of :func:`advise`."""
    out = []
    for e in row["engines"]:
        out.append(f"engines.{e['engine']}.policy={e['policy']}")
        if e["policy"] == PRIORITY:
            out.append(f"engines.{e['engine']}.class_priority=[" + ", ".join(f'"{c}"' for c in e["class_priority"])
                       + "]")
    return out
