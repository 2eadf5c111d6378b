"""Sweeps over many runs: grids, executors (local processes, Ray), the SQLite store,
capacity search by bisection, tidy exports (docs/sweeps.md).

Layered above :mod:`llmqueue.runner`: a sweep only builds configs and calls
:func:`llmqueue.runner.run_config` in its workers.
"""

from llmqueue.sweep.driver import SweepStats, run_tasks, sweep, tasks_of
from llmqueue.sweep.executors import LocalExecutor, RayExecutor, Task, make_executor, run_point
from llmqueue.sweep.grid import Axis, Point, config_hash, expand, parse_grid, seed_list
from llmqueue.sweep.maxrate import MaxRate, Slo, max_rate, parse_slo
from llmqueue.sweep.store import DEFAULT_MAX_RATE_STORE, DEFAULT_STORE, Store

__all__ = ["DEFAULT_MAX_RATE_STORE", "DEFAULT_STORE", "Axis", "LocalExecutor", "MaxRate", "Point", "RayExecutor", "Slo", "Store", "SweepStats",
           "Task", "config_hash", "expand", "make_executor", "max_rate", "parse_grid", "parse_slo", "run_point",
           "run_tasks", "seed_list", "sweep", "tasks_of"]
