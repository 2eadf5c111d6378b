"""The network's schema: engines, delay stations, classes and their routes (arXiv 2504.07347 §5).

A network config is TOML with ``[[engines]]``, ``[[delays]]``, ``[[classes]]`` (each class
with its ``[[classes.hops]]``), an optional ``[network]`` table and ``[run]``; docs/network.md
has every key with complete examples.  :func:`parse_network` validates it all — stations,
length laws, arrival processes and the route structure (:mod:`llmqueue.network.routes`) —
so that a bad config stops with one clear :class:`~llmqueue.errors.ConfigError` before any
simulation starts.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from llmqueue.model.batch_time import PAPER_STAIRCASE, BatchTime, make_batch_time
from llmqueue.checks import boolean, integer, number
from llmqueue.config import parse_override, read_toml, set_dotted
from llmqueue.errors import ConfigError
from llmqueue.limits import check_length_file, check_token_budget
from llmqueue.model.kv import KVCache, make_kv
from llmqueue.schedulers import SCHEDULERS, custom, scheduler_class
from llmqueue.model.workload import ArrivalProcess, LengthDist, make_arrivals, make_length

FCFS, PRIORITY, MAX_PRESSURE = "fcfs", "priority", "max-pressure"
POLICIES = (FCFS, PRIORITY, MAX_PRESSURE)
EXIT = -1            # route target: the job leaves the network
ENGINE_KEYS = {"name", "scheduler", "token_budget", "max_batch_requests", "batch_time", "policy", "class_priority",
               "kv_blocks", "block_size", "kv_policy", "prefix_caching"}
#: a node that is a pool of replicas behind a router (docs/network.md, "Pools as engines")
POOL_KEYS = {"replicas", "router", "router_options", "report_delay_s"}
CLASS_KEYS = {"name", "arrival", "rate", "cv", "add_previous_output", "add_previous_context", "hops"}
HOP_KEYS = {"id", "engine", "delay", "prompt", "output", "next", "p", "fork", "join", "loop", "rounds",
            "continue_p", "max_rounds", "add_previous_output", "add_previous_context"}
RUN_KEYS = {"horizon_s", "seed", "drain", "verdict_tolerance", "reject_tolerance", "method"}
NETWORK_KEYS = {"load"}
TOP_KEYS = {"network", "engines", "delays", "classes", "run"}
MAX_ROUNDS = 10_000


# ---- delay-time laws (seconds) -----------------------------------------------------------

class DelayTime:
    """Law of a delay-station time in seconds: fixed, exponential, uniform or lognormal."""

    LAWS: ClassVar[dict[str, tuple[str, ...]]] = {"fixed": ("value_s",), "exponential": ("mean_s",), "uniform": ("low_s", "high_s"),
            "lognormal": ("mean_s", "sigma")}

    def __init__(self, spec: Mapping[str, Any], field: str) -> None:
        law = spec.get("dist")
        if law not in self.LAWS:
            raise ConfigError(f"{field}.dist", law, f"one of {', '.join(self.LAWS)}")
        self.law = law
        p = {}
        for key in self.LAWS[law]:
            if key not in spec:
                raise ConfigError(f"{field}.{key}", None, f"required with dist = {law!r}")
            p[key] = number(spec[key], f"{field}.{key}", above=0 if key in ("mean_s", "sigma") else None,
                            at_least=None if key in ("mean_s", "sigma") else 0)
        if law == "uniform" and p["high_s"] < p["low_s"]:
            raise ConfigError(f"{field}.high_s", p["high_s"], f"a number >= low_s = {p['low_s']:g}")
        self.params = p

    @property
    def mean(self) -> float:
        p = self.params
        return {"fixed": lambda: p["value_s"], "exponential": lambda: p["mean_s"],
                "uniform": lambda: (p["low_s"] + p["high_s"]) / 2, "lognormal": lambda: p["mean_s"]}[self.law]()

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        p = self.params
        if self.law == "fixed":
            return np.full(n, p["value_s"])
        if self.law == "exponential":
            return rng.exponential(p["mean_s"], n)
        if self.law == "uniform":
            return rng.uniform(p["low_s"], p["high_s"], n)
        mu = math.log(p["mean_s"]) - p["sigma"] ** 2 / 2  # E = exp(mu + sigma^2 / 2) = mean_s
        return rng.lognormal(mu, p["sigma"], n)

    def to_dict(self) -> dict:
        return {"dist": self.law, **self.params}


# ---- the validated model -----------------------------------------------------------------

@dataclass(frozen=True)
class EngineSpec:
    name: str
    scheduler: str
    options: dict
    token_budget: int
    max_batch_requests: int | None
    batch_time: BatchTime
    policy: str
    class_priority: tuple[int, ...]      # class indices, highest priority first
    kv: KVCache | None = None            # KV-cache memory (kv_blocks, block_size, kv_policy, prefix_caching);
                                         # None: unlimited
    pool: PoolSpec | None = None         # a pool of replicas behind a router (None: one engine)

    @property
    def prefix_caching(self) -> bool:
        return self.kv is not None and self.kv.prefix_caching

    @property
    def replicas(self) -> tuple[EngineSpec, ...]:
        """The engines of this node: its replicas, or itself."""
        return (self,) if self.pool is None else self.pool.replicas


@dataclass(frozen=True)
class PoolSpec:
    """A node of N replicas behind a router (docs/network.md, "Pools as engines"; the routers of
    docs/cluster.md).  Each replica is an :class:`EngineSpec` (its own scheduler, budget, batch time,
    KV memory); the router decides at each sub-request's admission, the job being the session."""

    replicas: tuple[EngineSpec, ...]
    labels: tuple[str, ...]               # replica names: r0, r1, ... or NAME.i for named replica tables
    router: str                           # a name of llmqueue.cluster.routers.ROUTERS, or path.py:Class
    router_cls: type
    router_options: dict
    report_delay_s: float


