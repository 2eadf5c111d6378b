"""Sizes a run may have, estimated from its config before any work (docs/config.md, "Errors, signals
and limits").

A run that cannot fit would allocate until ``MemoryError`` or be killed by the kernel with no
message.  Before it starts, what it needs at least is estimated from the config alone, and it is
refused, with one :class:`~llmqueue.errors.ConfigError` naming the value, the estimate and the limit,
when:

* its arrivals (rate × horizon, ``run.requests``, or a trace's rows × loops) exceed
  :data:`MAX_ARRIVALS`;
* its batches exceed :data:`MAX_BATCHES`: at least the tokens it serves over the token budget
  (every batch holds at most b_max tokens; an overloaded engine serves at most horizon / t(b_max)
  full batches);
* its memory exceeds :func:`memory_limit`: bytes per request, per batch (more with
  ``run.record_batches`` and KV memory) and per token of budget, as measured on the compiled core and
  on the reference interpreter (the ``*_BYTES`` constants), against the memory the process can
  still get.

These are floors, not bounds: a run they let start can still need more (a scheduler that runs
small batches, ``--out`` files), and then ends with the one-line out-of-memory message.  A trace
file is refused before it is read when it is not a regular file, is larger than
:data:`MAX_TRACE_BYTES`, or its rows would not fit in memory (:func:`check_trace_file`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmqueue.checks import check_input_file
from llmqueue.errors import ConfigError

#: Most arrivals (requests, or network jobs) one run may have: 2e8 take minutes on the compiled
#: core and about 20 GB with per-request records.
MAX_ARRIVALS = 200_000_000
#: Most batches one run may have (all engines together), at least as the config implies.
MAX_BATCHES = 2_000_000_000
#: Largest trace file read (bytes); a trace row takes about 650 bytes once read.
MAX_TRACE_BYTES = 2 * 2**30
#: The environment variable that sets the memory limit in GB (2**30 bytes); ``inf``: no limit.
MEMORY_ENV = "LLMQUEUE_MAX_MEMORY_GB"
GB = 2**30


@dataclass(frozen=True)
class Cost:
    """Peak bytes of one run: per request, per batch, more per batch with ``record_batches``,
    and more per request and per batch with KV memory."""

    request: int
    batch: int
    record: int
    kv_request: int = 0
    kv_batch: int = 0


#: One run (generate + simulate + summarize), peak resident memory measured in fresh processes
#: (Fig. 1 workload at 1M and 2M requests; 1.6M and 3.1M batches of long outputs; KV with
#: kv_blocks = 3000): the compiled core and the reference interpreter.
RUN_BYTES = {"fast": Cost(100, 40, 104, 40, 24), "reference": Cost(320, 64, 208, 100, 96)}
#: What each finished run of ``compare`` keeps while the next ones run (measured with 1, 3 and 5
#: schedulers: the first-token and finish times, the rejected flags, the batch ends and loads).
KEPT_BYTES = Cost(24, 16, 104, 16, 24)
#: Every table sized by the token budget together (the batch time of each load 1..b_max as the
#: config check and the engine build it, the compiled core's copy): measured 64-75 B per token.
TOKEN_BYTES = 64
#: A network run per visit of a job to an engine or delay and per batch, measured (rybko-stolyar,
#: fork-join, agent-loop, dag, tandem): the compiled core and the reference loop.
NETWORK_BYTES = {"fast": (230, 107), "reference": (825, 277)}
#: A trace row once read and parsed (measured 650-660 B for Azure and Vidur rows), and each
#: replayed copy of a row (workload.loop).
TRACE_ROW_BYTES = 650
TRACE_COPY_BYTES = 48
#: The shortest row a trace can have ("0,1,0\n"): the rows of a file are at most its size / 6.
MIN_ROW_BYTES = 6
#: A batch time below this (seconds) is taken as the cause of too many arrivals or batches.
TINY_BATCH_S = 1e-6
LIMITS_DOC = 'docs/config.md, "Errors, signals and limits"'


# ---- the memory limit ----------------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(1 << 16)
    except OSError:
        return None


def _meminfo(key: str) -> int | None:
    text = _read("/proc/meminfo")
    for line in (text or "").splitlines():
        name, _, rest = line.partition(":")
        if name == key and rest.split() and rest.split()[0].isdigit():
            return int(rest.split()[0]) * 1024
    return None


def _cgroup_headroom() -> int | None:
    """What the cgroup memory limit leaves (v2 memory.max, or v1 limit_in_bytes), None: no limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read(limit_file), _read(usage_file)
        if limit is None or usage is None:
            continue
        try:
            cap, used = int(limit.strip()), int(usage.strip())
        except ValueError:   # "max": no limit
            return None
        if cap >= 2**60:
            return None
        stat = _read(limit_file.rsplit("/", 1)[0] + "/memory.stat") or ""
        cache = 0   # page cache the kernel reclaims before it fails an allocation
        for line in stat.splitlines():
            key, _, number = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file") and number.strip().isdigit():
                cache = max(cache, int(number))
        return max(cap - used + cache, 0)
    return None


