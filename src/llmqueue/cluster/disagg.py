"""Prefill/decode disaggregation: a prefill pool, a KV transfer, a decode pool (docs/cluster.md).

A request's prompt runs on a prefill replica (a request of v_p prompt tokens and no output).
The batch that finishes the prompt emits the first token, and that time is the paper's first
token (arXiv 2504.07347 §3.1). Its KV then moves to a decode replica, which takes
``kv_bytes_per_token × v_p / link_bytes_per_s`` or a fixed ``transfer_s``. The request then runs
its v_d decode iterations there: a request of 1 token and v_d − 1 outputs, i.e. v_d batches of
one token each. Each pool has its own replicas and router ([cluster.prefill], [cluster.decode],
each a [cluster] table of docs/cluster.md).

Decode replicas with KV memory (``kv_blocks``) hold the transferred prompt: there the request is
v_p + 1 prompt tokens of which v_p are computed on admission (:meth:`Engine.admit`'s computed
context), so it waits until blocks for its whole sequence are free and holds ⌈(v_p + k)/B⌉
blocks after k decode iterations; a preempted one recomputes its prompt on the decode replica.

Capacity: the prefill pool serves λ m_p prompt tokens/s against its pooled capacity C_P, and the
decode pool λ m_d tokens/s against C_D, so λ*_PD = min(C_P / m_p, C_D / m_d). For G identical
GPUs, :func:`plan` picks the P:D split that maximises it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmqueue.checks import integer, number
from llmqueue.cluster.config import ClusterConfig, parse_cluster
from llmqueue.errors import ConfigError
from llmqueue.model.workload import Requests

DISAGG_KEYS = {"prefill", "decode", "transfer_s", "kv_bytes_per_token", "link_bytes_per_s"}


@dataclass(frozen=True)
class DisaggConfig:
    prefill: ClusterConfig
    decode: ClusterConfig
    transfer_s: float | None
    kv_bytes_per_token: float | None
    link_bytes_per_s: float | None
    load: float | None
    data: dict[str, Any]

    def transfer_durations(self, prompts: np.ndarray) -> np.ndarray:
        if self.transfer_s is not None:
            return np.full(len(prompts), self.transfer_s)
        return prompts * self.kv_bytes_per_token / self.link_bytes_per_s


@dataclass(frozen=True)
class StageWorkload:
    """What a pool's capacity and summaries read of a workload: its rate, mean lengths, arrivals."""

    arrival_rate: float
    mean_prompt_len: float
    mean_output_len: float
    arrivals: Any = None


def is_disaggregated(data: dict[str, Any]) -> bool:
    c = data.get("cluster")
    return isinstance(c, dict) and ("prefill" in c or "decode" in c)


def _pool_data(data: dict[str, Any], which: str) -> dict[str, Any]:
    table = data["cluster"].get(which)
    if table is None:
        raise ConfigError(f"cluster.{which}", None, "a table with replicas and router (both pools are needed)")
    if not isinstance(table, dict):
        raise ConfigError(f"cluster.{which}", table, "a table with replicas and router")
    return {**{k: v for k, v in data.items() if k != "cluster"}, "cluster": table}


def _prefixed(exc: ConfigError, which: str) -> ConfigError:
    name = exc.field.replace("cluster.", f"cluster.{which}.", 1) if exc.field.startswith("cluster") else exc.field
    return ConfigError(name, exc.value, exc.allowed)