@dataclass(frozen=True)
class DelaySpec:
    name: str
    time: DelayTime


@dataclass(frozen=True)
class Hop:
    """One step of a route: a visit to an engine (``engine`` >= 0) or to a delay station."""

    index: int
    id: str
    engine: int | None                    # engine index, or None for a delay hop
    delay: int | None                     # delay-station index
    prompt: LengthDist | None
    output: LengthDist | None
    grow: bool                            # add the previous LLM output to this prompt
    targets: tuple[int, ...]              # next hops (EXIT = leave), chosen with probs
    probs: tuple[float, ...]
    fork: tuple[int, ...]                 # parallel branches instead of targets (empty: none)
    join: bool                            # wait here for every branch of the innermost fork
    loop: int | None                      # go back to this hop for another round ...
    rounds: int | None                    # ... until `rounds` rounds are done, or
    continue_p: float | None              # ... with probability continue_p each round,
    max_rounds: int | None                # ... at most max_rounds rounds
    # add_previous_context: the prompt starts with the job's context, the previous LLM visit's whole
    # sequence (its prompt + output; after a join the branches' contexts one after another)
    context: bool = False

    @property
    def is_engine(self) -> bool:
        return self.engine is not None


@dataclass(frozen=True)
class ClassSpec:
    name: str
    arrivals: ArrivalProcess               # at the given rate (before any [network].load scaling)
    hops: tuple[Hop, ...]
    field: str                             # "classes[k]" for messages


@dataclass
class Network:
    engines: tuple[EngineSpec, ...]
    delays: tuple[DelaySpec, ...]
    classes: tuple[ClassSpec, ...]
    routes: tuple = ()                     # routes.Route per class (filled by parse_network)
    rates: tuple[float, ...] = ()          # λ_k in jobs/s after [network].load scaling
    load: float | None = None
    horizon_s: float = 1200.0
    seed: int = 0
    drain: bool = False
    verdict_tolerance: float = 0.01
    reject_tolerance: float = 0.001        # share of jobs rejected above which the verdict is "rejects"
    method: str = "fast"                   # "fast" (the compiled core where it can run) or "reference"
    data: dict = field(default_factory=dict)   # the resolved TOML

    def engine_index(self, name: str) -> int:
        return [e.name for e in self.engines].index(name)


# ---- parsing -----------------------------------------------------------------------------

