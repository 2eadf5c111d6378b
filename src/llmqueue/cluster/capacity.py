"""Pool capacity: Theorem 2 (arXiv 2504.07347 §3.2) summed over replicas, and what the router does to it.

* The pooled capacity C = Σ_j b_j / t_{b_j} (each replica's Theorem 2 capacity) bounds every
  router: above it the pool's backlog grows whatever the routing (each replica serves at most C_j).
* A **static** router sends a fixed share s_j of the arrivals to replica j (round robin 1/N,
  random its weights, session affinity the share of sessions hashed to j): replica j sees
  ρ_j = λ s_j (m_p + m_d) / C_j and the pool is stable iff max_j ρ_j < 1 (work-conserving
  schedulers); the replica of the largest ρ_j binds, and the router's largest stable rate is
  min_j C_j / (s_j (m_p + m_d)).
* **JSQ-type** routers (join the shortest queue, least outstanding tokens) send no work to a
  replica whose queue is longer than another's, so no replica overloads while another idles: the
  pool behaves as one server of capacity C and is stable below it (join-the-shortest-queue is
  throughput-optimal for parallel servers of unequal speeds; Foley & McDonald 2001, the
  MaxWeight argument of Tassiulas & Ephremides 1992).  Power of d is too on identical replicas
  (Mitzenmacher 2001); on unequal ones it can sample only slow replicas, so below C nothing is
  predicted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from llmqueue.analysis import Analysis, analyze
from llmqueue.cluster.config import ClusterConfig
from llmqueue.cluster.routers import SessionAffinity
from llmqueue.metrics import STABLE, UNSTABLE


def mg1_sojourn(rho: float, service_cv2: float) -> float:
    """Mean time in system of an M/G/1 FCFS queue, in mean services (Pollaczek–Khinchine):
    1 + ρ(1 + c²) / (2(1 − ρ)); c² the squared coefficient of variation of the service.  What a
    replica behind random routing is when it serves one request at a time (Poisson splitting)."""
    if not 0 <= rho < 1:
        return float("inf")
    return 1.0 + rho * (1.0 + service_cv2) / (2.0 * (1.0 - rho))


def supermarket_sojourn(rho: float, d: int = 2, terms: int = 64) -> float:
    """Mean time in system under power of d choices, in mean services, in Mitzenmacher's limit of
    infinitely many exponential servers (the supermarket model, 2001):
    Σ_{i≥1} ρ^((d^i − d)/(d − 1)); d = 1 is M/M/1's 1/(1 − ρ)."""
    if not 0 <= rho < 1:
        return float("inf")
    if d == 1:
        return 1.0 / (1.0 - rho)
    total = 0.0
    for i in range(1, terms + 1):
        power = (d ** i - d) / (d - 1)
        term = rho ** power
        total += term
        if term < 1e-16:
            break
    return total


@dataclass(frozen=True)
class PoolCapacity:
    router: str
    replicas: list[str]
    capacity_tokens_per_s: list[float]       # C_j
    pooled_capacity_tokens_per_s: float      # C = Σ C_j
    arrival_rate: float                      # λ (pool), requests/s
    mean_prompt_len: float
    mean_output_len: float
    offered_tokens_per_s: float
    rho: float                               # offered / C
    max_stable_rate_rps: float               # pooled λ* = C / (m_p + m_d)
    shares: list[float] | None               # static routers: each replica's share of the arrivals
    replica_rho: list[float] | None          # static routers: ρ_j
    binding: str | None                      # static routers: the replica of the largest ρ_j
    max_stable_rate_router_rps: float | None  # static routers: min_j C_j / (s_j (m_p + m_d))
    predicted: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def static_shares(cfg: ClusterConfig, router, capacities: np.ndarray) -> np.ndarray | None:
    """The share of arrivals a static router sends each replica (None: not static, or unknown)."""
    if not router.static:
        return None
    if isinstance(router, SessionAffinity):   # uniform sessions (or one per request: the ring's arcs)
        if cfg.sessions is not None:
            keys = np.arange(cfg.sessions, dtype=np.int64)
        else:
            keys = np.arange(100_000, dtype=np.int64)   # request ids: hashed uniformly over the ring
        owner = router.assign(keys, keys, keys)
        return np.bincount(owner, minlength=cfg.size) / len(keys)
    shares = router.shares(capacities)
    return None if shares is None else np.asarray(shares, dtype=np.float64)