def parse_disagg(data: dict[str, Any], base_dir: Path | None = None) -> DisaggConfig:
    """Validate a disaggregated cluster config (``[cluster.prefill]`` and ``[cluster.decode]``)."""
    from llmqueue.analysis import capacity
    from llmqueue.runner import batch_time_of, build_workload

    data = copy.deepcopy(dict(data))
    cluster = data["cluster"]
    for key in cluster:
        if key not in DISAGG_KEYS:
            raise ConfigError(f"cluster.{key}", cluster[key], f"a known key of a disaggregated cluster: "
                                                              f"{', '.join(sorted(DISAGG_KEYS))}")
    fixed = cluster.get("transfer_s")
    per_token, link = cluster.get("kv_bytes_per_token"), cluster.get("link_bytes_per_s")
    if fixed is not None and (per_token is not None or link is not None):
        raise ConfigError("cluster.transfer_s", fixed, "omitted when kv_bytes_per_token and link_bytes_per_s are given")
    if fixed is None and (per_token is None) != (link is None):
        missing = "link_bytes_per_s" if link is None else "kv_bytes_per_token"
        raise ConfigError(f"cluster.{missing}", None, "given with the other (the transfer takes kv_bytes_per_token × "
                                                      "prompt / link_bytes_per_s), or use transfer_s")
    fixed = number(fixed, "cluster.transfer_s", at_least=0) if fixed is not None else None
    if per_token is not None:
        per_token = number(per_token, "cluster.kv_bytes_per_token", above=0)
        link = number(link, "cluster.link_bytes_per_s", above=0)
    if fixed is None and per_token is None:
        fixed = 0.0
    workload = data.setdefault("workload", {})
    load = None
    if workload.get("arrival", "poisson") != "trace" and "rate" not in workload:
        load = float(number(workload.pop("load", 0.9), "workload.load", above=0))
        workload["rate"] = 1.0   # a placeholder, resolved below against λ*_PD
    pools = {}
    for which in ("prefill", "decode"):
        try:
            pools[which] = parse_cluster(_pool_data(data, which), base_dir)
        except ConfigError as exc:
            raise _prefixed(exc, which) from None
    if any(r.config.engine.get("kv_blocks") is not None for r in pools["prefill"].replicas):
        raise ConfigError("cluster.prefill.replicas", "kv_blocks", "prefill replicas without engine.kv_blocks: a "
                          "prefill replica holds a prompt's blocks until the decode replica has read them, which is "
                          "not modelled yet (memory goes on [[cluster.decode.replicas]]; docs/cluster.md)")
    if load is not None:
        w = build_workload(pools["prefill"].base)
        caps = {k: sum(capacity(batch_time_of(r.config), r.config.engine["token_budget"])[1] for r in p.replicas)
                for k, p in pools.items()}
        best = min(caps["prefill"] / w.mean_prompt_len, caps["decode"] / max(w.mean_output_len, 1e-12))
        data["workload"]["rate"] = load * best
        for which in ("prefill", "decode"):
            pools[which] = parse_cluster(_pool_data(data, which), base_dir)
    return DisaggConfig(pools["prefill"], pools["decode"], fixed, per_token, link, load, data)


def load_disagg(source: str | Path, overrides: list[str] | None = None) -> DisaggConfig:
    from llmqueue.cluster.config import read_cluster_data

    return parse_disagg(*read_cluster_data(source, overrides))


@dataclass
class DisaggRun:
    summary: dict
    first_token_time: np.ndarray
    finish_time: np.ndarray
    extra: dict = field(default_factory=dict)