def is_network_data(data: Mapping[str, Any]) -> bool:
    """A config is a network config when it has ``[[engines]]``."""
    return "engines" in data


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}", table[key], f"a known key: {', '.join(sorted(allowed))}")


def _tables(data: Mapping[str, Any], key: str, required: bool) -> list[dict]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(key, value, f"an array of tables ([[{key}]])")
    if required and not value:
        raise ConfigError(key, None, f"at least one [[{key}]] table")
    return [dict(t) for t in value]


def _name(table: Mapping[str, Any], where: str, taken: dict[str, str]) -> str:
    name = table.get("name")
    if not isinstance(name, str) or not name or name == "exit":
        raise ConfigError(f"{where}.name", name, "a non-empty string other than 'exit'")
    if name in taken:
        raise ConfigError(f"{where}.name", name, f"a name not already used (by {taken[name]})")
    taken[name] = where
    return name


def parse_network(data: Mapping[str, Any], base_dir: Path | None = None) -> Network:
    """Validate a network config mapping into a :class:`Network` (routes checked, rates scaled)."""
    # routes and analysis build on this module's types, so they are imported here, not at the top
    from llmqueue.network.analysis import analyze_network
    from llmqueue.network.routes import Route

    _check_keys(data, TOP_KEYS, "config")
    taken: dict[str, str] = {}
    raw_engines = _tables(data, "engines", required=True)
    raw_delays = _tables(data, "delays", required=False)
    raw_classes = _tables(data, "classes", required=True)
    engine_names = [_name(t, f"engines[{i}]", taken) for i, t in enumerate(raw_engines)]
    delay_names = [_name(t, f"delays[{i}]", taken) for i, t in enumerate(raw_delays)]
    class_taken: dict[str, str] = {}
    class_names = [_name(t, f"classes[{i}]", class_taken) for i, t in enumerate(raw_classes)]

    engines = tuple(_engine(t, f"engines[{i}]", class_names, base_dir) for i, t in enumerate(raw_engines))
    delays = []
    for i, t in enumerate(raw_delays):
        where = f"delays[{i}]"
        _check_keys(t, {"name", *{k for keys in DelayTime.LAWS.values() for k in keys}, "dist"}, where)
        delays.append(DelaySpec(t["name"], DelayTime({k: v for k, v in t.items() if k != "name"}, where)))
    classes = tuple(_class(t, f"classes[{i}]", engine_names, delay_names, base_dir)
                    for i, t in enumerate(raw_classes))

    net_table = data.get("network", {})
    if not isinstance(net_table, dict):
        raise ConfigError("network", net_table, "a table")
    _check_keys(net_table, NETWORK_KEYS, "network")
    load = number(net_table["load"], "network.load", above=0) if "load" in net_table else None
    run = data.get("run", {})
    if not isinstance(run, dict):
        raise ConfigError("run", run, "a table")
    _check_keys(run, RUN_KEYS, "run")
    net = Network(
        engines=engines, delays=tuple(delays), classes=classes, load=load,
        horizon_s=number(run.get("horizon_s", 1200.0), "run.horizon_s", above=0),
        seed=integer(run.get("seed", 0), "run.seed", 0),
        drain=boolean(run.get("drain", False), "run.drain"),
        verdict_tolerance=number(run.get("verdict_tolerance", 0.01), "run.verdict_tolerance", above=0),
        reject_tolerance=number(run.get("reject_tolerance", 0.001), "run.reject_tolerance", at_least=0, at_most=1),
        method=_method(run.get("method", "fast")),
        data=dict(data),
    )
    net.routes = tuple(Route(c, net) for c in classes)
    net.rates = tuple(c.arrivals.rate for c in classes)
    with np.errstate(over="ignore", invalid="ignore"):
        rho = analyze_network(net).rho
    if not np.isfinite(rho).all():   # e.g. a rate of 1e308: its tokens/s overflow
        k = int(np.argmax(net.rates))
        raise ConfigError(f"classes[{k}].rate", net.rates[k], "a rate whose offered tokens/s at every engine are "
                                                             "finite (λ_k × tokens per job below about 1e300)")
    if load is not None:  # the class rates are relative: scale them so the bottleneck's ρ = load
        rho_max = max(rho)
        if rho_max <= 0:
            raise ConfigError("network.load", load, "omitted: no class brings any tokens to an engine")
        net.rates = tuple(r * load / rho_max for r in net.rates)
    return net