def _address_headroom() -> int | None:
    """What RLIMIT_AS leaves of the address space (None: no limit)."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    size = 0
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("VmSize:") and line.split()[1].isdigit():
            size = int(line.split()[1]) * 1024
    return max(soft - size, 0)


def available_memory() -> tuple[int | None, str]:
    """Bytes this process can still get, and from where: the least of the memory available
    (/proc/meminfo MemAvailable, else free pages), what a cgroup limit and RLIMIT_AS leave."""
    found: list[tuple[int, str]] = []
    avail = _meminfo("MemAvailable")
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    if avail is not None and avail > 0:
        found.append((avail, "the memory available, MemAvailable"))
    for value, what in ((_cgroup_headroom(), "what the cgroup's memory limit leaves"),
                        (_address_headroom(), "what the address-space limit (RLIMIT_AS) leaves")):
        if value is not None:
            found.append((value, what))
    if not found:
        return None, "unknown"
    return min(found)


def memory_limit() -> tuple[float, str]:
    """The most bytes one run may use, and what set it: :data:`MEMORY_ENV` in GB, else what this
    process can still get (:func:`available_memory`; no limit where that is unknown)."""
    raw = os.environ.get(MEMORY_ENV, "").strip()
    if raw:
        try:
            gb = float(raw)
        except ValueError:
            gb = math.nan
        if not gb > 0:
            raise ConfigError(MEMORY_ENV, raw, "a number of GB > 0 (the most memory one run may use; inf: no limit)")
        return gb * GB, f"set by {MEMORY_ENV}"
    avail, what = available_memory()
    if avail is None:
        return math.inf, "unknown"
    return float(avail), f"{what}; {MEMORY_ENV} sets another limit"


def size(n: float) -> str:
    """Bytes for a message: 1.2 GB, 340 MB, 5.6e+04 TB."""
    if n >= 1000 * 2**40:
        return f"{n / 2**40:.2g} TB"
    if n >= 2**40:
        return f"{n / 2**40:.1f} TB"
    if n >= GB:
        return f"{n / GB:.1f} GB"
    return f"{max(n, 0) / 2**20:.0f} MB"


def _count(x: float) -> str:
    return f"{x:,.0f}" if x < 1e10 else f"{x:.3g}"


def _limit_text(limit: float, how: str) -> str:
    return f"the memory limit of {size(limit)} ({how})"


def check_memory(need: float, field: str, value: Any, parts: str, lower: str) -> None:
    """Refuse a run that needs at least ``need`` bytes (``parts`` says which) above :func:`memory_limit`."""
    limit, how = memory_limit()
    if need > limit:
        raise ConfigError(field, value, f"the run needs at least about {size(need)} ({parts}), more than "
                                        f"{_limit_text(limit, how)}; lower {lower}")


def check_token_budget(budget: int, field: str = "engine.token_budget") -> None:
    """Refuse a budget whose tables (:data:`TOKEN_BYTES` a token) cannot fit; call it before the
    batch-time table (``BatchTime.table``) is built."""
    limit, how = memory_limit()
    need = budget * TOKEN_BYTES
    if need > limit:
        raise ConfigError(field, budget, f"at most {_count(limit // TOKEN_BYTES)} tokens here: the tables sized "
                                         f"by the budget (a batch time for each load 1..b_max) take about "
                                         f"{TOKEN_BYTES} B a token, {size(need)} against {_limit_text(limit, how)}")


# ---- traces ----------------------------------------------------------------------------------

def check_trace_file(path: Path, field: str, loop: int = 1) -> None:
    """Refuse a trace before reading it: not a regular file, larger than :data:`MAX_TRACE_BYTES`,
    or rows (counted without keeping them) that would not fit in memory.  A folder or a missing
    file is left to the reader, which names it."""

    if path.is_dir():
        return
    check_input_file(path, field, "trace file (CSV)", MAX_TRACE_BYTES)
    try:
        nbytes = path.stat().st_size
    except OSError:
        return
    limit, how = memory_limit()
    per_row = TRACE_ROW_BYTES + (loop * TRACE_COPY_BYTES if loop > 1 else 0)
    if nbytes // MIN_ROW_BYTES * per_row <= limit:   # even rows of 6 bytes would fit
        return
    rows = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                rows += chunk.count(b"\n")
    except OSError:
        return   # the reader says why
    need = rows * per_row
    if need > limit:
        copies = f", {TRACE_COPY_BYTES} B a replayed copy × workload.loop = {loop}" if loop > 1 else ""
        raise ConfigError(field, str(path), f"a trace that fits in memory: its {rows:,} rows take about {size(need)} "
                                            f"once read ({TRACE_ROW_BYTES} B a row{copies}), more than "
                                            f"{_limit_text(limit, how)}; use a shorter trace"
                                            + (" or a smaller workload.loop" if loop > 1 else ""))


def check_length_file(spec: Any, field: str, base_dir: str | Path | None = None) -> None:
    """:func:`check_trace_file` for the CSV file of an empirical length law (``{dist = "empirical",
    trace = ...}``, resolved as :class:`~llmqueue.model.workload.Empirical` resolves it); any other
    table is left to its own checks."""
    if isinstance(spec, dict) and spec.get("dist") == "empirical" and isinstance(spec.get("trace"), str) \
            and spec["trace"]:
        check_trace_file(Path(spec["trace"]) if base_dir is None else Path(base_dir) / spec["trace"], f"{field}.trace")


# ---- one engine ------------------------------------------------------------------------------

def full_batch_s(batch_time, token_budget: int) -> float:
    """t(b_max): the time of a batch of ``token_budget`` tokens (seconds)."""
    return float(batch_time(token_budget))


def run_path(config, scheduler: str) -> str:
    """Which loop a run of ``scheduler`` on ``config`` takes: "fast" (the compiled core) or
    "reference", as :func:`llmqueue.core.fastcore.reason` decides, without building the engine."""
    from llmqueue.core import fastcore
    from llmqueue.model.batch_time import make_batch_time
    from llmqueue.schedulers import make_scheduler

    if config.run.method == "reference" or config.engine.get("prefix_caching") or fastcore.unavailable():
        return "reference"
    options = config.scheduler_options if scheduler == config.engine["scheduler"] else {}
    policy = make_scheduler(scheduler, **options)
    policy.quiet = True   # the engine's own check warns once, when it runs
    return "reference" if fastcore.policy_reason(policy, make_batch_time(config.engine["batch_time"])) else "fast"


@dataclass(frozen=True)
class RunSize:
    """What a run needs at least, from its config (:func:`estimate_run`), and the values behind it."""

    arrivals: float
    batches: float
    bytes: float
    field: str              # the value that sets the arrivals
    value: Any
    arrivals_why: str       # e.g. "λ = 12.48 req/s (workload.load = 0.9 of λ* = 13.87 req/s) × run.horizon_s = 1200 s"
    batches_field: str      # the value that sets the batches
    batches_value: Any
    batches_why: str
    parts: str              # the bytes, term by term
    memory_field: str       # the value behind the largest term
    memory_value: Any


def _arrivals(config, workload) -> tuple[float, float, float, str, Any, str]:
    """(arrivals, seconds they span, tokens they bring, field, value, why) of ``config``'s run."""
    from llmqueue.model.workload import Trace

    rc, w = config.run, config.workload
    if isinstance(workload.arrivals, Trace):
        replay = workload.arrivals.requests
        n = len(replay)
        if rc.horizon_s is not None:
            n = int(np.searchsorted(replay.arrival_time, rc.horizon_s, "right"))
        elif rc.requests is not None:
            n = min(n, rc.requests)
        span = float(replay.arrival_time[n - 1]) if n else 0.0
        if rc.horizon_s is not None:
            span = max(span, rc.horizon_s)
        prompt = (workload.prompt.mean * n if workload.prompt is not None
                  else float(replay.num_prompt_tokens[:n].sum(dtype=np.float64)))
        output = (workload.output.mean * n if workload.output is not None
                  else float(replay.num_output_tokens[:n].sum(dtype=np.float64)))
        loops = workload.arrivals.loops
        field, value = ("workload.loop", loops) if loops > 1 else ("workload.trace", w.get("trace"))
        if rc.requests is not None and rc.requests <= n:
            field, value = "run.requests", rc.requests
        why = f"{n:,} rows of the trace" + (f" in {loops} loops" if loops > 1 else "")
        return n, span, prompt + output, field, value, why
    rate = workload.arrival_rate
    tokens = workload.mean_prompt_len + workload.mean_output_len
    if rc.requests is not None:
        n = float(rc.requests)
        return n, n / rate, n * tokens, "run.requests", rc.requests, f"run.requests = {rc.requests:,}"
    horizon = float(rc.horizon_s)
    n = rate * horizon
    given = "rate" in w
    source = "workload.rate" if given else f"workload.load = {w['load']:g} of λ* = {rate / w['load']:.4g} req/s"
    why = f"λ = {rate:.4g} req/s ({source}) × run.horizon_s = {horizon:g} s"
    default = 1200.0   # config.DEFAULTS' horizon: the rate is the cause when even it gives too many
    if rate * default <= MAX_ARRIVALS:
        field, value = "run.horizon_s", rc.horizon_s
    elif given:
        field, value = "workload.rate", w["rate"]
    elif rate / w["load"] * default > MAX_ARRIVALS:   # λ* itself: batches that take (almost) no time
        from llmqueue.model.batch_time import make_batch_time

        budget = config.engine["token_budget"]
        field, value = "engine.batch_time", config.engine["batch_time"]
        why += (f"; λ* is that high because a batch of {budget} tokens takes "
                f"{full_batch_s(make_batch_time(value), budget):.3g} s: give batches that take longer")
    else:
        field, value = "workload.load", w["load"]
    return n, horizon, n * tokens, field, value, why