def run_disagg(cfg: DisaggConfig) -> DisaggRun:
    """Both pools, the transfer between them, and the end-to-end latencies."""
    from llmqueue.cluster.run import generate_pool, summarize_pool
    from llmqueue.cluster.sim import simulate_pool
    from llmqueue.metrics import latency_stats

    workload, requests = generate_pool(cfg.prefill)
    n = len(requests)
    lam = workload.arrival_rate
    gaps = workload.arrivals
    prefill_requests = Requests(requests.arrival_time, requests.num_prompt_tokens, np.zeros(n, np.int64))
    pre = simulate_pool(cfg.prefill, prefill_requests)
    pre_run = summarize_pool(cfg.prefill, pre, StageWorkload(lam, workload.mean_prompt_len, 0.0, gaps))
    first = np.full(n, np.nan)
    for idx, r in zip(pre.replica_requests, pre.results):
        first[idx] = r.finish_time
    outputs = requests.num_output_tokens
    goes = np.flatnonzero(~np.isnan(first) & (outputs > 0))
    ready = first[goes] + cfg.transfer_durations(requests.num_prompt_tokens[goes].astype(np.float64))
    order = np.argsort(ready, kind="stable")
    goes, ready = goes[order], ready[order]
    decode_requests = Requests(ready, np.ones(len(goes), np.int64), outputs[goes] - 1)
    share = len(goes) / max(n, 1)
    mean_d = float(outputs[goes].mean()) if len(goes) else 0.0
    stage = StageWorkload(lam * share, 1.0, max(mean_d - 1.0, 0.0))
    if _has_memory(cfg.decode):
        check_decode_memory(cfg, requests.num_prompt_tokens[goes] + outputs[goes])
        dec = simulate_decode_memory(cfg.decode, decode_requests, requests.num_prompt_tokens[goes])
        dec_run = _hedged(cfg.decode, summarize_pool(_without_memory(cfg.decode), dec, stage), stage)
    else:
        dec = simulate_pool(cfg.decode, decode_requests, engines=decode_engines(cfg.decode))
        dec_run = summarize_pool(cfg.decode, dec, stage)
    finish = np.where(outputs == 0, first, np.nan)
    for idx, r in zip(dec.replica_requests, dec.results):
        finish[goes[idx]] = r.finish_time
    horizon = max(pre.horizon_s, dec.horizon_s)
    done = finish <= horizon
    started = first <= horizon
    arrival = requests.arrival_time
    tpot = (finish - first)[done & (outputs > 0)] / outputs[done & (outputs > 0)]
    transfer = cfg.transfer_durations(requests.num_prompt_tokens.astype(np.float64))
    c_p = pre_run.capacity.pooled_capacity_tokens_per_s
    c_d = dec_run.capacity.pooled_capacity_tokens_per_s
    mp, md = workload.mean_prompt_len, workload.mean_output_len
    lam_star = min(c_p / mp, c_d / md if md > 0 else np.inf)
    pools_stable = [pre_run.summary["pool"]["verdict"], dec_run.summary["pool"]["verdict"]]
    summary = {
        "arrived": int(np.count_nonzero(arrival <= horizon)), "completed": int(np.count_nonzero(done)),
        "horizon_s": horizon, "arrival_rate": lam, "load": cfg.load,
        "max_stable_rate_rps": lam_star, "binding_pool": "prefill" if c_p / mp <= (c_d / md if md else np.inf)
        else "decode",
        "verdict": "unstable" if "unstable" in pools_stable else "stable" if pools_stable == ["stable", "stable"]
        else "inconclusive",
        "ttft_s": latency_stats(first[started] - arrival[started]), "tpot_s": latency_stats(tpot),
        "e2e_s": latency_stats(finish[done] - arrival[done]), "transfer_s": latency_stats(transfer),
        "prefill": pre_run.summary, "decode": dec_run.summary,
    }
    if _has_memory(cfg.decode):
        summary["decode_kv"] = _kv_totals(dec_run.summary)
    return DisaggRun(summary, first, finish, {"prefill": pre_run, "decode": dec_run})


# ---- decode replicas with KV memory ---------------------------------------------------------

def _has_memory(pool: ClusterConfig) -> bool:
    return any(r.config.engine.get("kv_blocks") is not None for r in pool.replicas)


def _kv_totals(pool_summary: dict) -> dict:
    """The decode pool's KV memory over its replicas with memory: preemptions, recomputed tokens and
    batches memory limited (sums), peak and mean block utilisation (largest, mean)."""
    kv = [r["summary"]["kv"] for r in pool_summary["replicas"] if "kv" in r["summary"]]
    return {"replicas": len(kv), "preemptions": sum(k["preemptions"] for k in kv),
            "recomputed_tokens": sum(k["recomputed_tokens"] for k in kv),
            "memory_limited_batches": sum(k["memory_limited_batches"] for k in kv),
            "peak_utilisation": max(k["peak_utilisation"] for k in kv),
            "mean_utilisation": float(np.mean([k["mean_utilisation"] for k in kv]))}