def _engine(t: dict, where: str, class_names: list[str], base_dir: Path | None = None) -> EngineSpec:
    pool_keys = {k: t[k] for k in POOL_KEYS if k in t}
    if pool_keys:
        return _pool(t, pool_keys, where, class_names, base_dir)
    name = t.get("scheduler", "sarathi")
    cls = scheduler_class(name, base_dir, f"{where}.scheduler")  # a registered name, or a policy file
    if custom.is_reference(name) and name not in SCHEDULERS:
        name = custom.resolve(name, base_dir)   # absolute: the run may start in another folder
    options = {k: v for k, v in t.items() if k not in ENGINE_KEYS}
    _check_keys(options, ENGINE_KEYS | POOL_KEYS | set(cls.options), where)   # the message lists every key an engine takes
    try:
        custom.build(cls, options, f"{where}.scheduler")
    except ConfigError as exc:  # re-word "engine.X" as "engines[i].X"
        raise ConfigError(exc.field.replace("engine.", f"{where}.", 1), exc.value, exc.allowed) from None
    budget = integer(t.get("token_budget", 512), f"{where}.token_budget", 1,
                     what="a batch must fit at least one decode token")
    cap = t.get("max_batch_requests")
    cap = None if cap is None else integer(cap, f"{where}.max_batch_requests", 1)
    spec = t.get("batch_time", dict(PAPER_STAIRCASE))
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}.batch_time", spec, "a table with a model and its parameters")
    batch_time = make_batch_time(spec, f"{where}.batch_time", noise=False)
    check_token_budget(budget, f"{where}.token_budget")   # before the table that the budget sizes
    batch_time.table(budget)
    policy = t.get("policy", FCFS)
    if policy not in POLICIES:
        raise ConfigError(f"{where}.policy", policy, f"one of {', '.join(POLICIES)}")
    order = t.get("class_priority")
    if policy == PRIORITY:
        if not isinstance(order, list) or not order or len(set(map(str, order))) != len(order):
            raise ConfigError(f"{where}.class_priority", order,
                              "a non-empty list of distinct class names, highest priority first "
                              "(required with policy = \"priority\")")
        for c in order:
            if c not in class_names:
                raise ConfigError(f"{where}.class_priority", c, f"a class name: {', '.join(class_names)}")
        ranks = tuple(class_names.index(c) for c in order)
    else:  # kept (unused) so that --set engines.X.policy=fcfs works on a priority config
        ranks = ()
    try:   # KV memory (docs/memory.md, docs/network.md): the keys and checks of a single [engine]
        kv = make_kv(t)
    except ConfigError as exc:  # re-word "engine.X" as "engines[i].X" (also in "set together with ...")
        raise ConfigError(exc.field.replace("engine.", f"{where}.", 1), exc.value,
                          exc.allowed.replace("engine.kv_blocks", f"{where}.kv_blocks")) from None
    return EngineSpec(t["name"], name, options, budget, cap, batch_time, policy, ranks, kv)


