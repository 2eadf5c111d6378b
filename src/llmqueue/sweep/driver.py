"""Run a set of points through an executor into the store, skipping what is stored.

Several drivers may share one store (two ``llmqueue sweep`` processes, on one machine or on
several that see the same file): each point is leased in the store right before it is sent
to a worker (:meth:`Store.claim`), points another live process holds are left to it, and at
the end the driver waits for them, taking over any whose owner died, so that it returns
with every point stored (docs/sweeps.md).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llmqueue.sweep.executors import FAILED, OK, Outcome, Task, run_point
from llmqueue.sweep.grid import Point
from llmqueue.sweep.store import BUSY, LEASE_S, RECLAIMED, STORED, Lease, Owner, Store

OnStart = Callable[[int, int], None]          # (points to run, points already stored)
OnResult = Callable[[Task, Outcome], None]
OnWait = Callable[[list[Lease]], None]        # the points other live processes are running

POLL_S = 0.5  # how often a driver that waits for other processes' points looks at the store


@dataclass
class SweepStats:
    points: int = 0         # distinct (config, seed) points asked for
    skipped: int = 0        # not run here: stored already, or stored by another process meanwhile
    ok: int = 0             # run now, stored ok
    failed: int = 0         # run now, stored failed
    stored_failed: int = 0  # skipped points whose stored run had failed
    elsewhere: int = 0      # of the skipped: stored by another process while this one ran
    reclaimed: int = 0      # points whose lease was taken over from a process that died
    running_elsewhere: list[tuple[str, int]] = field(default_factory=list)  # left to a live process (wait=False)


def tasks_of(points: Iterable[Point]) -> list[Task]:
    """One task per distinct (config hash, seed), in grid order."""
    tasks: dict[tuple[str, int], Task] = {}
    for p in points:
        data = p.data
        task = Task(p.config_hash, p.seed, data, str(p.config.base_dir))
        tasks.setdefault(task.key, task)
    return list(tasks.values())


def _stored_outcome(run: dict) -> Outcome:
    return {k: run[k] for k in ("status", "summary", "error", "wall_s", "version")}


def run_tasks(tasks: list[Task], store: Store, executor, *, retry_failed: bool = False,
              on_start: OnStart | None = None, on_result: OnResult | None = None, fn=run_point,
              wait: bool = True, on_wait: OnWait | None = None, poll_s: float = POLL_S,
              lease_s: float = LEASE_S) -> SweepStats:
    """Run what the store lacks (and, with ``retry_failed``, what failed), storing each run as
    it finishes. An interrupt (KeyboardInterrupt) stops the workers and propagates; every run
    stored before it stays, and this process's leases are released.

    Each point is claimed in the store just before it runs; one that another live process
    holds is skipped for now. With ``wait`` (the default) the driver then polls every
    ``poll_s`` seconds until those points are stored, running any whose owner died, and calls
    ``on_wait`` with the leases it waits for (whenever that set changes); without, it returns
    them in ``running_elsewhere``. ``on_result`` sees every point of the sweep that becomes
    stored, here (the outcome just stored) or by another process (its stored outcome)."""
    seen = store.states()
    todo = [t for t in tasks if t.key not in seen or (retry_failed and seen[t.key][0] == FAILED)]
    stats = SweepStats(points=len(tasks), skipped=len(tasks) - len(todo))
    todo_keys = {t.key for t in todo}
    stats.stored_failed = sum(1 for t in tasks if seen.get(t.key, ("",))[0] == FAILED and t.key not in todo_keys)
    if on_start is not None:
        on_start(len(todo), stats.skipped)
    if not todo:
        return stats
    owner = Owner.me()
    waiting: dict[tuple[str, int], Task] = {}

    def elsewhere(task: Task) -> None:
        stats.skipped += 1
        stats.elsewhere += 1
        if on_result is not None:
            run = store.get(task.config_hash, task.seed)
            on_result(task, _stored_outcome(run))

    def claim(task: Task) -> bool:
        got = store.claim(task.key, owner, seen.get(task.key), lease_s)
        if got == STORED:
            elsewhere(task)
        elif got == BUSY:
            waiting[task.key] = task
        else:
            stats.reclaimed += got == RECLAIMED
            return True
        return False

    def run(tasks: Iterable[Task]) -> None:
        with contextlib.closing(executor.run(tasks, fn)) as results:
            for task, outcome in results:
                if not store.finish(task.config_hash, task.seed, task.data, outcome, owner):
                    elsewhere(task)  # our lease had lapsed and another process stored it first
                    continue
                if outcome["status"] == OK:
                    stats.ok += 1
                else:
                    stats.failed += 1
                if on_result is not None:
                    on_result(task, outcome)

    with store.holding(owner, lease_s):
        run(t for t in todo if claim(t))  # each claimed as a worker takes it
        told: set[str] | None = None
        while waiting:
            if not wait:
                stats.running_elsewhere = list(waiting)
                break
            leases = [lease for lease in (store.lease_of(k) for k in waiting) if lease is not None]
            if on_wait is not None and told != (held := {f"{x.key}{x.owner}" for x in leases}):
                told = held
                on_wait(leases)
            time.sleep(poll_s)
            # Claimed before the executor starts (no idle workers started for points still busy).
            again = list(waiting.values())
            waiting.clear()
            batch = [t for t in again if claim(t)]
            if batch:
                run(batch)
    return stats


def sweep(points: list[Point], store: Store, executor, **kwargs) -> SweepStats:
    """``llmqueue sweep``: every grid point and seed, each stored as soon as it finishes."""
    return run_tasks(tasks_of(points), store, executor, **kwargs)
