"""The largest stable arrival rate, found by bisection over simulated runs (Theorem 2, arXiv 2504.07347 §3.2).

Each probed rate λ runs the same ``n`` seeds. A rate **passes** when every seed's verdict
is ``stable`` (after the warm-up, the 98 % interval of the backlog's growth lies below the
tolerance, a fraction of capacity; metrics.verdict) and, with SLOs, every seed meets them. An
``unstable``, ``inconclusive`` or ``rejects`` verdict or a missed SLO makes the rate fail:
inconclusive means "not shown stable" (a horizon too short for the system's relaxation time
gives it), so the search is conservative. A run that fails with an error
stops the search (an error says nothing about stability); failed probes are retried by the
next search, finished ones reused.

Confidence: for a rate whose true backlog growth exceeds the tolerance, each seed calls it
stable with probability at most 1 % (the upper end of a two-sided 98 % interval), so all
``n`` independent seeds do with probability at most 0.01**n (1e-6 for 3 seeds). The
search starts at the closed-form λ* (Theorem 2; with KV memory the smaller of λ* and the memory
bound λ_mem, docs/memory.md), halves or doubles until it brackets the
boundary, then bisects until the bracket [passing, failing] is narrower than ``rel_tol``
of the passing rate; it assumes that passing is monotone in the rate.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmqueue.config import Config, parse_config, set_dotted
from llmqueue.errors import ConfigError, LlmqueueError
from llmqueue.metrics import CONFIDENCE, REJECTS
from llmqueue.runner import analysis_of, build_workload, memory_of, prefix_of
from llmqueue.sweep.driver import run_tasks
from llmqueue.sweep.executors import OK, Task
from llmqueue.sweep.grid import config_hash
from llmqueue.sweep.store import Store

SLO_METRICS = {"ttft": "ttft_s", "tbt": "tbt_s", "e2e": "e2e_s"}
SLO_STATS = ("mean", "p50", "p90", "p99")
MAX_EXPANSIONS = 10  # halvings (or doublings) of the start rate before giving up
PER_SEED_MISS = (1 - CONFIDENCE) / 2


@dataclass(frozen=True)
class Slo:
    """``ttft_p99=2.0``: the 99th percentile of time to first token at most 2 seconds."""

    metric: str
    stat: str
    limit_s: float

    @property
    def name(self) -> str:
        return f"{self.metric}_{self.stat}"

    def value(self, summary: dict) -> float | None:
        return summary[SLO_METRICS[self.metric]][self.stat]


def parse_slo(item: str) -> Slo:
    allowed = (f"NAME=SECONDS with NAME one of {', '.join(f'{m}_{s}' for m in SLO_METRICS for s in SLO_STATS)} "
               "and SECONDS > 0")
    name, sep, raw = item.partition("=")
    metric, _, stat = name.strip().partition("_")
    if not sep or metric not in SLO_METRICS or stat not in SLO_STATS:
        raise ConfigError("--slo", item, allowed)
    try:
        limit = float(raw)
    except ValueError:
        raise ConfigError("--slo", item, allowed) from None
    if not limit > 0 or limit == float("inf"):
        raise ConfigError("--slo", item, allowed)
    return Slo(metric, stat, limit)


@dataclass
class Probe:
    rate_rps: float
    passed: bool
    verdicts: dict[str, int]
    reason: str


@dataclass
class Bisection:
    """Bracket [lo passes, hi fails] around the boundary, starting from ``start``."""

    start: float
    rel_tol: float
    lo: float | None = None
    hi: float | None = None
    stopped: bool = False   # no rate can pass (every seed rejects requests: the rate does not matter)

    def next_rate(self) -> float | None:
        if self.stopped:
            return None
        if self.lo is None and self.hi is None:
            return _round(self.start)
        if self.lo is None:
            rate = _round(self.hi / 2)
            return rate if rate >= self.start / 2 ** MAX_EXPANSIONS else None
        if self.hi is None:
            rate = _round(self.lo * 2)
            return rate if rate <= self.start * 2 ** MAX_EXPANSIONS else None
        mid = _round((self.lo + self.hi) / 2)
        if self.hi - self.lo <= self.rel_tol * self.lo or mid in (self.lo, self.hi):
            return None
        return mid

    def record(self, rate: float, passed: bool) -> None:
        if passed:
            self.lo = rate if self.lo is None else max(self.lo, rate)
        else:
            self.hi = rate if self.hi is None else min(self.hi, rate)


def _round(rate: float) -> float:
    return float(f"{rate:.6g}")  # short, stable rates: the same search reuses the same stored runs


@dataclass
class MaxRate:
    """One search's answer: the largest passing rate, the smallest failing one, λ*."""

    overrides: tuple[tuple[str, Any], ...]
    max_rate_rps: float | None
    failed_rate_rps: float | None
    lambda_star_rps: float
    seeds: list[int]
    slos: list[Slo]
    rel_tol: float
    probes: list[Probe] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tolerance: float = 0.01
    memory_bound_rps: float | None = None   # λ_mem with engine.kv_blocks (necessary; docs/memory.md)

    @property
    def bound_rps(self) -> float:
        """The closed form's binding bound: λ*, or λ_mem where KV memory binds first."""
        return self.lambda_star_rps if self.memory_bound_rps is None else min(self.lambda_star_rps,
                                                                               self.memory_bound_rps)

    @property
    def confidence(self) -> str:
        n = len(self.seeds)
        slo = " and meets every SLO" if self.slos else ""
        basis = "capacity" if self.memory_bound_rps is None else "capacity or of the memory-bound throughput"
        return (f"a rate passes when each of {n} seeds is judged stable ({CONFIDENCE:.0%} interval of the backlog "
                f"growth after the warm-up below {self.tolerance:.0%} of {basis}){slo}; an inconclusive or rejects "
                f"verdict fails. A rate whose growth exceeds that tolerance passes with probability <= "
                f"{PER_SEED_MISS:g}^{n} = {PER_SEED_MISS ** n:.1e}; "
                f"the bracket is narrowed to {self.rel_tol:.1%}")

    def to_row(self, config: dict) -> dict:
        return {"config": config, "seeds": self.seeds, "slos": {s.name: s.limit_s for s in self.slos},
                "rel_tol": self.rel_tol, "max_rate_rps": self.max_rate_rps, "failed_rate_rps": self.failed_rate_rps,
                "lambda_star_rps": self.lambda_star_rps, "memory_bound_rps": self.memory_bound_rps,
                "confidence": self.confidence,
                "probes": [p.__dict__ for p in self.probes]}