def _pool(t: dict, keys: dict, where: str, class_names: list[str], base_dir: Path | None) -> EngineSpec:
    """A node with ``replicas``: the stand-alone cluster's schema (llmqueue.cluster.config: an integer N,
    or replica tables overriding this table's keys, each with an optional count and name) and routers
    (llmqueue.cluster.routers), with the errors naming ``engines[i].replicas`` and so on."""
    from llmqueue.analysis import capacity
    from llmqueue.cluster.config import replica_tables
    from llmqueue.cluster.routers import make_router, router_class

    if "replicas" not in keys:
        other = next(iter(sorted(keys)))
        raise ConfigError(f"{where}.{other}", keys[other], f"set together with {where}.replicas (the pool's size, "
                                                           "or its replica tables)")
    tables = replica_tables(keys["replicas"], f"{where}.replicas")
    base = {k: v for k, v in t.items() if k not in POOL_KEYS}
    options = keys.get("router_options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{where}.router_options", options, "a table of the router's options")
    router = keys.get("router", "jsq")
    cls = router_class(router, base_dir, f"{where}.router")
    if custom.is_reference(router):
        router = custom.resolve(router, base_dir, f"{where}.router")   # absolute: the run may start elsewhere
    delay = number(keys.get("report_delay_s", 0.0), f"{where}.report_delay_s", at_least=0)
    parsed: dict[str, EngineSpec] = {}   # one validation per distinct replica table
    replicas, labels = [], []
    for label, overrides, field in tables:
        key = repr(sorted(overrides.items()))
        if key not in parsed:
            bad = sorted(set(overrides) & (POOL_KEYS | {"name"}))
            if bad:
                raise ConfigError(f"{field}.{bad[0]}", overrides[bad[0]], "a key of one engine (a replica is no pool)")
            table = dict(base)
            if "scheduler" in overrides and overrides["scheduler"] != table.get("scheduler", "sarathi"):
                table = {k: v for k, v in table.items() if k in ENGINE_KEYS}   # the base's policy options do not carry over
            table.update(overrides)
            parsed[key] = _engine(table, field if field != f"{where}.replicas" else where, class_names, base_dir)
        replicas.append(replace(parsed[key], name=f"{t['name']}.{label}"))
        labels.append(label)
    if cls.needs_memory and any(r.kv is None for r in replicas):
        raise ConfigError(f"{where}.router", cls.name, f"a router other than {cls.name}, or kv_blocks set for every "
                                                       f"replica ({cls.name} reads their KV use)")
    try:   # the options' names and types, now (power-of-d's d against the pool's size)
        make_router(cls, [capacity(r.batch_time, r.token_budget)[1] for r in replicas], np.random.default_rng(0),
                    options, f"{where}.router_options")
    except ConfigError as exc:
        raise ConfigError(exc.field.replace("cluster.router_options", f"{where}.router_options", 1), exc.value,
                          exc.allowed) from None
    pool = PoolSpec(tuple(replicas), tuple(labels), router, cls, dict(options), delay)
    first = replicas[0]
    return replace(first, name=t["name"], pool=pool)


def _class(t: dict, where: str, engine_names: list[str], delay_names: list[str],
           base_dir: Path | None) -> ClassSpec:
    _check_keys(t, CLASS_KEYS, where)
    spec = {"arrival": t.get("arrival", "poisson"), "rate": t.get("rate")}
    if "cv" in t:
        spec["cv"] = t["cv"]
    if spec["rate"] is None:
        raise ConfigError(f"{where}.rate", None, "jobs/s (relative weights when [network] load is given)")
    arrivals = make_arrivals(spec, field=where)
    grow_default = boolean(t.get("add_previous_output", False), f"{where}.add_previous_output")
    context_default = boolean(t.get("add_previous_context", False), f"{where}.add_previous_context")
    raw_hops = t.get("hops")
    if not isinstance(raw_hops, list) or not raw_hops or not all(isinstance(h, dict) for h in raw_hops):
        raise ConfigError(f"{where}.hops", raw_hops, "at least one [[classes.hops]] table")
    ids: dict[str, int] = {}
    for i, h in enumerate(raw_hops):
        hid = h.get("id", f"hop{i}")
        if not isinstance(hid, str) or not hid or hid == "exit" or hid in ids:
            raise ConfigError(f"{where}.hops[{i}].id", hid, "a string unique within the class, other than 'exit'")
        ids[hid] = i
    hops = tuple(_hop(h, i, f"{where}.hops[{i}]", ids, len(raw_hops), engine_names, delay_names, grow_default,
                      context_default, base_dir) for i, h in enumerate(raw_hops))
    return ClassSpec(t["name"], arrivals, hops, where)


def _target(value: Any, field: str, ids: dict[str, int]) -> int:
    if value == "exit":
        return EXIT
    if not isinstance(value, str) or value not in ids:
        raise ConfigError(field, value, f"a hop id of this class ({', '.join(ids)}) or 'exit'")
    return ids[value]


