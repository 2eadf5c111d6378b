"""From a validated config to results: build the engine and workload, run, summarise.

The library entry points behind the command line: :func:`run_config` (one run) and
:func:`compare` (several schedulers on the same arrivals: common random numbers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from llmqueue.analysis import Analysis, analyze
from llmqueue.model.batch_time import BatchTime, make_batch_time
from llmqueue.config import Config
from llmqueue.errors import ConfigError
from llmqueue.core.engine import Engine
from llmqueue.limits import check_length_file, check_run, check_trace_file
from llmqueue.model.kv import make_kv
from llmqueue.metrics import INCONCLUSIVE, STABLE, UNSTABLE, summarize
from llmqueue.analysis.region import stability_region
from llmqueue.schedulers import make_scheduler
from llmqueue.core.simulator import Result, simulate
from llmqueue.model.workload import (
    Requests,
    Trace,
    Workload,
    load_trace,
    make_arrivals,
    make_length,
    make_shared_prefix,
)

Progress = Callable[[str, float], None]  # (scheduler, fraction done)


@dataclass
class Run:
    """One finished run: the raw result, its summary and the closed-form analysis."""

    result: Result
    summary: dict
    analysis: Analysis


def batch_time_of(config: Config, stream: int = 0) -> BatchTime:
    """The configured batch-time model, its noise (if any) seeded by the run's seed and ``stream``."""
    return make_batch_time(config.engine["batch_time"]).fresh(config.run.seed, stream)


def build_engine(config: Config, scheduler: str | None = None, stream: int = 0) -> Engine:
    """The configured engine; ``scheduler`` swaps the policy (its own options then default);
    ``stream``: the engine's index in a pool (its batch-time noise's own stream)."""
    name = scheduler or config.engine["scheduler"]
    options = config.scheduler_options if name == config.engine["scheduler"] else {}
    policy, kv = make_scheduler(name, **options), make_kv(config.engine)
    if kv is not None and policy.program is None:
        raise ConfigError("engine.kv_blocks", kv.blocks, f"unset with scheduler {name!r}: it plans in Python "
                          "(plan(state)), which the KV memory rules cannot follow (docs/memory.md); write it as "
                          "compose() returning a Plan to run it with memory")
    return Engine(policy, config.engine["token_budget"], batch_time_of(config, stream), config.engine.get("max_batch_requests"),
                  kv)


def build_workload(config: Config) -> Workload:
    """Arrival process (rate, or load as a fraction of λ*) or trace, and length laws.  A trace file
    (or an empirical law's) that is not a regular file, is over 2 GB or would not fit in memory is
    refused before it is read (:func:`llmqueue.limits.check_trace_file`)."""
    w = config.workload
    for key in ("prompt", "output"):   # an empirical law's CSV file: refused before it is read if it cannot be
        check_length_file(w.get(key), f"workload.{key}", config.base_dir)
    if w["arrival"] == "trace":
        check_trace_file(config.resolve(w["trace"]), "workload.trace", w.get("loop", 1))
        trace = load_trace(config.resolve(w["trace"]), format=w.get("format", "auto"), time_scale=w.get("time_scale", 1.0),
                           max_tokens=w.get("max_tokens"), cap_mode=w.get("cap_mode", "clip"),
                           on_bad_row=w.get("on_bad_row", "error"), loop=w.get("loop", 1))
        prompt = make_length(w["prompt"], field="workload.prompt", minimum=1, base_dir=config.base_dir) if "prompt" in w else None
        output = make_length(w["output"], field="workload.output", minimum=0, base_dir=config.base_dir) if "output" in w else None
        return Workload(trace, prompt, output, make_shared_prefix(w.get("shared_prefix")))
    prompt = make_length(w["prompt"], field="workload.prompt", minimum=1, base_dir=config.base_dir)
    output = make_length(w["output"], field="workload.output", minimum=0, base_dir=config.base_dir)
    rate = w.get("rate")
    if rate is None:
        analysis = analyze(batch_time_of(config), config.engine["token_budget"], 1.0, prompt.mean, output.mean)
        rate = w["load"] * analysis.max_stable_rate_rps
    spec = {"arrival": w["arrival"], "rate": rate, **({"cv": w["cv"]} if "cv" in w else {})}
    return Workload(make_arrivals(spec), prompt, output, make_shared_prefix(w.get("shared_prefix")))


def analysis_of(config: Config, workload: Workload) -> Analysis:
    return analyze(batch_time_of(config), config.engine["token_budget"], workload.arrival_rate,
                   workload.mean_prompt_len, workload.mean_output_len, config.engine.get("max_batch_requests"))


def generate(config: Config, workload: Workload, schedulers: Iterable[str] | None = None) -> Requests:
    """The run's requests; first its size (arrivals, batches, memory: :mod:`llmqueue.limits`) is
    estimated for a run of each of ``schedulers`` (default: the configured one), and refused when it
    cannot fit."""
    rc = config.run
    check_run(config, workload, None if schedulers is None else list(schedulers))
    return workload.generate(rc.seed, horizon_s=rc.horizon_s, num_requests=rc.requests)


