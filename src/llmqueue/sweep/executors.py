"""Where the runs of a sweep execute: local worker processes, or a Ray cluster.

Both executors take :class:`Task` objects and yield ``(task, outcome)`` pairs as runs
finish (in completion order). A task that raises comes back as a ``failed`` outcome with
its error; a worker process that dies (a crash, the OOM killer, ``kill -9``) is recorded
as a failed point too, and the rest of the sweep goes on. The caller writes outcomes to
the store; the executors never touch it, so only the driver process writes the database.
Tasks are taken from the iterable only when they can start (a worker is free, or Ray has
room in flight): the driver's iterable claims each point in the store as it is taken, so
a point is leased when it starts, not when the sweep does.

The local pool is a few lines over :mod:`multiprocessing` rather than
:class:`concurrent.futures.ProcessPoolExecutor` because the latter cannot say *which* task
a dead worker was running (it breaks the whole pool), and cannot stop running work on
Ctrl-C. Distributed runs use Ray (the optional extra ``ray``), not a home-made scheduler.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from llmqueue import __version__
from llmqueue.config import parse_config
from llmqueue.errors import LlmqueueError

OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class Task:
    """One run: the resolved config (seed included), its hash and seed, its folder."""

    config_hash: str
    seed: int
    data: dict[str, Any] = field(hash=False, compare=False)
    base_dir: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return self.config_hash, self.seed


Outcome = dict[str, Any]  # status, summary, error, wall_s, version
TaskFn = Callable[[Task], Outcome]


def failed(error: str, wall_s: float = 0.0) -> Outcome:
    return {"status": FAILED, "summary": None, "error": error, "wall_s": wall_s, "version": __version__}


def call(fn: TaskFn, task: Task) -> Outcome:
    """``fn(task)`` in a worker; an exception becomes a failed outcome naming it."""
    start = time.perf_counter()
    try:
        return fn(task)
    except Exception as exc:  # noqa: BLE001 -- any error is recorded as a failed point; the sweep goes on
        message = str(exc) if isinstance(exc, LlmqueueError) else f"{type(exc).__name__}: {exc}"
        return failed(message, time.perf_counter() - start)


def run_point(task: Task) -> Outcome:
    """Run one task (in a worker): the summary without its wall time."""
    from llmqueue.runner import run_config  # the worker's import, not the driver's

    start = time.perf_counter()
    run = run_config(parse_config(task.data, Path(task.base_dir) if task.base_dir else None))
    summary = dict(run.summary)
    summary.pop("wall_s", None)  # machine-dependent: kept in the store's wall_s column instead
    return {"status": OK, "summary": summary, "error": None, "wall_s": time.perf_counter() - start,
            "version": __version__}


# ---- local processes -------------------------------------------------------------------

def _worker_main(conn, fn: TaskFn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the driver is gone (e.g. kill -9): stop
            return
        if task is None:
            return
        conn.send(call(fn, task))


class _Worker:
    def __init__(self, ctx, fn: TaskFn) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, fn), daemon=True)
        self.process.start()
        child.close()
        self.task: Task | None = None

    def stop(self, force: bool) -> None:
        if not force:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self.conn.close()


class LocalExecutor:
    """``jobs`` worker processes on this machine (default: one per core)."""

    def __init__(self, jobs: int | None = None) -> None:
        if jobs is None:
            jobs = os.cpu_count() or 1
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise LlmqueueError(f"--jobs = {jobs!r} is not allowed: an integer >= 1")
        self.jobs = jobs
        # forkserver (spawn where there is none): workers never inherit the driver's open
        # database or threads (Ray's, say).
        if "forkserver" in mp.get_all_start_methods():
            self.ctx = mp.get_context("forkserver")
            # perf: the server imports the simulator once and forks ready workers; without
            # this each worker imported numpy and scipy itself (~1 s each on a busy 2-core box).
            self.ctx.set_forkserver_preload(["llmqueue.sweep.executors", "llmqueue.runner"])
        else:
            self.ctx = mp.get_context("spawn")

    def describe(self) -> str:
        return f"{self.jobs} local process{'es' if self.jobs > 1 else ''}"

    def connect(self) -> None:
        """Nothing to join: workers start with each :meth:`run`."""

    def close(self) -> None:
        """Nothing to release: each :meth:`run` stops its workers."""

    def run(self, tasks: Iterable[Task], fn: TaskFn = run_point) -> Iterator[tuple[Task, Outcome]]:
        source = iter(tasks)
        more = True  # whether ``source`` may have tasks left
        idle: list[_Worker] = []
        busy: list[_Worker] = []
        try:
            while more or busy:
                while more and (idle or len(busy) < self.jobs):
                    task = next(source, None)  # taken only now that it can start
                    if task is None:
                        more = False
                        break
                    worker = idle.pop() if idle else _Worker(self.ctx, fn)  # started when first needed
                    worker.task = task
                    busy.append(worker)
                    try:
                        worker.conn.send(task)
                    except OSError:
                        pass  # a dead worker: noticed below through its sentinel
                if not busy:
                    break
                ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
                for worker in [w for w in busy if w.conn in ready or w.process.sentinel in ready]:
                    task, outcome = worker.task, self._collect(worker)
                    busy.remove(worker)
                    worker.task = None
                    if outcome is None:
                        outcome = failed(f"worker process died (exit code {worker.process.exitcode}) "
                                         "while running this point")
                        worker.stop(force=True)  # a fresh one starts when the next task needs it
                    else:
                        idle.append(worker)
                    yield task, outcome
        finally:  # normal end, Ctrl-C, or the consumer stopped: no worker outlives the sweep
            for worker in idle:
                worker.stop(force=False)
            for worker in busy:
                worker.stop(force=True)

    @staticmethod
    def _collect(worker: _Worker) -> Outcome | None:
        try:
            if worker.conn.poll():
                return worker.conn.recv()
        except (EOFError, OSError):
            pass
        worker.process.join(timeout=5)
        return None


# ---- Ray -------------------------------------------------------------------------------

def import_ray():
    try:
        import ray
    except ImportError:
        raise LlmqueueError("--ray needs Ray, the optional extra: pip install 'llmqueue[ray]'") from None
    return ray


class RayExecutor:
    """Runs on a Ray cluster: ``auto`` (the cluster running on this machine, as Ray reads it),
    ``local`` (start a private instance with ``num_cpus`` CPUs), or an address
    (``HOST:PORT`` of the head node, or ``ray://HOST:10001``). If Ray is already initialised in
    this process (e.g. by a test), that connection is used as is. The connection lasts until
    :meth:`close`, so the rounds of a ``max-rate`` search share it.
    """

    def __init__(self, address: str, num_cpus: int | None = None) -> None:
        if not address:
            raise LlmqueueError("--ray = '' is not allowed: auto, local, or a cluster address HOST:PORT")
        self.address = address
        self.num_cpus = num_cpus
        self.started = False  # whether this executor initialised Ray (and so shuts it down)

    def describe(self) -> str:
        return f"Ray ({self.address})"

    def connect(self) -> None:
        """Join (or start) the cluster now: an unreachable address fails before any work."""
        ray = import_ray()
        if not ray.is_initialized():
            try:
                if self.address == "local":
                    ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=self.address, log_to_driver=False)
            except Exception as exc:  # noqa: BLE001 -- Ray raises ConnectionError, ValueError, RuntimeError...
                raise LlmqueueError(f"--ray {self.address}: cannot start or reach a Ray cluster "
                                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
            self.started = True

    def close(self) -> None:
        if self.started:
            import_ray().shutdown()
            self.started = False

    def run(self, tasks: Iterable[Task], fn: TaskFn = run_point) -> Iterator[tuple[Task, Outcome]]:
        ray = import_ray()
        self.connect()
        remote = ray.remote(num_cpus=1, max_retries=1)(call)
        source = iter(tasks)
        more = True
        inflight: dict[Any, Task] = {}
        try:
            # A bounded number in flight: an interrupted sweep has little to cancel.
            limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
            while more or inflight:
                while more and len(inflight) < limit:
                    task = next(source, None)  # taken only now that it can start
                    if task is None:
                        more = False
                        break
                    inflight[remote.remote(fn, task)] = task
                if not inflight:
                    break
                done, _ = ray.wait(list(inflight), num_returns=1)
                for ref in done:
                    task = inflight.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # the worker died, or the task could not run
                        outcome = failed(f"Ray: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    yield task, outcome
        finally:
            for ref in inflight:
                with contextlib.suppress(Exception):  # already finished, or the cluster is gone
                    ray.cancel(ref, force=True)


def make_executor(jobs: int | None = None, ray: str | None = None):
    """Local processes, or Ray when ``ray`` names a cluster (``local`` uses ``jobs`` CPUs)."""
    if ray is not None:
        return RayExecutor(ray, num_cpus=jobs)
    return LocalExecutor(jobs)
