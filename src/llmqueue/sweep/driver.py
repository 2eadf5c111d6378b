"""Run a set of points through an executor into the store, skipping what is stored."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from llmqueue.sweep.executors import FAILED, OK, Outcome, Task, run_point
from llmqueue.sweep.grid import Point
from llmqueue.sweep.store import Store

OnStart = Callable[[int, int], None]          # (points to run, points already stored)
OnResult = Callable[[Task, Outcome], None]


@dataclass
class SweepStats:
    points: int = 0         # distinct (config, seed) points asked for
    skipped: int = 0        # already in the store
    ok: int = 0             # run now, stored ok
    failed: int = 0         # run now, stored failed
    stored_failed: int = 0  # skipped points whose stored run had failed


def tasks_of(points: Iterable[Point]) -> list[Task]:
    """One task per distinct (config hash, seed), in grid order."""
    tasks: dict[tuple[str, int], Task] = {}
    for p in points:
        data = p.data
        task = Task(p.config_hash, p.seed, data, str(p.config.base_dir))
        tasks.setdefault(task.key, task)
    return list(tasks.values())


def run_tasks(tasks: list[Task], store: Store, executor, *, retry_failed: bool = False,
              on_start: OnStart | None = None, on_result: OnResult | None = None, fn=run_point) -> SweepStats:
    """Run what the store lacks (and, with ``retry_failed``, what failed), storing each run as
    it finishes. An interrupt (KeyboardInterrupt) stops the workers and propagates; every run
    stored before it stays."""
    stored = store.statuses()
    todo = [t for t in tasks if t.key not in stored or (retry_failed and stored[t.key] == FAILED)]
    stats = SweepStats(points=len(tasks), skipped=len(tasks) - len(todo))
    todo_keys = {t.key for t in todo}
    stats.stored_failed = sum(1 for t in tasks if stored.get(t.key) == FAILED and t.key not in todo_keys)
    if on_start is not None:
        on_start(len(todo), stats.skipped)
    if not todo:
        return stats
    with contextlib.closing(executor.run(todo, fn)) as results:
        for task, outcome in results:
            store.record(task.config_hash, task.seed, task.data, outcome)
            if outcome["status"] == OK:
                stats.ok += 1
            else:
                stats.failed += 1
            if on_result is not None:
                on_result(task, outcome)
    return stats


def sweep(points: list[Point], store: Store, executor, **kwargs) -> SweepStats:
    """``llmqueue sweep``: every grid point and seed, each stored as soon as it finishes."""
    return run_tasks(tasks_of(points), store, executor, **kwargs)