def execute(config: Config, engine: Engine, workload: Workload, requests: Requests,
            progress: Progress | None = None) -> Run:
    """Simulate ``requests`` on ``engine`` and summarise against the closed form."""
    rc = config.run
    check_cache(engine.kv, workload)
    name = engine.scheduler.name
    total = max(len(requests), 1)
    hook = (lambda now, n: progress(name, n / total)) if progress else None
    result = simulate(engine, requests, horizon_s=rc.horizon_s, drain=rc.drain,
                      record_batches=rc.record_batches, progress=hook, method=rc.method)
    analysis = analysis_of(config, workload)
    e = config.engine
    memory = memory_of(config, workload) if e.get("kv_blocks") is not None and not e.get("prefix_caching") else None
    summary = summarize(result, analysis, work_conserving=engine.scheduler.work_conserving,
                        tolerance=rc.verdict_tolerance, reject_tolerance=rc.reject_tolerance,
                        splits_prompts=engine.scheduler.splits_prompts,
                        gap_cv2=getattr(workload.arrivals, "gap_cv2", None),
                        servable_tokens_per_s=None if memory is None else
                        memory.memory_necessary_blocks_rps * memory.mean_request_tokens)
    if isinstance(workload.arrivals, Trace):
        summary["trace"] = workload.arrivals.summary()
        finite_trace(summary, workload.arrivals, rc.horizon_s)
    if analysis.notes:
        summary["notes"] = list(analysis.notes)
    _region_prediction(config, summary, analysis)
    if e.get("prefix_caching"):
        _prefix_prediction(config, summary, workload, analysis)
    elif memory is not None:
        _memory_prediction(summary, memory, analysis)
    return Run(result, summary, analysis)


def finite_trace(summary: dict, trace: Trace, horizon_s: float | None) -> None:
    """A trace cannot run longer than its arrivals: where the verdict needs more, say what this
    trace can show and how many replays (``workload.loop``) would decide."""
    need = summary.get("verdict_needs_arrivals_s")
    if summary["verdict"] != INCONCLUSIVE or need is None:
        return
    span = trace.span_s * trace.loops
    if horizon_s is not None and horizon_s < span and need <= horizon_s:
        return
    if need <= span:
        summary["verdict_reason"] += (f"; the trace's arrivals span {span:,.0f} s: give run.horizon_s of at least "
                                      f"{math.ceil(need):,d} s (or drop run.requests)")
        return
    loops = math.ceil(need / max(trace.span_s, 1e-9))
    summary["verdict_reason"] += (
        f"; the trace's arrivals span only {span:,.0f} s, so it cannot show whether this load is sustained: "
        f"replay it with workload.loop = {loops} (or more) for a verdict on its load repeated, or scale "
        "workload.time_scale to study another load")


def memory_of(config: Config, workload: Workload):
    """The KV-cache memory bounds (docs/memory.md) of a config with ``engine.kv_blocks``."""
    from llmqueue.analysis.memory import memory_analysis   # scipy.stats: only when memory is on
    from llmqueue.model.kv import DEFAULT_BLOCK_SIZE, RECOMPUTE

    e = config.engine
    return memory_analysis(batch_time_of(config), e["token_budget"], e["kv_blocks"], workload,
                           block_size=e.get("block_size", DEFAULT_BLOCK_SIZE), kv_policy=e.get("kv_policy", RECOMPUTE))


def _memory_prediction(summary: dict, m, analysis: Analysis) -> None:
    """With KV memory, Theorem 2 alone no longer decides (docs/memory.md, "Memory-aware capacity").

    Above the memory bound λ_mem (necessary, Dong & Cao) no policy is stable: ``unstable``.  Below
    it nothing is predicted: the sufficient bound (Nie, Si & Zhou) is a fluid statement for memory
    that is never wasted, while admission as vLLM does it can thrash (preempt and recompute) far
    below it, and lumpy batches raise t̄ above the fixed point's.
    """
    lam = analysis.arrival_rate
    nec, suff = m.memory_necessary_blocks_rps, m.memory_sufficient_blocks_rps
    if lam > nec:
        summary["predicted"] = UNSTABLE
        reason = (f"λ = {lam:.4g} req/s is above the memory bound λ_mem = {nec:.4g} req/s, necessary for "
                  "stability (Dong & Cao, arXiv 2604.11001)")
    else:
        if summary["predicted"] == STABLE:
            summary["predicted"] = "not predicted (memory)"
        reason = (f"λ = {lam:.4g} req/s is below the memory bound λ_mem = {nec:.4g} req/s, which is necessary, "
                  "not sufficient: preemption and recompute can thrash below it")
        if suff is not None:
            reason += f" (the fluid sufficient bound of Nie, Si & Zhou is {suff:.4g} req/s)"
    summary["memory"] = {"necessary_rps": nec, "sufficient_rps": suff, "token_bound_rps": m.token_bound_rps,
                         "binding": m.binding, "max_stable_rate_rps": m.max_stable_rate_rps,
                         "memory_rho": m.memory_rho, "memory_bound_tokens_per_s": nec * m.mean_request_tokens,
                         "reason": reason}


