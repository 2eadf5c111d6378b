"""Shared pieces of the command line: config loading, progress line, tables, writers."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmqueue.config import (
    Config,
    load_config,
    parse_config,
    parse_override,
    set_dotted,
    trace_shortfall,
)
from llmqueue import files
from llmqueue.errors import ConfigError, LlmqueueError
from llmqueue.metrics import timeseries
from llmqueue.scenarios import SCENARIOS, scenario_data


def config_from(source: str | None, overrides: Sequence[str]) -> Config:
    """A TOML path, or a built-in scenario name when no such file exists."""
    if source is not None and not Path(source).exists() and source in SCENARIOS:
        data = scenario_data(source)
        for item in overrides:
            set_dotted(data, *parse_override(item))
        return parse_config(data)
    return load_config(source, list(overrides))


class Progress:
    """A one-line progress display on stderr (only when stderr is a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.last = -1

    def __call__(self, name: str, fraction: float) -> None:
        pct = int(fraction * 100)
        if self.enabled and pct != self.last:
            self.last = pct
            sys.stderr.write(f"\r  simulating {name:<18} {pct:3d}%")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.last >= 0:
            sys.stderr.write("\r" + " " * 40 + "\r")
            sys.stderr.flush()
        self.last = -1


class Bar:
    """``[#######-------]  120/480  25%  2 failed  elapsed 0:12  ETA 0:36`` on a terminal's stderr."""

    def __init__(self, enabled: bool, width: int = 28) -> None:
        self.enabled, self.width = enabled, width
        self.total = self.done = self.failed = 0
        self.start = time.monotonic()
        self.last_draw = 0.0

    def begin(self, todo: int, skipped: int) -> None:
        self.total += todo
        if self.enabled and skipped:
            sys.stderr.write(f"  {skipped} point{'s' if skipped != 1 else ''} already stored: skipped\n")
        self.draw(force=True)

    def step(self, task, outcome) -> None:
        self.done += 1
        self.failed += outcome["status"] != "ok"
        self.draw(force=self.done == self.total)

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or not self.total or (not force and now - self.last_draw < 0.2):
            return
        self.last_draw = now
        frac = self.done / self.total
        elapsed = now - self.start
        eta = clock(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        filled = int(frac * self.width)
        failed = f"  {self.failed} failed" if self.failed else ""
        sys.stderr.write(f"\r  [{'#' * filled}{'-' * (self.width - filled)}] {self.done}/{self.total} "
                         f"{frac:4.0%}{failed}  elapsed {clock(elapsed)}  ETA {eta}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.total:
            self.draw(force=True)  # the last state, e.g. where Ctrl-C stopped it
            sys.stderr.write("\n")
            sys.stderr.flush()


def clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (``kill PID``) as a KeyboardInterrupt that knows its signal: every
    command stops the same way, says what it kept and exits 128 + the signal (130, 143)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def signal_of(exc: BaseException) -> int:
    """The signal behind an interrupt: a plain KeyboardInterrupt is Ctrl-C's SIGINT."""
    return getattr(exc, "signum", signal.SIGINT)


def interrupted(exc: BaseException, kept: str) -> int:
    """Print the one line of an interrupted command (``kept``: what it kept) and return its exit
    status: 130 for SIGINT, 143 for SIGTERM."""
    signum = signal_of(exc)
    print(f"llmqueue: interrupted by {signal.Signals(signum).name}: {kept}", file=sys.stderr)
    return 128 + signum


@contextlib.contextmanager
def signals_as_interrupts():
    """While the block runs, SIGINT and SIGTERM raise :class:`Interrupted` (workers stopped, finished
    runs kept), unless the signal is ignored (e.g. SIGINT of a background job) or already handled by
    someone else (a nested block, an embedding program). Only the main thread can install handlers."""
    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) is default:
                previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


sigterm_as_interrupt = signals_as_interrupts   # the former name: ``kill PID`` stops a run like Ctrl-C


# ---- output files ----------------------------------------------------------------------

#: Every file the running command has written (complete: each is renamed into place when whole),
#: in order; an interrupted command names them (``llmqueue: interrupted by SIGINT: kept ...``).
WRITTEN: list[Path] = []


def kept_files(prefix: str = "kept ") -> str:
    """``kept a, b`` of the files written so far, or ``nothing written``."""
    return prefix + ", ".join(map(str, dict.fromkeys(WRITTEN))) if WRITTEN else "nothing written"


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """:func:`llmqueue.files.atomic_path`, and the file recorded as kept once it is whole."""
    with files.atomic_path(path) as tmp:
        yield tmp
    WRITTEN.append(Path(path))


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def saved(path: Path) -> Path:
    """Record a file written elsewhere (a plot, already renamed into place) as kept."""
    WRITTEN.append(Path(path))
    return Path(path)


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def plot_path(arg: str | None, flag: str, name: str, default: str | None = None) -> Path:
    """Where a plot goes: ``arg`` (a file ending in .png, .pdf or .svg; an existing folder or one
    ending in ``/`` gets ``name``), else ``default``."""
    if arg is None:
        return Path(default or name)
    path = Path(arg)
    if arg.endswith(("/", os.sep)) or path.is_dir():
        return path / name
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise ConfigError(flag, arg, f"a file ending in {', '.join(PLOT_SUFFIXES)}, or a folder (then "
                                     f"FOLDER/{name})")
    return path


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(summaries: Sequence[dict]) -> str:
    """One row per run, with the requests rejected (count and share of arrivals); with KV memory also
    preemptions, mean cache use and the share of work recomputed (with prefix caching the hit rate
    of vLLM's counters)."""
    head = ["scheduler", "verdict", "theory", "req/s", "tok/s", "slope tok/s", "in-sys mean",
            "in-sys final", "TTFT p50 (s)", "TTFT p99 (s)", "E2E p50 (s)", "E2E p99 (s)", "violations"]
    kv = any("kv" in s for s in summaries)
    prefix = any("prefix_caching" in s.get("kv", {}) for s in summaries)
    head += ["preempt", "KV use", "recomp"] if kv else []
    head += ["prefix hit"] if prefix else []
    head += ["rejected"]
    rows = [tuple(head)]
    for s in summaries:
        theory = s["predicted"] if s["predicted"] in ("stable", "unstable") else "-"
        row = [s["scheduler"], s["verdict"], theory, fmt(s["throughput_rps"]), fmt(s["token_throughput"], 0),
               fmt(s["backlog_slope_tokens_per_s"], 1), fmt(s["mean_in_system"], 1),
               str(s["final_in_system"]), fmt(s["ttft_s"]["p50"], 3), fmt(s["ttft_s"]["p99"], 3),
               fmt(s["e2e_s"]["p50"], 2), fmt(s["e2e_s"]["p99"], 2), str(s["work_conserving_violations"])]
        if kv:
            k = s.get("kv")
            row += ([str(k["preemptions"]), f"{k['mean_utilisation']:.0%}", f"{k['recompute_share']:.1%}"]
                    if k else ["-", "-", "-"])
        if prefix:
            p = s.get("kv", {}).get("prefix_caching")
            row.append(f"{p['hit_rate']:.0%}" if p else "-")
        row.append(rejected_cell(s["rejected"], s["arrived"]))
        rows.append(tuple(row))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def analysis_line(run) -> str:
    a = run.analysis
    line = (f"capacity {a.capacity_tokens_per_s:.1f} tokens/s (b_max={a.token_budget}, t_b={a.batch_time_s * 1e3:.2f} ms); "
            f"offered {a.offered_tokens_per_s:.1f} tokens/s at λ={a.arrival_rate:.3f} req/s; ρ={a.rho:.3f}; "
            f"λ*={a.max_stable_rate_rps:.3f} req/s")
    return line + _memory_note(run.summary) + _region_note(run.summary)


def _memory_note(summary: dict) -> str:
    """With KV memory: the memory bound next to Theorem 2's, and what the prediction rests on."""
    p = summary.get("prefix")
    if p is not None:
        return (f"\nprefix caching: E[h] = {p['mean_hit']:.1f} tokens per request found cached at best, "
                f"λ* = {p['max_stable_rate_prefix_rps']:.3f} req/s with them; {p['reason']}")
    m = summary.get("memory")
    if m is None:
        return ""
    k = summary.get("kv", {})
    cache = f"{k['kv_blocks']} blocks x {k['block_size']} tokens, {k['kv_policy']}; " if k else ""
    return (f"\nKV cache: {cache}memory bound λ_mem={m['necessary_rps']:.3f} req/s (necessary); binding: "
            f"{'memory' if m['binding'] == 'memory' else 'token budget'}; {m['reason']}")


def memory_rows(m) -> list[tuple[str, str]]:
    """``capacity``'s rows for the memory bounds: the cache, both necessary bounds, the sufficient one, which binds."""
    suff = (f"{m.memory_sufficient_blocks_rps:.4f} requests/s (tokens: {m.memory_sufficient_rps:.4f}; "
            f"δ = {m.delta_blocks:.4g})" if m.memory_sufficient_blocks_rps is not None else m.sufficient_reason)
    rows = [("KV cache", f"{m.kv_blocks} blocks x {m.block_size} tokens ({m.memory_tokens} usable tokens), "
                         f"{m.kv_policy}"),
            ("memory per request E[w]", f"{m.work_tokens:.1f} token-iterations ({m.work_blocks:.1f} block-iterations)"),
            ("memory-bound batch load", f"{m.memory_load_cap_blocks_tokens:.1f} tokens (tokens: "
                                        f"{m.memory_load_cap_tokens:.1f}) = M·E[l+o]/E[w]"),
            ("memory bound λ_mem (necessary)", f"{m.memory_necessary_blocks_rps:.4f} requests/s in blocks "
                                               f"(tokens: {m.memory_necessary_rps:.4f})"),
            ("memory bound (sufficient, fluid)", suff + ("; memory never wasted: preempt-and-recompute admission "
                                                          "can thrash below it" if m.memory_sufficient_blocks_rps
                                                          is not None else ""))]
    if m.memory_rho is not None:
        rows.append(("cache in use at λ", f"{m.memory_rho:.4f} (t̄ = {m.batch_time_s * 1e3:.3f} ms, "
                                          f"b̄ = {m.batch_tokens:.1f} tokens)"))
    lower = "memory" if m.binding == "memory" else "token budget"
    rows.append(("binding bound", f"{lower}: λ ≤ {m.max_stable_rate_rps:.4f} requests/s (necessary: above it no "
                                  "scheduler is stable; below it the simulator decides)"))
    return rows


def _region_note(summary: dict) -> str:
    """Under a request cap the 2-D region, not Theorem 2's line, decides (§6)."""
    r = summary.get("region")
    if r is None:
        return ""
    return (f"\nrequest cap: Theorem 2's line is only an upper bound; the 2-D region (§6) gives "
            f"ρ={r['rho']:.3f} ({r['status']}), λ* along the workload's ray {r['max_stable_rate_rps']:.3f} req/s")


def write_json(path: Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def write_requests_csv(path: Path, result) -> None:
    """requests.csv of a run (:func:`llmqueue.tables.request_columns`; NaN as an empty cell)."""
    from llmqueue.tables import request_columns, write_table

    saved(write_table(request_columns(result), path, "csv"))


def rejected_cell(rejected: int, arrived: int) -> str:
    """A table's rejected column: the count and its share of the arrivals."""
    if not rejected:
        return "0"
    share = rejected / max(arrived, 1)
    return f"{rejected} ({share:.1%})" if share < 0.1 else f"{rejected} ({share:.0%})"


def rejection_warnings(summaries: Sequence[dict]) -> list[str]:
    """One line per run that rejected anything (rejected requests are counted, never run), with
    the causes and the options that fix them."""
    return [f"warning: {s['scheduler']}: {s['rejected']} of {s['arrived']} requests rejected "
            f"({s['rejected'] / max(s['arrived'], 1):.1%}): " + "; ".join(s.get("rejected_causes") or ["never servable"])
            for s in summaries if s.get("rejected")]


def write_columns_csv(path: Path, columns: dict) -> None:
    names = list(columns)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        w.writerows(zip(*(c.tolist() if isinstance(c, np.ndarray) else c for c in columns.values())))


def timeseries_columns(runs) -> dict:
    """time_s plus, per run, in_system and backlog_tokens columns (prefixed when several)."""
    columns = {}
    for run in runs:
        series = timeseries(run.result)
        columns.setdefault("time_s", series.pop("time_s"))
        prefix = f"{run.result.scheduler}_" if len(runs) > 1 else ""
        columns.update({prefix + k: v for k, v in series.items()})
    return columns




def scheduler_names(arg: str | None, default: list[str]) -> list[str]:
    """A ``--schedulers a,b`` list (``default`` when not given), each a registered name or a
    policy file ``path/to/policy.py:Class`` (relative to the working folder; returned absolute)."""
    from llmqueue.schedulers import SCHEDULERS, allowed, custom, scheduler_class

    names = [n.strip() for n in arg.split(",") if n.strip()] if arg is not None else list(default)
    if not names:
        raise ConfigError("--schedulers", arg, f"a comma-separated list of at least one scheduler: {allowed()}")
    out = []
    for n in names:
        if n not in SCHEDULERS and not custom.is_reference(n):
            raise LlmqueueError(f"--schedulers: {n!r} is not a scheduler; allowed: {allowed()}")
        scheduler_class(n, field="--schedulers")   # a policy file: loaded and checked now
        out.append(n if n in SCHEDULERS else custom.resolve(n, field="--schedulers"))
    return out


def add_overrides(sp) -> None:
    """The repeatable ``--set KEY=VALUE`` option of every config-taking command."""
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set engine.token_budget=1024 (repeatable)")