def judge(runs: list[dict | None], slos: list[Slo]) -> tuple[bool, dict[str, int], str]:
    """Whether a rate passes, from its stored runs (one per seed), and why not."""
    counts: dict[str, int] = {}
    reasons = []
    for run in runs:
        if run is None or run["status"] != OK:
            counts["failed"] = counts.get("failed", 0) + 1
            reasons.append(f"seed {run['seed'] if run else '?'} failed: {run['error'] if run else 'not stored'}")
            continue
        s = run["summary"]
        counts[s["verdict"]] = counts.get(s["verdict"], 0) + 1
        if s["verdict"] != "stable":
            reasons.append(f"seed {run['seed']} {s['verdict']}")
        for slo in slos:
            v = slo.value(s)
            if v is None or v > slo.limit_s:
                counts["slo missed"] = counts.get("slo missed", 0) + 1
                shown = "none" if v is None else f"{v:.3g} s"
                reasons.append(f"seed {run['seed']} {slo.name} {shown} > {slo.limit_s:g} s")
    return not reasons, counts, "; ".join(reasons[:3]) + (" ..." if len(reasons) > 3 else "")


def _probe_config(base: Config, rate: float, seed: int) -> Config:
    data = base.portable()
    set_dotted(data, "workload.rate", rate)
    set_dotted(data, "run.seed", seed)
    return parse_config(data, base.base_dir)


def search_hash(base: Config, seeds: list[int], slos: list[Slo], rel_tol: float) -> str:
    data = copy.deepcopy(base.portable())
    for key in ("rate", "load"):
        data["workload"].pop(key, None)
    text = json.dumps([config_hash(data), seeds, sorted((s.name, s.limit_s) for s in slos), rel_tol])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_searchable(base: Config, where: str) -> float:
    """λ* of a config whose arrivals have a rate (not a trace); raises otherwise."""
    if base.workload["arrival"] == "trace":
        raise ConfigError(f"{where}workload.arrival", "trace",
                          "poisson, deterministic or gamma: max-rate changes the arrival rate")
    return analysis_of(base, build_workload(base)).max_stable_rate_rps


