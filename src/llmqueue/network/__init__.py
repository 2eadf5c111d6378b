"""Networks of LLM engines and delay stations: multi-class routes with forks, joins and loops
(PAPER.md §6, paper §5).  docs/network.md documents the config, the policies and the analysis.

    net = load_network("rybko-stolyar")          # a file or a built-in scenario, --set style overrides
    print(analyze_network(net).bottleneck)       # traffic equations
    summary = run_network(net)                   # simulate + summarize
"""

from __future__ import annotations

from llmqueue.network.analysis import NetworkAnalysis, analyze_network
from llmqueue.network.metrics import network_timeseries, summarize_network
from llmqueue.network.model import (
    Network,
    is_network_data,
    is_network_source,
    load_network,
    parse_network,
)
from llmqueue.network.sim import NetworkResult, simulate_network


def run_network(net: Network, **kwargs) -> dict:
    """Simulate ``net`` (keyword arguments as :func:`simulate_network`) and return its summary."""
    return summarize_network(simulate_network(net, **kwargs))


__all__ = ["Network", "NetworkAnalysis", "NetworkResult", "analyze_network", "is_network_data", "is_network_source",
           "load_network", "network_timeseries", "parse_network", "run_network", "simulate_network",
           "summarize_network"]