def _replica_field(cfg: DisaggConfig, j: int) -> str:
    """The config key of decode replica ``j``'s kv_blocks."""
    tables = cfg.data["cluster"]["decode"]["replicas"]
    if isinstance(tables, list):
        seen = 0
        for k, table in enumerate(tables):
            seen += int(table.get("count", 1))
            if j < seen and "kv_blocks" in table:
                return f"cluster.decode.replicas[{k}].kv_blocks"
    return "engine.kv_blocks"


def check_decode_memory(cfg: DisaggConfig, lengths: np.ndarray) -> None:
    """A decode replica holds a request's prompt and output (v_p + v_d tokens in its last iteration):
    one that cannot hold the longest of ``lengths`` is a ConfigError naming its kv_blocks."""
    from llmqueue.model.kv import make_kv

    if not len(lengths):
        return
    longest = int(lengths.max())
    for j, r in enumerate(cfg.decode.replicas):
        kv = make_kv(r.config.engine)
        if kv is not None and kv.blocks_for(longest) > kv.usable:
            raise ConfigError(_replica_field(cfg, j), kv.blocks, f"at least {kv.blocks_for(longest) + 1} blocks of "
                              f"{kv.block_size} tokens (block 0 is reserved): decode replica {r.name} holds a "
                              f"request's transferred prompt and its output, {longest} tokens for the longest one")


def _without_memory(pool: ClusterConfig) -> ClusterConfig:
    """The pool's config without kv_blocks, for its summaries: the single-engine memory bounds
    (docs/memory.md) assume a replica that also prefills, so they are not applied to decode
    replicas; their KV use and preemptions are still reported (``kv`` of each replica's summary)."""
    from dataclasses import replace

    from llmqueue.cluster.config import Replica
    from llmqueue.config import Config

    def bare(config: Config) -> Config:
        engine = {k: v for k, v in config.engine.items() if k not in ("kv_blocks", "block_size", "kv_policy",
                                                                      "prefix_caching")}
        return Config({**config.data, "engine": engine}, config.base_dir, config.run)

    return replace(pool, replicas=tuple(Replica(r.name, bare(r.config)) for r in pool.replicas))


def _hedged(pool: ClusterConfig, run, stage: StageWorkload):
    """``run`` (summarised without memory) with the predictions of a pool with memory: the pool's from
    :func:`~llmqueue.cluster.capacity.pool_capacity` of the real config, and no ``stable`` for a
    replica with memory (Theorem 2 is then only an upper bound)."""
    from dataclasses import replace

    from llmqueue.cluster.capacity import pool_capacity
    from llmqueue.metrics import STABLE

    cap = pool_capacity(pool, stage)
    s = run.summary
    s["capacity"] = cap.to_dict()
    s["pool"]["predicted"], s["pool"]["predicted_reason"] = cap.predicted, cap.reason
    for rep, r in zip(pool.replicas, s["replicas"]):
        if rep.config.engine.get("kv_blocks") is not None and r["summary"].get("predicted") == STABLE:
            r["summary"]["predicted"] = "not predicted (memory)"
            r["summary"]["predicted_reason"] = ("below Theorem 2's capacity, but with KV memory it is only an upper "
                                                "bound (the memory bounds of docs/memory.md assume a replica that "
                                                "also prefills)")
    return replace(run, capacity=cap)


#: the decode replicas' batch-time noise streams start here (the prefill replicas' at 0)
DECODE_STREAMS = 1 << 16


def decode_engines(pool: ClusterConfig) -> list:
    """Fresh engines of the decode replicas, their noise on streams of their own."""
    from llmqueue.runner import build_engine

    return [build_engine(r.config, stream=DECODE_STREAMS + j) for j, r in enumerate(pool.replicas)]


