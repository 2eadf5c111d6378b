"""The ``[cluster]`` table of a config: replicas, router, reporting delay, sessions (docs/cluster.md).

A cluster config is a single-engine config (``[engine]``, ``[workload]``, ``[run]``: docs/config.md)
plus ``[cluster]``:

* ``replicas``       N identical replicas of ``[engine]``, or a list of tables, each overriding
                     ``[engine]``'s keys for ``count`` replicas (heterogeneous pools);
* ``router``         a name of :data:`~llmqueue.cluster.routers.ROUTERS` or ``path.py:Class``;
* ``router_options`` the router's options (d, weights, virtual_nodes);
* ``report_delay_s`` the age of what replicas report to the router (finishes, KV use);
* ``sessions``       the number of sessions requests are drawn from (session affinity).

``workload.load`` is a fraction of the *pooled* λ* (Σ of the replicas' Theorem 2 capacities over
m_p + m_d).  Every error names the dotted key and what is allowed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmqueue.checks import integer, number
import numpy as np

from llmqueue.cluster.routers import ROUTERS, Router, make_router, router_class
from llmqueue.config import ENGINE_KEYS, Config, parse_config, parse_override, read_toml, set_dotted
from llmqueue.errors import ConfigError

CLUSTER_KEYS = {"replicas", "router", "router_options", "report_delay_s", "sessions"}
REPLICA_KEYS = {"count", "name"}
MAX_REPLICAS = 4096


@dataclass(frozen=True)
class Replica:
    """One replica: its name and its single-engine config (the pool's workload and run)."""

    name: str
    config: Config


@dataclass(frozen=True)
class ClusterConfig:
    """A validated cluster config; ``base`` is the pool's config (its workload at the pooled rate)."""

    base: Config
    replicas: tuple[Replica, ...]
    router: str
    router_cls: type[Router]
    router_options: dict[str, Any]
    report_delay_s: float
    sessions: int | None
    load: float | None            # workload.load as given: a fraction of the pooled λ*
    data: dict[str, Any]          # the resolved TOML, [cluster] included

    @property
    def size(self) -> int:
        return len(self.replicas)


def _renamed(exc: ConfigError, prefix: str) -> ConfigError:
    field = exc.field.removeprefix("engine.") if exc.field.startswith("engine.") else exc.field
    return ConfigError(f"{prefix}.{field}" if exc.field.startswith("engine") else exc.field, exc.value, exc.allowed)


def _replica_tables(value: Any) -> list[tuple[str, dict[str, Any], str]]:
    """(name, [engine] overrides, field) of every replica."""
    allowed = ("at least 1 replica: an integer N (N copies of [engine]), or a list of tables, each with "
               "[engine] keys to override and an optional count")
    if isinstance(value, list):
        if not value:
            raise ConfigError("cluster.replicas", value, allowed)
        out = []
        for k, table in enumerate(value):
            field = f"cluster.replicas[{k}]"
            if not isinstance(table, dict):
                raise ConfigError(field, table, "a table of [engine] keys (and count, name)")
            table = dict(table)
            count = integer(table.pop("count", 1), f"{field}.count", 1)
            name = table.pop("name", None)
            if name is not None and not isinstance(name, str):
                raise ConfigError(f"{field}.name", name, "a string")
            for c in range(count):
                label = name or f"r{len(out)}"
                out.append((f"{label}.{c}" if name and count > 1 else label, table, field))
                if len(out) > MAX_REPLICAS:
                    raise ConfigError("cluster.replicas", len(out), f"at most {MAX_REPLICAS} replicas")
        return out
    n = integer(value, "cluster.replicas", 1, what=allowed) if not isinstance(value, dict) else None
    if n is None:
        raise ConfigError("cluster.replicas", value, allowed)
    if n > MAX_REPLICAS:
        raise ConfigError("cluster.replicas", n, f"at most {MAX_REPLICAS} replicas")
    return [(f"r{j}", {}, "cluster.replicas") for j in range(n)]


def replica_tables(value: Any, field: str = "cluster.replicas") -> list[tuple[str, dict[str, Any], str]]:
    """(name, engine-key overrides, field) of every replica a ``replicas`` value (an integer N or replica
    tables with count and name) describes, its errors naming ``field``: a network's pool node reads its
    ``engines[i].replicas`` with this (docs/network.md, "Pools as engines")."""
    if field == "cluster.replicas":
        return _replica_tables(value)
    try:
        tables = _replica_tables(value)
    except ConfigError as exc:
        raise ConfigError(exc.field.replace("cluster.replicas", field, 1), exc.value,
                          exc.allowed.replace("copies of [engine]", "copies of this engine")
                          .replace("[engine] keys", "this engine's keys")) from None
    return [(name, overrides, where.replace("cluster.replicas", field, 1)) for name, overrides, where in tables]


def _replica_config(base: dict[str, Any], overrides: dict[str, Any], field: str, base_dir: Path) -> Config:
    engine = dict(base.get("engine", {}))
    if "scheduler" in overrides and overrides["scheduler"] != engine.get("scheduler"):
        engine = {k: v for k, v in engine.items() if k in ENGINE_KEYS}   # the base's policy options do not carry over
    engine.update(overrides)
    data = {**base, "engine": engine}
    try:
        return parse_config(data, base_dir)
    except ConfigError as exc:
        raise _renamed(exc, field) from None


def parse_cluster(data: dict[str, Any], base_dir: Path | None = None) -> ClusterConfig:
    """Validate a cluster config mapping into a :class:`ClusterConfig`."""
    from llmqueue.analysis import capacity
    from llmqueue.runner import batch_time_of, build_workload

    base_dir = base_dir or Path.cwd()
    data = copy.deepcopy(dict(data))
    cluster = data.pop("cluster", None)
    if cluster is None:
        raise ConfigError("cluster", None, "a [cluster] table with replicas and router (docs/cluster.md)")
    if not isinstance(cluster, dict):
        raise ConfigError("cluster", cluster, "a table with replicas and router (docs/cluster.md)")
    if "prefill" in cluster or "decode" in cluster:
        raise ConfigError("cluster.prefill" if "prefill" in cluster else "cluster.decode", "a table",
                          "a pool of replicas here: a disaggregated config (prefill and decode pools) runs with "
                          "llmqueue cluster simulate, capacity or plan")
    for key in cluster:
        if key not in CLUSTER_KEYS:
            raise ConfigError(f"cluster.{key}", cluster[key], f"a known key: {', '.join(sorted(CLUSTER_KEYS))}")
    if "replicas" not in cluster:
        raise ConfigError("cluster.replicas", None, "the number of replicas (an integer of at least 1) or a list "
                                                    "of replica tables")
    tables = _replica_tables(cluster["replicas"])
    name = cluster.get("router", "jsq")
    cls = router_class(name, base_dir)
    options = cluster.get("router_options", {})
    if not isinstance(options, dict):
        raise ConfigError("cluster.router_options", options, f"a table of router {cls.name!r}'s options")
    delay = number(cluster.get("report_delay_s", 0.0), "cluster.report_delay_s", at_least=0)
    sessions = cluster.get("sessions")
    if sessions is not None:
        sessions = integer(sessions, "cluster.sessions", 1, what="the number of sessions requests belong to")

    parse_config(data, base_dir)   # the base config first: its errors name [engine], [workload], [run]
    configs: dict[str, Config] = {}   # one validation per distinct replica table
    replicas = []
    for label, overrides, field in tables:
        key = repr(sorted(overrides.items()))
        if key not in configs:
            configs[key] = _replica_config(data, overrides, field, base_dir)
        replicas.append(Replica(label, configs[key]))
    if any(r.config.engine.get("prefix_caching") for r in replicas):
        raise ConfigError("cluster.replicas", "prefix_caching = true",
                          "replicas without prefix caching (not yet supported in a pool)")
    make_router(cls, [1.0] * len(replicas), np.random.default_rng(0), options)   # checks the options now
    if cls.needs_memory and any(r.config.engine.get("kv_blocks") is None for r in replicas):
        raise ConfigError("cluster.router", cls.name, "a router other than least-kv, or engine.kv_blocks set for "
                                                     "every replica (least-kv reads their KV use)")

    workload = data.setdefault("workload", {})
    load = None
    if workload.get("arrival", "trace" if "trace" in workload else "poisson") != "trace" and "rate" not in workload:
        load = float(workload.pop("load", 0.9))
        first = replicas[0].config
        w = build_workload(first)
        per_request = w.mean_prompt_len + w.mean_output_len
        pooled = sum(capacity(batch_time_of(r.config), r.config.engine["token_budget"])[1] for r in replicas)
        workload["rate"] = load * pooled / per_request
        data["workload"] = workload
        base = parse_config(data, base_dir)
        replicas = [Replica(r.name, _with_workload(r.config, base)) for r in replicas]
    else:
        base = parse_config(data, base_dir)
    resolved = {**base.data, "cluster": {**cluster, "router": cls.name if name in ROUTERS else name}}
    return ClusterConfig(base, tuple(replicas), cls.name, cls, dict(options), delay, sessions, load, resolved)


def _with_workload(replica: Config, base: Config) -> Config:
    """The replica's config with the pool's resolved workload (the pooled rate)."""
    return Config({**replica.data, "workload": base.data["workload"]}, replica.base_dir, replica.run)


def read_cluster_data(source: str | Path, overrides: list[str] | None = None) -> tuple[dict[str, Any], Path]:
    """A cluster config file's tables (or a built-in cluster scenario's) with ``key=value``
    overrides applied, and the folder its relative paths are relative to."""
    from llmqueue.cluster.scenarios import CLUSTER_SCENARIOS, scenario_data

    p = Path(source)
    if not p.exists() and str(source) in CLUSTER_SCENARIOS:
        data, base_dir = scenario_data(str(source)), Path.cwd()
    else:
        data, base_dir = read_toml(p), p.resolve().parent
    for item in overrides or []:
        set_dotted(data, *parse_override(item))
    return data, base_dir


def load_cluster(source: str | Path, overrides: list[str] | None = None) -> ClusterConfig:
    """A cluster config file, or a built-in cluster scenario's name; ``key=value`` overrides."""
    return parse_cluster(*read_cluster_data(source, overrides))


__all__ = ["ClusterConfig", "Replica", "load_cluster", "parse_cluster", "read_cluster_data", "replica_tables"]
