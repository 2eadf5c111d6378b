"""Replica pools behind a router (docs/cluster.md): N engines of the paper's model
(arXiv 2504.07347 §3.1), each its own scheduler, budget, batch time and KV memory, and a router
that sends each arrival to one of them from what a real router could see.

:func:`load_cluster` reads a config with a ``[cluster]`` table; :func:`run_pool` routes, simulates
and summarises one run; :func:`compare_routers` runs several routers on the same requests;
:func:`pool_capacity` gives the pooled Theorem 2 capacity and the router's prediction.
"""

from llmqueue.cluster.capacity import PoolCapacity, pool_capacity
from llmqueue.cluster.config import ClusterConfig, Replica, load_cluster, parse_cluster
from llmqueue.cluster.routers import ROUTERS, Router, View
from llmqueue.cluster.run import PoolRun, compare_routers, run_pool, summarize_pool
from llmqueue.cluster.sim import PoolResult, simulate_pool

__all__ = ["ROUTERS", "ClusterConfig", "PoolCapacity", "PoolResult", "PoolRun", "Replica", "Router", "View",
           "compare_routers", "load_cluster", "parse_cluster", "pool_capacity", "run_pool", "simulate_pool",
           "summarize_pool"]
