"""Networks of LLM engines and delay stations: multi-class routes with forks, joins and loops
(arXiv 2504.07347 §5).  docs/network.md documents the config, the policies and the analysis.

    net = load_network("rybko-stolyar")          # a file or a built-in scenario, --set style overrides
    print(analyze_network(net).bottleneck)       # traffic equations
    summary = run_network(net)                   # simulate + summarize
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from llmqueue.errors import ConfigError
from llmqueue.limits import check_network
from llmqueue.network.analysis import NetworkAnalysis, analyze_network, engine_memory, engine_prefix, prefix_scaling
from llmqueue.network.metrics import network_timeseries, summarize_network
from llmqueue.network.model import (
    POLICIES,
    Network,
    is_network_data,
    is_network_source,
    load_network,
    parse_network,
)
from llmqueue.network import sim as _sim
from llmqueue.network.sim import NetworkResult


@functools.wraps(_sim.simulate_network)
def simulate_network(net: Network, *, seed: int | None = None, horizon_s: float | None = None,
                     drain: bool | None = None, jobs=None, progress: Callable[[float], None] | None = None,
                     method: str | None = None) -> NetworkResult:
    # First the run's size (jobs, batches, memory: llmqueue.limits), refused when it cannot fit.
    check_network(net, analyze_network(net), horizon_s=horizon_s, drain=drain, jobs=jobs, method=method)
    return _sim.simulate_network(net, seed=seed, horizon_s=horizon_s, drain=drain, jobs=jobs, progress=progress,
                                 method=method)


def run_network(net: Network, **kwargs) -> dict:
    """Simulate ``net`` (keyword arguments as :func:`simulate_network`) and return its summary."""
    return summarize_network(simulate_network(net, **kwargs))


def compare_policies(source: str, overrides: list[str], policies: list[str],
                     on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Run the config once per policy, every engine set to it (``config``: as configured).

    Same seed, so the same jobs for every policy (common random numbers).  Each summary gets
    a ``policy`` key; ``on_done`` is called as each finishes.
    """
    allowed = ("config", *POLICIES)
    for policy in policies:
        if policy not in allowed:
            raise ConfigError("--policies", policy, f"a comma-separated list of {', '.join(allowed)}")
    engines = [e.name for e in load_network(source, overrides).engines]
    out = []
    for policy in policies:
        sets = [*overrides, *([] if policy == "config" else [f"engines.{e}.policy={policy}" for e in engines])]
        summary = {"policy": policy, **run_network(load_network(source, sets))}
        out.append(summary)
        if on_done is not None:
            on_done(summary)
    return out


__all__ = ["Network", "NetworkAnalysis", "NetworkResult", "analyze_network", "compare_policies", "engine_memory",
           "engine_prefix", "prefix_scaling",
           "is_network_data",
           "is_network_source",
           "load_network", "network_timeseries", "parse_network", "run_network", "simulate_network",
           "summarize_network"]