def pool_capacity(cfg: ClusterConfig, workload, router=None) -> PoolCapacity:
    """The pool's capacity, the binding replica under static routing, and the prediction."""
    from llmqueue.cluster.sim import build_router, capacities_of
    from llmqueue.runner import build_engine

    router = build_router(cfg) if router is None else router
    caps = np.asarray(capacities_of(cfg))
    pooled = float(caps.sum())
    lam = workload.arrival_rate
    mp, md = workload.mean_prompt_len, workload.mean_output_len
    per = mp + md
    offered = lam * per
    rho = offered / pooled
    shares = static_shares(cfg, router, caps)
    wc = all(build_engine(r.config).scheduler.work_conserving for r in cfg.replicas)
    capped = any(r.config.engine.get("kv_blocks") is not None or r.config.engine.get("max_batch_requests") is not None
                 for r in cfg.replicas)
    replica_rho = binding = router_max = None
    if shares is not None:
        r_j = lam * shares * per / caps
        replica_rho, k = r_j.tolist(), int(np.argmax(r_j))
        binding = cfg.replicas[k].name
        with np.errstate(divide="ignore"):
            router_max = float(np.min(np.where(shares > 0, caps / (shares * per), np.inf)))
    hedge = "memory, a request cap or a non-work-conserving scheduler leaves Theorem 2 an upper bound"
    if rho > 1:
        predicted, reason = UNSTABLE, (f"the offered {offered:,.1f} tokens/s exceed the pooled capacity "
                                      f"{pooled:,.1f} tokens/s (ρ = {rho:.4f}): no router keeps up")
    elif shares is not None:
        if r_j[k] > 1:
            predicted, reason = UNSTABLE, (f"{cfg.router} sends replica {binding} {shares[k]:.1%} of the arrivals: "
                                          f"ρ = {r_j[k]:.4f} there although the pool's ρ = {rho:.4f}")
        elif wc and not capped:
            predicted, reason = STABLE, (f"every replica below its capacity (largest ρ = {r_j[k]:.4f}, at {binding}) "
                                        "with work-conserving schedulers (Theorem 2 per replica)")
        else:
            predicted, reason = "not predicted", f"below capacity at every replica, but {hedge}"
    elif router.pooled_stable or (cfg.router == "power-of-d" and len(set(caps.tolist())) == 1):
        if wc and not capped:
            predicted, reason = STABLE, (f"ρ = {rho:.4f} below the pooled capacity, and {cfg.router} never sends work "
                                        "to a longer queue while a shorter one waits (JSQ-type: stable below pooled "
                                        "capacity)")
        else:
            predicted, reason = "not predicted", f"below the pooled capacity, but {hedge}"
    else:
        predicted, reason = "not predicted", (f"ρ = {rho:.4f} below the pooled capacity; {cfg.router} is not known "
                                              "to keep every replica below its own")
    return PoolCapacity(cfg.router, [r.name for r in cfg.replicas], caps.tolist(), pooled, lam, mp, md, offered, rho,
                        pooled / per, None if shares is None else shares.tolist(), replica_rho, binding, router_max,
                        predicted, reason)


def pooled_analysis(cap: PoolCapacity) -> Analysis:
    """The pool as one server of the pooled capacity, for the pooled verdict's tolerance and distance."""
    return Analysis(token_budget=0, batch_time_s=float("nan"), capacity_tokens_per_s=cap.pooled_capacity_tokens_per_s,
                    peak_tokens_per_s=cap.pooled_capacity_tokens_per_s, peak_batch_tokens=0,
                    arrival_rate=cap.arrival_rate, mean_prompt_len=cap.mean_prompt_len,
                    mean_output_len=cap.mean_output_len, offered_tokens_per_s=cap.offered_tokens_per_s, rho=cap.rho,
                    max_stable_rate_rps=cap.max_stable_rate_rps,
                    fluid_growth_tokens_per_s=max(0.0, cap.offered_tokens_per_s - cap.pooled_capacity_tokens_per_s))


def replica_analysis(config, arrival_rate: float, workload) -> Analysis:
    from llmqueue.runner import batch_time_of

    return analyze(batch_time_of(config), config.engine["token_budget"], arrival_rate, workload.mean_prompt_len,
                   workload.mean_output_len, config.engine.get("max_batch_requests"))


__all__ = ["PoolCapacity", "pool_capacity", "pooled_analysis", "replica_analysis"]