def _hop(h: dict, i: int, where: str, ids: dict[str, int], n: int, engine_names: list[str],
         delay_names: list[str], grow_default: bool, context_default: bool, base_dir: Path | None) -> Hop:
    _check_keys(h, HOP_KEYS, where)
    if ("engine" in h) == ("delay" in h):
        raise ConfigError(f"{where}.engine", h.get("engine"), "exactly one of engine = NAME or delay = NAME per hop")
    engine = delay = None
    prompt = output = None
    if "engine" in h:
        if h["engine"] not in engine_names:
            raise ConfigError(f"{where}.engine", h["engine"], f"an engine name: {', '.join(engine_names)}")
        engine = engine_names.index(h["engine"])
        for key in ("prompt", "output"):
            if key not in h:
                raise ConfigError(f"{where}.{key}", None, "a length distribution table, e.g. {dist = \"poisson\", mean = 32}")
            check_length_file(h[key], f"{where}.{key}", base_dir)   # an empirical law's CSV: before it is read
        prompt = make_length(h["prompt"], field=f"{where}.prompt", minimum=1, base_dir=base_dir)
        output = make_length(h["output"], field=f"{where}.output", minimum=0, base_dir=base_dir)
    else:
        if h["delay"] not in delay_names:
            allowed = ", ".join(delay_names) or "none defined: add a [[delays]] table"
            raise ConfigError(f"{where}.delay", h["delay"], f"a delay-station name ({allowed})")
        delay = delay_names.index(h["delay"])
        for key in ("prompt", "output", "add_previous_output", "add_previous_context"):
            if key in h:
                raise ConfigError(f"{where}.{key}", h[key], "omitted on a delay hop (it processes no tokens)")
    grow = boolean(h.get("add_previous_output", grow_default), f"{where}.add_previous_output")
    context = boolean(h.get("add_previous_context", context_default), f"{where}.add_previous_context")
    if engine is None:
        context = False   # a delay hop passes the context on
    if grow and context:
        raise ConfigError(f"{where}.add_previous_context", True,
                          "false when add_previous_output = true on the same hop (the context already holds the "
                          "previous output; set add_previous_output = false here)")
    fork: tuple[int, ...] = ()
    if "fork" in h:
        if "next" in h or "p" in h:
            raise ConfigError(f"{where}.fork", h["fork"], "omitted when next/p are given (a hop forks or moves on)")
        if not isinstance(h["fork"], list) or len(h["fork"]) < 2:
            raise ConfigError(f"{where}.fork", h["fork"], "a list of at least 2 hop ids (the parallel branches)")
        fork = tuple(_target(x, f"{where}.fork", ids) for x in h["fork"])
        if EXIT in fork:
            raise ConfigError(f"{where}.fork", "exit", "hop ids of this class (a branch cannot leave before its join)")
        targets, probs = (), ()
    else:
        nxt = h.get("next", "exit" if i == n - 1 else next(k for k, v in ids.items() if v == i + 1))
        if isinstance(nxt, list):
            if not nxt:
                raise ConfigError(f"{where}.next", nxt, "a hop id, 'exit', or a non-empty list of them with p")
            targets = tuple(_target(x, f"{where}.next", ids) for x in nxt)
            if "p" not in h:
                raise ConfigError(f"{where}.p", None, f"a list of {len(targets)} probabilities (next is a list)")
            p = h["p"]
            if not isinstance(p, list) or len(p) != len(targets):
                raise ConfigError(f"{where}.p", p, f"a list of {len(targets)} probabilities, one per next hop")
            probs = tuple(number(x, f"{where}.p", at_least=0, at_most=1) for x in p)
            if abs(sum(probs) - 1) > 1e-9:
                raise ConfigError(f"{where}.p", p, "probabilities that sum to 1")
        else:
            if "p" in h:
                raise ConfigError(f"{where}.p", h["p"], "omitted unless next is a list")
            targets, probs = (_target(nxt, f"{where}.next", ids),), (1.0,)
    join = boolean(h.get("join", False), f"{where}.join")
    loop = rounds = continue_p = max_rounds = None
    if "loop" in h:
        loop = _target(h["loop"], f"{where}.loop", ids)
        if loop == EXIT:
            raise ConfigError(f"{where}.loop", "exit", "a hop id of this class (where the next round starts)")
        if ("rounds" in h) == ("continue_p" in h):
            raise ConfigError(f"{where}.rounds", h.get("rounds"),
                              "exactly one of rounds (a fixed number) or continue_p (geometric) with loop")
        if "rounds" in h:
            rounds = integer(h["rounds"], f"{where}.rounds", 1, what=f"at most {MAX_ROUNDS}")
            if rounds > MAX_ROUNDS:
                raise ConfigError(f"{where}.rounds", rounds, f"an integer between 1 and {MAX_ROUNDS}")
        else:
            continue_p = number(h["continue_p"], f"{where}.continue_p", at_least=0)
            if continue_p >= 1:
                raise ConfigError(f"{where}.continue_p", h["continue_p"],
                                  "a probability < 1 (with 1 the loop never ends: a cycle without an exit)")
            if "max_rounds" in h:
                max_rounds = integer(h["max_rounds"], f"{where}.max_rounds", 1)
                if max_rounds > MAX_ROUNDS:
                    raise ConfigError(f"{where}.max_rounds", max_rounds, f"an integer between 1 and {MAX_ROUNDS}")
    else:
        for key in ("rounds", "continue_p", "max_rounds"):
            if key in h:
                raise ConfigError(f"{where}.{key}", h[key], "only allowed with loop = HOP_ID")
    if "max_rounds" in h and rounds is not None:
        raise ConfigError(f"{where}.max_rounds", h["max_rounds"], "only allowed with continue_p")
    return Hop(i, h.get("id", f"hop{i}"), engine, delay, prompt, output, grow, targets, probs, fork, join,
               loop, rounds, continue_p, max_rounds, context)