def estimate_run(config, workload, schedulers: Sequence[str] | None = None) -> RunSize:
    """What ``config``'s run (of each of ``schedulers`` on the same requests, as
    :func:`llmqueue.runner.compare` runs them) needs at least, from the config and the built workload."""
    from llmqueue.model.batch_time import make_batch_time

    rc, e = config.run, config.engine
    names = list(schedulers) if schedulers else [e["scheduler"]]
    n, span, tokens, field, value, why = _arrivals(config, workload)
    budget = e["token_budget"]
    t_full = full_batch_s(make_batch_time(e["batch_time"]), budget)
    horizon = math.inf if rc.drain else span
    # every batch holds at most b_max tokens, so serving the tokens takes at least tokens / b_max
    # batches; an overloaded engine serves at most horizon / t(b_max) full batches
    by_tokens = tokens / budget
    by_time = horizon / t_full if t_full > 0 else math.inf
    batches = min(by_tokens, by_time)
    if by_tokens <= by_time:
        b_why = f"{_count(tokens)} tokens to serve, at most {budget} a batch"
        b_field, b_value = (("run.drain", True) if rc.drain else
                            ("engine.batch_time", e["batch_time"]) if t_full < TINY_BATCH_S else (field, value))
    else:
        b_why = f"{horizon:g} s of full batches of {t_full:.3g} s (engine.batch_time at engine.token_budget)"
        b_field, b_value = ("engine.batch_time", e["batch_time"]) if t_full < TINY_BATCH_S else (field, value)
    kv = e.get("kv_blocks") is not None
    record = rc.record_batches

    def per_request(c: Cost) -> float:
        return c.request + (c.kv_request if kv else 0)

    def per_batch(c: Cost) -> float:
        return c.batch + (c.record if record else 0) + (c.kv_batch if kv else 0)

    costs = [RUN_BYTES[run_path(config, name)] for name in names]
    worst = max(costs, key=lambda c: per_request(c) * n + per_batch(c) * batches)
    kept = len(names) - 1
    req_bytes = n * (per_request(worst) + kept * per_request(KEPT_BYTES))
    batch_bytes = batches * (per_batch(worst) + kept * per_batch(KEPT_BYTES))
    budget_bytes = budget * TOKEN_BYTES
    runs = f"; {len(names)} schedulers, each finished run kept" if kept else ""
    parts = (f"{_count(n)} requests × {per_request(worst):.0f} B + at least {_count(batches)} batches × "
             f"{per_batch(worst):.0f} B" + (" with run.record_batches" if record else "") + runs)
    m_field, m_value = max(((req_bytes, field, value), (batch_bytes, b_field, b_value),
                            (budget_bytes, "engine.token_budget", budget)), key=lambda t: t[0])[1:]
    return RunSize(n, batches, req_bytes + batch_bytes + budget_bytes, field, value, why, b_field, b_value,
                   b_why, parts, m_field, m_value)


