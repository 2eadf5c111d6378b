"""``llmqueue reproduce``: every result of the paper, run and judged, in one report (docs/reproduce.md).

    from llmqueue.reproduce import reproduce
    outcome = reproduce("llmqueue_output/reproduce", mode="quick", jobs=2)
    print(outcome["verdicts"])          # section -> reproduced | differs | beyond the paper | not run

Every run goes through the sweep machinery (local worker processes, ``--jobs``) into a SQLite
store beside the report (``runs.db``), each as soon as it finishes: an interrupted reproduction
keeps its finished runs and the next one resumes.  The sections (:mod:`.sections`) then turn
the stored results into tables, plots and verdicts; :mod:`.report` writes ``report.html``
(self-contained) and ``results.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmqueue import __version__
from llmqueue.config import parse_config
from llmqueue.errors import LlmqueueError
from llmqueue.reproduce.jobs import job_task, run_job
from llmqueue.reproduce.report import write_report
from llmqueue.reproduce.sections import NOT_RUN, SCALES, SECTIONS, Result
from llmqueue.sweep.driver import run_tasks
from llmqueue.sweep.executors import OK, LocalExecutor
from llmqueue.sweep.maxrate import max_rate
from llmqueue.sweep.store import Store

MODES = tuple(SCALES)
STORE_NAME = "runs.db"


def reproduce(out: str | Path, *, mode: str = "full", jobs: int | None = None, fresh: bool = False,
              on_start: Callable[[int, int], None] | None = None, on_result: Callable | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every section at ``mode`` scale, write the report into ``out``; return the results dict.

    ``on_start(todo, stored)`` and ``on_result(task, outcome)`` follow the sweep driver (a
    progress bar); ``fresh`` discards the runs stored by an earlier reproduction in ``out``.
    """
    if mode not in SCALES:
        raise LlmqueueError(f"mode = {mode!r} is not allowed: one of {', '.join(SCALES)}")
    scale = SCALES[mode]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LlmqueueError(f"--out {out}: exists and is not a folder")
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    store_path = out / STORE_NAME
    if fresh:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store_path}{suffix}").unlink(missing_ok=True)
    say = log or (lambda _msg: None)
    executor = LocalExecutor(jobs)
    started = time.monotonic()

    planned: dict[str, list[tuple[str, int, Any]]] = {}
    for section in SECTIONS:
        planned[section.key] = [(name, seed, job_task(job, seed)) for name, job, seed in section.jobs(scale)]
    tasks = list({t.key: t for runs in planned.values() for _, _, t in runs}.values())

    with Store(store_path) as store:
        say(f"{len(tasks)} runs in {len(SECTIONS)} sections ({mode}), on {executor.describe()}")
        run_tasks(tasks, store, executor, retry_failed=True, on_start=on_start, on_result=on_result, fn=run_job)
        searched: dict[str, dict[str, Any]] = {}
        search_seconds: dict[str, float] = {}
        for section in SECTIONS:
            specs = section.searches(scale)
            if not specs:
                continue
            say(f"{section.title}: largest stable rate by bisection for {len(specs)} configs")
            t0 = time.monotonic()
            bases = [((("engine.scheduler", name),), parse_config(data)) for name, data in specs]
            found = max_rate(bases, list(range(scale.maxrate_seeds)), store, executor, rel_tol=scale.maxrate_rel_tol,
                             on_start=on_start, on_result=on_result)
            searched[section.key] = {name: r for (name, _), r in zip(specs, found)}
            search_seconds[section.key] = time.monotonic() - t0

        say("assembling the sections: tables, plots, verdicts")
        results: list[Result] = []
        costs = []
        for section in SECTIONS:
            runs = {(name, seed): store.get(task.config_hash, task.seed) for name, seed, task in planned[section.key]}
            failed = [f"{name} (seed {seed}): {r['error'] if r else 'not run'}" for (name, seed), r in runs.items()
                      if r is None or r["status"] != OK]

            def got(name: str, seed: int, runs=runs) -> dict | None:
                r = runs.get((name, seed))
                return r["summary"] if r is not None and r["status"] == OK else None

            t0 = time.monotonic()
            try:
                res = section.assemble(scale, got, searched.get(section.key, {}), plots)
            except Exception as exc:  # noqa: BLE001 -- one broken section must not lose the others
                res = section.result(config="", verdict=NOT_RUN,
                                     verdict_text=f"this section could not be assembled: {type(exc).__name__}: {exc}")
            if failed:
                res.notes.append(f"{len(failed)} run(s) failed: " + "; ".join(failed[:5]))
                if res.verdict != NOT_RUN:
                    res.verdict_text += f" ({len(failed)} run(s) failed; see the notes.)"
            results.append(res)
            costs.append({"section": section.key, "runs": len(runs),
                          "cpu_s": sum(r["wall_s"] or 0.0 for r in runs.values() if r is not None),
                          "search_wall_s": search_seconds.get(section.key), "assemble_s": time.monotonic() - t0})
    meta = {"version": __version__, "mode": mode, "jobs": executor.jobs, "wall_s": time.monotonic() - started,
            "store": str(store_path)}
    return write_report(out, results, meta, costs)


__all__ = ["MODES", "reproduce"]