# ---- loading and overrides ---------------------------------------------------------------

ARRAYS = ("engines", "delays", "classes")


def apply_override(data: dict[str, Any], item: str) -> None:
    """``--set`` for networks: ``engines.S1.token_budget=1024``, ``classes.A.hops.h1.prompt.mean=64``,
    ``network.load=0.95``, ``run.horizon_s=600`` (array entries addressed by name, id or index)."""
    key, value = parse_override(item)
    parts = key.split(".")
    node: Any = data
    i = 0
    while i < len(parts) - 1 and parts[i] in (*ARRAYS, "hops") and isinstance(node.get(parts[i]), list):
        entries, ref = node[parts[i]], parts[i + 1]
        found = [t for t in entries if isinstance(t, dict) and (t.get("name") == ref or t.get("id") == ref)]
        if not found and ref.isdigit() and int(ref) < len(entries):
            found = [entries[int(ref)]]
        if not found:
            names = [str(t.get("name", t.get("id", j))) for j, t in enumerate(entries) if isinstance(t, dict)]
            raise ConfigError("--set", item, f"{'.'.join(parts[:i + 1])}.NAME with NAME one of {', '.join(names)}")
        node = found[0]
        i += 2
    if i >= len(parts):
        raise ConfigError("--set", item, "a key inside the addressed table, e.g. engines.S1.token_budget=1024")
    set_dotted(node, ".".join(parts[i:]), value)


def read_network_data(source: str | Path) -> tuple[dict[str, Any], Path]:
    """The TOML mapping of a file, or of a built-in scenario name when no such file exists."""
    from llmqueue.scenarios import SCENARIOS, scenario_data

    p = Path(source)
    if not p.exists() and str(source) in SCENARIOS:
        return scenario_data(str(source)), Path.cwd()
    return read_toml(p, "an existing TOML file or a scenario name"), p.resolve().parent


def is_network_source(source: str | Path | None) -> bool:
    """True when ``source`` (a file or a scenario name) holds a network config ([[engines]])."""
    if source is None:
        return False
    try:
        data, _ = read_network_data(source)
    except (ConfigError, tomllib.TOMLDecodeError):
        return False
    return is_network_data(data)


def load_network(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Network:
    """Read, override (``--set``) and validate a network config."""
    data, base_dir = read_network_data(source)
    for item in overrides:
        apply_override(data, item)
    return parse_network(data, base_dir)


def _method(value) -> str:
    if value not in ("fast", "reference"):
        raise ConfigError("run.method", value, "one of fast, reference (both give identical results)")
    return value