LOWER = "run.horizon_s or run.requests, workload.rate or workload.load"


def check_run(config, workload, schedulers: Sequence[str] | None = None) -> RunSize:
    """Refuse ``config``'s run (of ``schedulers`` one after another) when its arrivals, batches
    or memory exceed the limits; else return what it needs at least.  Call it before the requests
    are generated."""
    check_token_budget(config.engine["token_budget"])
    s = estimate_run(config, workload, schedulers)
    if not s.arrivals <= MAX_ARRIVALS:
        raise ConfigError(s.field, s.value, f"a run of at most {MAX_ARRIVALS:,} arrivals ({LIMITS_DOC}); this one "
                                            f"would have about {_count(s.arrivals)} ({s.arrivals_why}); lower {LOWER}")
    if not s.batches <= MAX_BATCHES:
        raise ConfigError(s.batches_field, s.batches_value,
                          f"a run of at most {MAX_BATCHES:,} batches ({LIMITS_DOC}); this one needs at least "
                          f"{_count(s.batches)} ({s.batches_why}); lower {LOWER}"
                          + (", or run without run.drain" if s.batches_field == "run.drain" else ""))
    check_memory(s.bytes, s.memory_field, s.memory_value, s.parts,
                 LOWER + (" (or set run.record_batches = false)" if config.run.record_batches else ""))
    return s