def prefix_of(config: Config, workload: Workload):
    """Theorem 2's λ* with the tokens a shared prefix finds in the cache (docs/prefix_caching.md),
    for a config with ``engine.prefix_caching``; E[h] = 0 without ``workload.shared_prefix``."""
    from llmqueue.analysis.prefix import expected_hit, prefix_capacity
    from llmqueue.model.kv import DEFAULT_BLOCK_SIZE

    shared = workload.shared_prefix
    hit = 0.0
    if shared is not None:
        prompt = workload.prompt if workload.prompt is not None else workload.arrivals.requests.num_prompt_tokens
        hit = expected_hit(prompt, shared.tokens, config.engine.get("block_size", DEFAULT_BLOCK_SIZE))
    return prefix_capacity(batch_time_of(config), config.engine["token_budget"], workload.mean_prompt_len,
                           workload.mean_output_len, hit)


def _prefix_prediction(config: Config, summary: dict, workload: Workload, analysis: Analysis) -> None:
    """With prefix caching, requests share blocks and skip the cached part of their prompts, so
    neither Theorem 2's λ* nor the memory bound applies as it stands.  Even if every request found
    its group's whole prefix cached, λ above (b_max/t_{b_max}) / (m_p + m_d − E[h]) is unstable;
    below it nothing is predicted."""
    p = prefix_of(config, workload)
    lam = analysis.arrival_rate
    if lam > p.max_stable_rate_prefix_rps:
        summary["predicted"] = UNSTABLE
        reason = (f"λ = {lam:.4g} req/s is above λ* = {p.max_stable_rate_prefix_rps:.4g} req/s even with every "
                  f"shared block found in the cache (E[h] = {p.mean_hit:.1f} tokens per request)")
    else:
        summary["predicted"] = "not predicted (prefix caching)"
        reason = (f"λ = {lam:.4g} req/s is below λ* = {p.max_stable_rate_prefix_rps:.4g} req/s with every shared "
                  f"block found in the cache (E[h] = {p.mean_hit:.1f}; without the cache λ* = "
                  f"{p.max_stable_rate_rps:.4g}); shared blocks must stay cached and memory binds: the simulator decides")
    summary["prefix"] = {**p.to_dict(), "reason": reason}


def check_cache(kv, workload: Workload) -> None:
    """A KV cache that cannot hold a request of mean size would reject most requests: refuse it."""
    if kv is None:
        return
    mean = math.ceil(workload.mean_prompt_len + workload.mean_output_len)
    if not kv.fits(mean, 0):
        need = kv.blocks_for(mean) + 1
        raise ConfigError("engine.kv_blocks", kv.blocks, f"at least {need} blocks of {kv.block_size} tokens: the "
                          f"cache must hold a request of mean size ({mean} tokens, prompt + output; block 0 is "
                          "reserved); larger requests are rejected and counted")


def _region_prediction(config: Config, summary: dict, analysis: Analysis) -> None:
    """Under a request cap Theorem 2 does not apply: predict from the 2-D region (§6, Theorem 10).

    Outside the region no scheduler is stable; inside it even a work-conserving one may
    diverge (point C with Sarathi-1024), so nothing is predicted there.
    """
    cap = config.engine.get("max_batch_requests")
    bt = batch_time_of(config)
    if cap is None or not bt.tokens_only or cap > config.engine["token_budget"]:
        return
    pos = stability_region(bt, config.engine["token_budget"], cap).locate(
        analysis.arrival_rate, analysis.mean_prompt_len, analysis.mean_output_len)
    summary["region"] = {"rho": pos.rho, "status": pos.status, "max_stable_rate_rps": pos.max_stable_rate_rps}
    summary["predicted"] = UNSTABLE if pos.status == "outside" else "not predicted (request cap, §6)"


def run_config(config: Config, progress: Progress | None = None) -> Run:
    """One run of the configured scheduler."""
    workload = build_workload(config)
    return execute(config, build_engine(config), workload, generate(config, workload), progress)


def compare(config: Config, schedulers: Iterable[str], progress: Progress | None = None,
            on_done: Callable[[Run], None] | None = None) -> list[Run]:
    """Each scheduler on the same generated requests (common random numbers)."""
    names = list(schedulers)
    workload = build_workload(config)
    requests = generate(config, workload, names)
    runs = []
    for name in names:
        run = execute(config, build_engine(config, name), workload, requests, progress)
        runs.append(run)
        if on_done is not None:
            on_done(run)
    return runs


__all__ = ["Run", "build_engine", "build_workload", "check_cache", "compare", "execute", "memory_of", "prefix_of",
           "run_config"]
