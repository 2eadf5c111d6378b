"""A sweep driver process for tests/test_store_lease.py (not a test module).

    python -m lease_worker STORE [GO_FILE]

Sweeps the 12 points of :data:`ARGS` (Fig. 1, 5 simulated seconds, 12 rates) into STORE
through the library, with ``LEASE_JOBS`` local workers (default 1). Each run sleeps
``LEASE_DELAY_S`` seconds first (so that processes overlap and can be killed mid-run) and
tags the stored ``version`` column with ``+LEASE_WORKER``, so a test can tell which process
stored which row; the summary is untouched. With GO_FILE it writes ``GO_FILE.ready-NAME``
once imported and waits for GO_FILE to exist before it starts (all processes start at
once). It prints its :class:`SweepStats` as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

CONFIG, SETS, GRID = "fig1", ["run.horizon_s=5"], ["workload.rate=2:13:1"]
ARGS = [CONFIG, "--set", *SETS, "--grid", *GRID]  # the same sweep through the CLI


def slow_point(task):
    """``run_point`` after a pause, its version tagged with the worker's name."""
    from llmqueue.sweep import run_point

    time.sleep(float(os.environ.get("LEASE_DELAY_S", "0")))
    outcome = run_point(task)
    outcome["version"] = f"{outcome['version']}+{os.environ.get('LEASE_WORKER', '?')}"
    return outcome


def points():
    from llmqueue.cli.common import config_from
    from llmqueue.sweep import expand, parse_grid, seed_list

    base = config_from(CONFIG, SETS)
    return expand(base, parse_grid(GRID), seed_list(1, base.run.seed))


def main(argv: list[str]) -> int:
    from lease_worker import slow_point as fn  # by its module name: picklable for the workers
    from llmqueue.sweep import LocalExecutor, Store
    from llmqueue.sweep.driver import sweep

    store_path, go = argv[0], (Path(argv[1]) if len(argv) > 1 else None)
    grid = points()
    executor = LocalExecutor(int(os.environ.get("LEASE_JOBS", "1")))
    if executor.ctx.get_start_method() == "forkserver":  # started (simulator imported) before the race
        from multiprocessing import forkserver

        forkserver.ensure_running()
    if go is not None:
        Path(f"{go}.ready-{os.environ.get('LEASE_WORKER', os.getpid())}").touch()
        while not go.exists():
            time.sleep(0.01)
    with Store(store_path) as store:
        stats = sweep(grid, store, executor, fn=fn, poll_s=0.05)
    print(json.dumps(dataclasses.asdict(stats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