# ---- networks --------------------------------------------------------------------------------

def network_path(net, method: str | None = None) -> str:
    """Which loop a network run takes ("fast" or "reference"), as network.fast.reason decides."""
    from llmqueue.core import fastcore
    from llmqueue.schedulers import make_scheduler

    if ((method or net.method) == "reference" or fastcore.unavailable() or any(s.kv is not None for s in net.engines)
            or any(getattr(s, "pool", None) is not None for s in net.engines)):   # pools: the reference loop
        return "reference"
    for spec in net.engines:
        policy = make_scheduler(spec.scheduler, **spec.options)
        policy.quiet = True
        if fastcore.policy_reason(policy, spec.batch_time) is not None:
            return "reference"
    return "fast"


def check_network(net, analysis, *, horizon_s: float | None = None, drain: bool | None = None, jobs=None,
                  method: str | None = None) -> None:
    """Refuse a network run (keyword arguments as :func:`~llmqueue.network.sim.simulate_network`)
    whose jobs, batches or memory exceed the limits, from its config and its traffic equations
    (``analysis``: :func:`~llmqueue.network.analysis.analyze_network` of ``net``)."""
    for j, spec in enumerate(net.engines):
        check_token_budget(spec.token_budget, f"engines[{j}].token_budget")
    horizon = float(net.horizon_s if horizon_s is None else horizon_s)
    drain = net.drain if drain is None else drain
    rates = np.asarray(net.rates, dtype=float)
    per_class = (np.asarray([len(j) for j in jobs], dtype=float) if jobs is not None else rates * horizon)
    total = float(per_class.sum())
    lower = "run.horizon_s, the classes' rates or network.load"
    if not total <= MAX_ARRIVALS:
        rate, why = float(rates.sum()), ""
        if rate * 1200.0 <= MAX_ARRIVALS:   # the default horizon would do: the horizon is the cause
            field, value = "run.horizon_s", horizon
        elif net.load is None:
            k = int(np.argmax(rates))
            field, value = f"{net.classes[k].field}.rate", float(rates[k])
        elif rate / net.load * 1200.0 <= MAX_ARRIVALS:   # the load, not the capacity, is out of range
            field, value = "network.load", net.load
        else:   # the rates scaled to network.load of a bottleneck that serves (almost) instantly
            j = analysis.engines.index(analysis.bottleneck)
            spec = net.engines[j]
            field, value = f"engines[{j}].batch_time", spec.batch_time.to_dict()
            why = (f"; network.load = {net.load:g} sets them, and the bottleneck {spec.name!r} serves a batch of "
                   f"{spec.token_budget} tokens in {full_batch_s(spec.batch_time, spec.token_budget):.3g} s: "
                   "give batches that take longer")
        raise ConfigError(field, value,
                          f"a network run of at most {MAX_ARRIVALS:,} jobs ({LIMITS_DOC}); this one would have about "
                          f"{_count(total)} (λ = {rate:.4g} jobs/s × run.horizon_s = {horizon:g} s{why}); "
                          f"lower {lower}")
    visits = float(sum(per_class[k] * float(analysis.classes[k].visits.sum()) for k in range(len(net.classes))))
    span = math.inf if drain else horizon
    batches, worst = 0.0, (0.0, 0, 1.0)
    for j, spec in enumerate(net.engines):
        t_full = full_batch_s(spec.batch_time, spec.token_budget)
        tokens = float(per_class @ analysis.tokens_per_job[:, j])
        b = min(tokens / spec.token_budget, span / t_full if t_full > 0 else math.inf)
        batches += b
        worst = max(worst, (b, j, t_full))
    if not batches <= MAX_BATCHES:
        b, j, t_full = worst
        field, value = ((f"engines[{j}].batch_time", net.engines[j].batch_time.to_dict()) if t_full < TINY_BATCH_S
                        else ("run.drain", True) if drain else ("run.horizon_s", horizon))
        raise ConfigError(field, value, f"a network run of at most {MAX_BATCHES:,} batches ({LIMITS_DOC}); this one "
                                        f"needs at least {_count(batches)} (engine {net.engines[j].name!r}: "
                                        f"{_count(b)}, of at most {net.engines[j].token_budget} tokens and "
                                        f"{t_full:.3g} s each); lower {lower}")
    per_visit, per_batch = NETWORK_BYTES[network_path(net, method)]
    budget = sum(s.token_budget for s in net.engines) * TOKEN_BYTES
    need = visits * per_visit + batches * per_batch + budget
    check_memory(need, "run.horizon_s", horizon,
                 f"{_count(visits)} visits × {per_visit} B + at least {_count(batches)} batches × {per_batch} B", lower)


__all__ = ["GB", "MAX_ARRIVALS", "MAX_BATCHES", "MAX_TRACE_BYTES", "MEMORY_ENV", "RunSize", "available_memory",
           "check_memory", "check_network", "check_run", "check_length_file", "check_token_budget", "check_trace_file", "estimate_run",
           "full_batch_s", "memory_limit", "network_path", "run_path"]