def simulate_decode_memory(pool: ClusterConfig, requests: Requests, prompts: np.ndarray):
    """:func:`~llmqueue.cluster.sim.simulate_pool` for a decode pool with KV memory: request i (one
    token and v_d − 1 outputs) arrives with its ``prompts[i]`` transferred tokens computed.  Each
    replica's engine sees v_p + 1 prompt tokens, v_p of them computed (``Engine.transferred_prompts``,
    on the reference loop); the result's request arrays keep the one-token prompts, so the summaries
    count only the work the decode replica does."""
    from llmqueue.cluster.sim import simulate_pool

    engines = decode_engines(pool)
    for e in engines:
        e.transferred_prompts = e.kv is not None
    full = Requests(requests.arrival_time, requests.num_prompt_tokens + prompts, requests.num_output_tokens)
    out = simulate_pool(pool, full, engines=engines)
    for idx, result in zip(out.replica_requests, out.results):   # the one-token prompts the summaries count
        result.num_prompt_tokens = requests.num_prompt_tokens[idx]
    out.requests = requests
    return out


def plan(cfg: DisaggConfig, gpus: int) -> list[dict]:
    """λ*_PD = min(P C_P / m_p, D C_D / m_d) of every split P + D = ``gpus`` (one replica per GPU, the
    first replica of each pool standing for all), best first."""
    from llmqueue.analysis import capacity
    from llmqueue.runner import batch_time_of, build_workload

    gpus = integer(gpus, "--gpus", 2, what="a prefill and a decode GPU at least")
    w = build_workload(cfg.prefill.base)
    cp = capacity(batch_time_of(cfg.prefill.replicas[0].config), cfg.prefill.replicas[0].config.engine["token_budget"])[1]
    cd = capacity(batch_time_of(cfg.decode.replicas[0].config), cfg.decode.replicas[0].config.engine["token_budget"])[1]
    rows = []
    for p in range(1, gpus):
        d = gpus - p
        pre, dec = p * cp / w.mean_prompt_len, d * cd / max(w.mean_output_len, 1e-12)
        rows.append({"prefill": p, "decode": d, "prefill_rate_rps": pre, "decode_rate_rps": dec,
                     "max_stable_rate_rps": min(pre, dec), "binding": "prefill" if pre <= dec else "decode"})
    rows.sort(key=lambda r: -r["max_stable_rate_rps"])
    return rows


def with_split(cfg: DisaggConfig, prefill: int, decode: int, rate: float | None = None) -> DisaggConfig:
    """The same config with ``prefill`` and ``decode`` replicas (of each pool's first replica's engine)
    and, given, the arrival rate."""
    data = copy.deepcopy(cfg.data)
    c = data["cluster"]
    for which, n in (("prefill", prefill), ("decode", decode)):
        first = c[which]["replicas"]
        c[which]["replicas"] = n if not isinstance(first, list) else [{**{k: v for k, v in first[0].items()
                                                                           if k not in ("count", "name")}, "count": n}]
    if rate is not None:
        data["workload"]["rate"] = float(rate)
    return parse_disagg(data, cfg.prefill.base.base_dir)


def simulated_max_rate(cfg: DisaggConfig, prefill: int, decode: int, closed_form: float, *, rel_tol: float = 0.05,
                       probes: int = 8) -> dict:
    """Bisection on λ for one split: a rate passes when run_disagg's verdict is ``stable`` (both pools;
    ``inconclusive`` fails, so the search is conservative).  Starts from [0.8, 1.1] × the closed form."""
    def passes(rate: float) -> bool:
        return run_disagg(with_split(cfg, prefill, decode, rate)).summary["verdict"] == "stable"

    lo, hi, tried = 0.8 * closed_form, 1.1 * closed_form, 0
    while tried < probes and not passes(lo):
        hi, lo, tried = lo, lo / 2, tried + 1
    while tried < probes and passes(hi):
        lo, hi, tried = hi, hi * 1.5, tried + 1
    while tried < probes and hi - lo > rel_tol * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if passes(mid) else (lo, mid)
        tried += 1
    return {"passing_rps": lo, "failing_rps": hi, "probes": tried}


__all__ = ["DisaggConfig", "DisaggRun", "is_disaggregated", "load_disagg", "parse_disagg", "plan", "run_disagg",
           "simulated_max_rate", "with_split"]