def max_rate(bases: list[tuple[tuple[tuple[str, Any], ...], Config]], seeds: list[int], store: Store, executor, *,
             slos: list[Slo] | None = None, rel_tol: float = 0.01, on_start=None, on_result=None,
             on_probe: Callable[[int, Probe], None] | None = None) -> list[MaxRate]:
    """Search every base config (a grid point) at once: each round probes every unfinished
    search's next rate with all seeds, through ``executor``, reusing and filling ``store``."""
    slos = list(slos or [])
    if not 0 < rel_tol < 1:
        raise ConfigError("--rel-tol", rel_tol, "a number between 0 and 1 (e.g. 0.01)")
    searches = []
    for overrides, base in bases:
        where = ", ".join(f"{k}={v}" for k, v in overrides)
        lam = check_searchable(base, f"grid point {where}: " if where else "")
        workload = build_workload(base)
        notes = [n for n in analysis_of(base, workload).notes]
        memory = None
        if base.engine.get("prefix_caching"):   # shared blocks: the memory bounds do not apply, λ* moves
            lam = prefix_of(base, workload).max_stable_rate_prefix_rps
            notes.append("prefix caching: λ* is Theorem 2's with every shared block found in the cache "
                         "(docs/prefix_caching.md)")
        elif base.engine.get("kv_blocks"):
            memory = memory_of(base, workload).memory_necessary_blocks_rps
        result = MaxRate(overrides, None, None, lam, list(seeds), slos, rel_tol, notes=notes,
                         tolerance=base.run.verdict_tolerance, memory_bound_rps=memory)
        searches.append((base, Bisection(result.bound_rps, rel_tol), result))   # start at the binding bound
    while True:
        round_ = []
        for i, (base, bisect, _) in enumerate(searches):
            rate = bisect.next_rate()
            if rate is not None:
                configs = [_probe_config(base, rate, s) for s in seeds]
                round_.append((i, rate, [Task(config_hash(c.portable()), c.run.seed, c.portable(), str(c.base_dir))
                                         for c in configs]))
        if not round_:
            break
        tasks = [t for _, _, ts in round_ for t in ts]
        run_tasks(list({t.key: t for t in tasks}.values()), store, executor, retry_failed=True, on_start=on_start,
                  on_result=on_result)
        for i, rate, ts in round_:
            _, bisect, result = searches[i]
            runs = [store.get(t.config_hash, t.seed) for t in ts]
            broken = [r for r in runs if r is None or r["status"] != OK]
            if broken:  # an error says nothing about stability: stop rather than bisect on it
                where = ", ".join(f"{k}={v}" for k, v in result.overrides)
                raise LlmqueueError(f"max-rate{' ' + where if where else ''}: the run at rate {rate} req/s, seed "
                                    f"{broken[0]['seed'] if broken[0] else '?'} failed "
                                    f"({broken[0]['error'] if broken[0] else 'not stored'}); finished probes are "
                                    "stored and the next search reuses them")
            passed, counts, reason = judge(runs, slos)
            bisect.record(rate, passed)
            if counts.get(REJECTS) == len(runs) and bisect.lo is None:
                bisect.stopped = True     # rejections come from request sizes, not from the rate
                result.notes.append(f"every seed rejects requests at {rate:g} req/s, and no rate changes that: "
                                    + runs[0]["summary"]["verdict_reason"].split("; the backlog of")[0])
            probe = Probe(rate, passed, counts, reason)
            result.probes.append(probe)
            if on_probe is not None:
                on_probe(i, probe)
    results = []
    for base, bisect, result in searches:
        result.max_rate_rps, result.failed_rate_rps = bisect.lo, bisect.hi
        data = base.portable()
        for key in ("rate", "load"):
            data["workload"].pop(key, None)
        store.record_max_rate(search_hash(base, list(seeds), slos, rel_tol), result.to_row(data))
        results.append(result)
    return results
