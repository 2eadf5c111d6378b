"""``llmqueue serve-bench``: the server measured by a real load client, next to the simulator's
prediction for the same arrivals (docs/serving.md, "Measured against the simulator").

1. Calibrate the batch-time model of the config's ``[real]`` model on this machine (the grid of
   :func:`llmqueue.real.calibrate.calibrate_config`, wall-clock timer, before the server starts).
2. Start ``llmqueue serve`` in a child process on a free port with a batch log, send it a
   calibration ramp (Poisson loads from light to about its capacity), and fit the batch-time
   model to the batches it ran: the served-batch fit, whose λ* (paper arXiv 2504.07347, §5,
   Theorem 2) sets the measured rates.
3. At each rate, a fresh server: the calibration ramp again (fitted alone: the machine as it is
   just before the measurement), then the config workload's Poisson arrivals (prompt of ``v_p``
   token ids, ``max_tokens = v_d + 1``, ``ignore_eos``) with the ``openai`` client's asyncio API,
   streamed, every token timed as the client receives it.
4. Simulate the same arrivals with each fit (and the grid's, and the run's own batches') and the
   same scheduler.
5. Compare median TTFT, median time between tokens per request (TPOT, what the simulator's
   ``tbt_s`` is), throughput, and at the rate above λ* the completions per second against λ*;
   give each rate's stability verdict (Theorem 2 with each fit's λ*, the simulator over 300 s);
   write bench.json, bench.md and bench.png.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmqueue.errors import LlmqueueError

#: the calibration load's rates, as fractions of the grid calibration's λ*: a ramp from light load
#: (batches of a few requests, as below saturation) to about the server's capacity (full batches), so
#: that the fit sees every batch shape the measured rates give.  One rate near capacity gave batches
#: of one shape only: its intercept was not identified (R² 0.3-0.75, c 21-25 ms against 5-9 ms) and
#: the time between tokens at light load came out 35-51 % too long (docs/serving.md).
CALIBRATION_LOADS = (0.15, 0.3, 0.5, 0.7)
PORT_LINE = re.compile(r"listening on http://([^:/]+|\[[^\]]+\]):(\d+)/v1")


@dataclass
class Sample:
    """One request as the client saw it (seconds since the run's start)."""

    send_time: float
    num_prompt_tokens: int
    max_tokens: int
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    usage: dict | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.send_time

    @property
    def tpot(self) -> float | None:
        """Mean time between this request's tokens (vLLM's benchmark calls it TPOT)."""
        n = len(self.token_times)
        return None if n < 2 else (self.token_times[-1] - self.token_times[0]) / (n - 1)


async def drive(base_url: str, model: str, arrival_times, prompts, max_tokens, *, api_key: str = "none",
                chat: bool = False, timeout_s: float = 600.0) -> list[Sample]:
    """Send each request at its arrival time (seconds from now), streamed, with the ``openai``
    client; returns what the client measured, in the order given."""
    from openai import AsyncOpenAI, APIStatusError

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
    start = time.perf_counter()
    samples = [Sample(float(t), len(p), int(m)) for t, p, m in zip(arrival_times, prompts, max_tokens)]

    async def one(sample: Sample, prompt) -> None:
        delay = sample.send_time - (time.perf_counter() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        sample.send_time = time.perf_counter() - start
        options = dict(model=model, max_tokens=sample.max_tokens, stream=True, temperature=0.0,
                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        try:
            if chat:
                stream = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **options)
            else:
                stream = await client.completions.create(prompt=list(prompt), **options)
            async for chunk in stream:
                now = time.perf_counter() - start
                if chunk.choices:
                    if sample.first_token_time is None:
                        sample.first_token_time = now
                    sample.token_times.append(now)
                if chunk.usage is not None:
                    sample.usage = chunk.usage.model_dump()
        except APIStatusError as exc:
            sample.error = f"{exc.status_code}"
        except Exception as exc:   # connection errors: counted, the run goes on
            sample.error = type(exc).__name__

    try:
        await asyncio.gather(*(one(s, p) for s, p in zip(samples, prompts)))
    finally:
        await client.close()
    return samples


# ---- the server in a child process -------------------------------------------------------

class ServerProcess:
    """``llmqueue serve CONFIG --port 0`` in a child process; its port read from its first line."""

    def __init__(self, config: str | Path, overrides=(), extra=(), startup_s: float = 300.0) -> None:
        cmd = [sys.executable, "-m", "llmqueue", "serve", str(config), "--port", "0", *extra]
        for item in overrides:
            cmd += ["--set", item]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        deadline = time.monotonic() + startup_s
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise LlmqueueError("llmqueue serve stopped before listening: " + " | ".join(self.lines[-5:]))
            self.lines.append(line.rstrip())
            match = PORT_LINE.search(line)
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                break
            if time.monotonic() > deadline:
                self.stop()
                raise LlmqueueError(f"llmqueue serve did not listen within {startup_s:g} s")
        self.url = f"http://{self.host}:{self.port}"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise LlmqueueError("llmqueue serve did not answer /health")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self, timeout: float = 60.0) -> tuple[int, str]:
        """SIGTERM, then wait; returns (exit status, the rest of its stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rest = self.proc.communicate(timeout=timeout)[1] or ""
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest = self.proc.communicate()[1] or ""
        self.lines += rest.splitlines()
        return self.proc.returncode, rest


# ---- comparison ------------------------------------------------------------------------

def served_rate(finishes: np.ndarray) -> float:
    """Completions per second over the middle half of the completions: the arrival rate when the
    server keeps up, its capacity when a backlog builds (it then finishes requests as fast as it can)."""
    done = np.sort(finishes[np.isfinite(finishes)])
    if len(done) < 8:
        return float("nan")
    lo, hi = len(done) // 4, 3 * len(done) // 4
    return float((hi - lo) / (done[hi] - done[lo])) if done[hi] > done[lo] else float("nan")


def _median(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else float("nan")


def measured_row(samples: list[Sample]) -> dict:
    ok = [s for s in samples if s.error is None and s.token_times]
    arrivals = np.array([s.send_time for s in samples])
    finishes = np.array([s.token_times[-1] if s in ok else np.inf for s in samples])
    tokens = sum(len(s.token_times) for s in ok)
    span = max((s.token_times[-1] for s in ok), default=0.0) - arrivals.min()
    gaps = [b - a for s in ok for a, b in zip(s.token_times, s.token_times[1:])]
    kinds: dict[str, int] = {}
    for s in samples:
        if s.error is not None or not s.token_times:
            kinds[s.error or "no tokens"] = kinds.get(s.error or "no tokens", 0) + 1
    return {"completed": len(ok), "errors": len(samples) - len(ok), "error_kinds": kinds,
            "ttft_s": _median(s.ttft for s in ok),
            "tpot_s": _median(s.tpot for s in ok), "itl_s": _median(gaps),
            "throughput_rps": len(ok) / span if span > 0 else float("nan"),
            "output_tokens_per_s": tokens / span if span > 0 else float("nan"),
            "served_rps": served_rate(finishes),
            "usage_ok": all(s.usage is not None and s.usage["completion_tokens"] == len(s.token_times) for s in ok)}


def predicted_row(config, requests) -> dict:
    """The simulator on the same arrivals (drained), with the calibrated batch-time model."""
    from llmqueue.core.simulator import simulate
    from llmqueue.runner import build_engine

    result = simulate(build_engine(config), requests, drain=True)
    first, finish, arrival = result.first_token_time, result.finish_time, result.arrival_time
    out = result.num_output_tokens
    ok = ~np.isnan(finish)
    tpot = (finish[ok & (out > 0)] - first[ok & (out > 0)]) / out[ok & (out > 0)]
    span = np.nanmax(finish) - arrival.min()
    return {"ttft_s": float(np.median(first[ok] - arrival[ok])), "tpot_s": float(np.median(tpot)),
            "throughput_rps": float(ok.sum() / span), "output_tokens_per_s": float((out[ok] + 1).sum() / span),
            "served_rps": served_rate(np.where(ok, finish, np.inf))}


def _error(measured: float, predicted: float) -> float:
    return (measured - predicted) / predicted if predicted else float("nan")


def _batch_samples(batch_log: Path, rows_from: int = 0, rows_to: int | None = None):
    from llmqueue.real.fit import Samples

    import csv

    with open(batch_log, newline="") as f:
        rows = list(csv.DictReader(f))[rows_from:rows_to]
    if len(rows) < 10:
        raise LlmqueueError(f"{batch_log}: {len(rows)} batches, too few to fit a batch-time model")
    col = lambda name: np.array([float(r[name]) for r in rows])
    return Samples(col("prefill_tokens"), col("decode_tokens"), np.zeros(len(rows)), col("attention_pairs"),
                   col("busy_duration"))


def served_fit(batch_log: Path, mean_prompt_len: float, mean_output_len: float, rows_from: int = 0,
               rows_to: int | None = None):
    """prefill_decode (+ attention pairs) fitted to a server's batch log (its rows ``rows_from`` to
    ``rows_to``): each batch's busy time of the engine loop (plan, forward pass, tokens handed
    back), as it was while serving."""
    from llmqueue.real.fit import fit_prefill_decode, workload_mix

    return fit_prefill_decode(_batch_samples(batch_log, rows_from, rows_to), True,
                              *workload_mix(mean_prompt_len, mean_output_len))


def batch_time_ratio(batch_log: Path, fit, rows_from: int = 0) -> float:
    """The logged batches' total busy time over what ``fit`` gives the same batches: 1 when the
    calibration still holds, above 1 when the batches became slower (drift, contention)."""
    s = _batch_samples(batch_log, rows_from)
    bt = fit.batch_time.to_dict()
    predicted = (bt["c_ms"] + bt["prefill_ms_per_token"] * s.prefill_tokens + bt["decode_ms_per_token"] * s.decode_tokens
                 + bt.get("context_ms_per_token", 0.0) * s.attention_pairs) / 1e3
    return float(s.seconds.sum() / predicted.sum())


def _with_batch_time(config, fit):
    import copy

    from llmqueue.config import parse_config

    data = copy.deepcopy(config.data)
    data["engine"]["batch_time"] = fit.batch_time.to_dict()
    return parse_config(data, config.base_dir)


def _fit_line(fit) -> str:
    bt = fit.batch_time.to_dict()
    return (f"R² {fit.r2:.3f}, c {bt['c_ms']:.2f} ms, prefill {bt['prefill_ms_per_token']:.4f} ms/token, "
            f"decode {bt['decode_ms_per_token']:.4f} ms/token, context {bt['context_ms_per_token']:.2g} ms/pair")


#: the measured quantity a predicted one is compared with, where their names differ
_MEASURED = {"ttft_path_s": "ttft_s"}


def path_latency(config, samples, requests) -> float:
    """The time the HTTP path adds to a request's TTFT, which the engine model leaves out (the
    request's way in, the first chunk's way out, the client's own work): the median over the
    requests of a calibration load of client TTFT − simulated TTFT with ``config``'s fit."""
    from llmqueue.core.simulator import simulate
    from llmqueue.runner import build_engine

    result = simulate(build_engine(config), requests, drain=True)
    simulated = result.first_token_time - result.arrival_time
    gaps = [s.ttft - t for s, t in zip(samples, simulated) if s.ttft is not None and np.isfinite(t)]
    return float(np.median(gaps)) if gaps else 0.0


#: the simulated run behind each rate's verdict: long enough for the verdict of docs/model.md
#: ("The stability verdict") to be called near capacity, where the measured 120 requests are not
VERDICT_HORIZON_S = 300.0


def theorem2(rho: float, work_conserving: bool = True) -> str:
    """Theorem 2's answer at ρ = λ/λ* (paper §5): "stable", "unstable", "near capacity" at ρ = 1,
    "-" for a scheduler that is not work-conserving (the theorem says nothing of it); the rule
    of ``llmqueue.real.machine.predicted_verdict`` with no drift."""
    from llmqueue.real.machine import predicted_verdict

    return predicted_verdict({"rho_low": rho, "rho_high": rho}, work_conserving)


def simulated_verdict(config, rate: float, horizon_s: float = VERDICT_HORIZON_S) -> tuple[str, str]:
    """The simulator's stability verdict (and its reason) for ``config``'s batch-time fit and
    workload at Poisson ``rate`` over ``horizon_s`` seconds of arrivals."""
    import copy

    from llmqueue.config import parse_config
    from llmqueue.runner import run_config

    data = copy.deepcopy(config.data)
    data["workload"].pop("load", None)
    data["workload"]["rate"] = float(rate)
    data["run"] = {**data.get("run", {}), "horizon_s": horizon_s}
    data["run"].pop("requests", None)
    summary = run_config(parse_config(data, config.base_dir)).summary
    return summary["verdict"], summary.get("verdict_reason", "")


def _batches_so_far(metrics_text: str) -> int:
    """Batches the server ran so far (``llmqueue:batch_duration_seconds_count`` of /metrics)."""
    match = re.search(r"^llmqueue:batch_duration_seconds_count (\S+)$", metrics_text, re.MULTILINE)
    if match is None:
        raise LlmqueueError("the server's /metrics has no llmqueue:batch_duration_seconds_count")
    return int(float(match.group(1)))


def _load(server, settings, workload, rate, num_requests, seed, vocab):
    from llmqueue.model.workload import Requests, Workload, make_arrivals

    w = Workload(make_arrivals({"arrival": "poisson", "rate": rate}), workload.prompt, workload.output)
    requests = w.generate(seed, num_requests=num_requests)
    rng = np.random.default_rng([seed, 1])
    prompts = [rng.integers(3, vocab, int(p)).tolist() for p in requests.num_prompt_tokens]
    t = requests.arrival_time - requests.arrival_time[0]
    samples = asyncio.run(drive(f"{server.url}/v1", settings.model_name, t, prompts, requests.num_output_tokens + 1))
    return samples, Requests(t, requests.num_prompt_tokens, requests.num_output_tokens)


def run_bench(config_path: str, overrides, rates=None, loads=None, num_requests: int = 120, seed: int = 0,
              repeats: int = 3, out: Path = Path("."), log=print, calibration_loads=CALIBRATION_LOADS) -> dict:
    """Calibrate (grid, then the server's own batches), load at each rate, simulate the same arrivals."""
    import torch

    from llmqueue.real.calibrate import calibrate_config
    from llmqueue.real.serve import load_model, real_settings
    from llmqueue.runner import analysis_of, build_workload
    from llmqueue.schedulers import make_scheduler
    from llmqueue.serve.settings import load_serve_config

    cfg, real, settings = load_serve_config(config_path, overrides)
    rs = real_settings(real)
    torch.set_num_threads(rs.threads)
    model = load_model(rs, cfg.base_dir)
    vocab = model.config.vocab_size
    log(f"1. grid calibration of {model.config.num_params / 1e6:.1f} M params on this machine (wall clock) ...")
    grid_cfg, grid = calibrate_config(cfg, model, time.perf_counter, repeats=repeats, seed=seed)
    del model
    workload = build_workload(grid_cfg)
    grid_capacity = analysis_of(grid_cfg, workload).max_stable_rate_rps
    log(f"   {_fit_line(grid)}; λ* = {grid_capacity:.2f} req/s")
    keep = [*overrides, f"serve.max_waiting={max(num_requests, 1) * 2}"]
    # 2. the server's own batches under load: what a batch costs while the server also speaks HTTP
    batch_log = out / "calibration_batches.csv"
    ramp = [f * grid_capacity for f in calibration_loads]
    log(f"2. calibration load: {num_requests} requests at each of {', '.join(f'{r:.1f}' for r in ramp)} req/s, "
        "batches logged ...")
    server = ServerProcess(config_path, keep, extra=["--batch-log", str(batch_log)])
    lightest = None   # the calibration's lightest load, which measures the HTTP path's latency
    try:
        for j, rate in enumerate(ramp):
            got = _load(server, settings, workload, rate, num_requests, seed + 1000 + j, vocab)
            if rate == min(ramp):
                lightest = got
    finally:
        server.stop()
    served = served_fit(batch_log, workload.mean_prompt_len, workload.mean_output_len)
    served_cfg = _with_batch_time(cfg, served)
    path_before = path_latency(served_cfg, *lightest)
    capacity = analysis_of(served_cfg, workload).max_stable_rate_rps
    work_conserving = make_scheduler(cfg.engine["scheduler"], **cfg.scheduler_options).work_conserving
    log(f"   served-batch fit: {_fit_line(served)}; λ* = {capacity:.2f} req/s; the HTTP path adds "
        f"{path_before * 1e3:.1f} ms to TTFT")
    rates = list(rates) if rates else [f * capacity for f in loads]
    rows = []
    status, metrics = 0, ""
    near_requests = max(20, num_requests // 2)
    for i, rate in enumerate(rates):   # a fresh server per rate, its batches logged
        log_i = out / f"batches_{i}.csv"
        server = ServerProcess(config_path, keep, extra=["--batch-log", str(log_i)])
        try:
            _load(server, settings, workload, capacity, 4, seed + 2000, vocab)   # warm-up
            # the calibration ramp again, on this server just before its measured load: the machine
            # as it is now (other processes come and go on a shared machine)
            near_lightest = None
            for j, f in enumerate(calibration_loads):
                got = _load(server, settings, workload, f * grid_capacity, near_requests, seed + 3000 + 10 * i + j, vocab)
                if f == min(calibration_loads):
                    near_lightest = got
            first = _batches_so_far(server.metrics())
            samples, requests = _load(server, settings, workload, rate, num_requests, seed + i, vocab)
            metrics = server.metrics()
        finally:
            status = max(status, server.stop()[0])
        measured = measured_row(samples)
        mp, mo = workload.mean_prompt_len, workload.mean_output_len
        near = served_fit(log_i, mp, mo, 0, first)
        run = served_fit(log_i, mp, mo, first)
        near_cfg = _with_batch_time(cfg, near)
        path_near = path_latency(near_cfg, *near_lightest)
        ratio = {"served": batch_time_ratio(log_i, served, first), "near": batch_time_ratio(log_i, near, first),
                 "grid": batch_time_ratio(log_i, grid, first)}
        predictions = {"predicted": predicted_row(served_cfg, requests),
                       "predicted_near": predicted_row(near_cfg, requests),
                       "predicted_grid": predicted_row(grid_cfg, requests),
                       "predicted_run": predicted_row(_with_batch_time(cfg, run), requests)}
        for key, path in (("predicted", path_before), ("predicted_near", path_near)):
            predictions[key]["path_s"] = path
            predictions[key]["ttft_path_s"] = predictions[key]["ttft_s"] + path
        row = {"rate_rps": rate, "load": rate / capacity, "measured": measured, **predictions, "first_batch": first,
               "near_fit": {"r2": near.r2, **near.batch_time.to_dict()},
               "near_capacity_rps": analysis_of(_with_batch_time(cfg, near), workload).max_stable_rate_rps,
               "run_fit": {"r2": run.r2, **run.batch_time.to_dict()}, "batch_time_ratio": ratio,
               "run_capacity_rps": analysis_of(_with_batch_time(cfg, run), workload).max_stable_rate_rps,
               **{k.replace("predicted", "error"): {q: _error(measured[_MEASURED.get(q, q)], v) for q, v in p.items()
                                                     if _MEASURED.get(q, q) in measured}
                  for k, p in predictions.items()}}
        # the verdict near saturation: Theorem 2 with each fit's λ* (before the runs, just before the
        # rate, the run's own batches: the real engine's capacity under this load) and the simulator
        # over a run long enough for its verdict, with the fit before the runs
        sim_verdict, sim_reason = simulated_verdict(served_cfg, rate)
        row["verdict"] = {"theorem2": theorem2(rate / capacity, work_conserving),
                          "theorem2_near": theorem2(rate / row["near_capacity_rps"], work_conserving),
                          "theorem2_run": theorem2(rate / row["run_capacity_rps"], work_conserving),
                          "simulated": sim_verdict, "simulated_reason": sim_reason,
                          "simulated_horizon_s": VERDICT_HORIZON_S}
        rows.append(row)
        four = (measured, *(predictions[k] for k in ("predicted", "predicted_near", "predicted_run")))
        show = lambda key, scale, d: " / ".join(f"{x.get(key, x.get('ttft_s')) * scale:.{d}f}" for x in four)
        log(f"   λ = {rate:.2f} req/s ({rate / capacity:.2f} λ*), measured / simulated with the fit before the runs / "
            f"just before / the run's batches: TTFT {show('ttft_path_s', 1e3, 1)} ms (+ the HTTP path, "
            f"{path_near * 1e3:.1f} ms just before); TPOT {show('tpot_s', 1e3, 2)} ms; "
            f"throughput {show('throughput_rps', 1, 2)} req/s; the run's batches {ratio['served']:.2f} / "
            f"{ratio['near']:.2f}x those fits, {ratio['grid']:.2f}x the grid's; {measured['errors']} errors "
            f"{measured['error_kinds'] or ''}; verdict: Theorem 2 {row['verdict']['theorem2']} (ρ "
            f"{rate / capacity:.2f}), simulated {sim_verdict} ({VERDICT_HORIZON_S:.0f} s), with the run's batches' λ* "
            f"{row['run_capacity_rps']:.1f} req/s {row['verdict']['theorem2_run']}")
    over = [r for r in rows if r["load"] > 1.0]
    # the saturation rate: completions over the whole overloaded run (first arrival to last
    # completion; the server is busy throughout), and the middle-half served rate for reference
    top = max(over, key=lambda r: r["rate_rps"]) if over else None
    saturation = {"capacity_rps": capacity, "grid_capacity_rps": grid_capacity,
                  "measured_rps": top["measured"]["throughput_rps"] if top else None,
                  "simulated_rps": top["predicted"]["throughput_rps"] if top else None,
                  "measured_served_rps": top["measured"]["served_rps"] if top else None,
                  "near_capacity_rps": top["near_capacity_rps"] if top else None,
                  "run_capacity_rps": top["run_capacity_rps"] if top else None}
    if top is not None:
        saturation["error"] = _error(saturation["measured_rps"], capacity)
        saturation["error_near"] = _error(saturation["measured_rps"], saturation["near_capacity_rps"])
    return {"config": str(config_path), "scheduler": cfg.engine["scheduler"], "token_budget": cfg.engine["token_budget"],
            "requests_per_rate": num_requests, "seed": seed, "calibration_loads": list(calibration_loads),
            "engine_loop": settings.engine_loop,
            "calibration": {"grid": {"r2": grid.r2, **grid.batch_time.to_dict()},
                            "served": {"r2": served.r2, **served.batch_time.to_dict()}},
            "rows": rows, "saturation": saturation, "server_exit": status,
            "metrics_sample": [line for line in metrics.splitlines() if line.startswith(("vllm:num_preemptions_total",
                                                                                          "vllm:request_success_total"))]}


def _verdicts(row: dict) -> str:
    v = row.get("verdict")
    if v is None:   # a bench.json written before the verdicts
        return "-"
    return f"{v['theorem2']} / {v['simulated']} / {v['theorem2_run']}"


def table(report: dict) -> list[str]:
    """A Markdown table of the comparison: measured / simulated with the calibration before the runs /
    with the calibration just before the rate / with the rate's own batches (grid: in bench.json)."""
    head = ("λ (req/s)", "load", "TTFT p50 ms: meas / sim / near / run", "err sim / near / run",
            "TPOT p50 ms: meas / sim / near / run", "err sim / near / run", "throughput req/s: meas / sim / near",
            "batches ÷ fit: sim / near", "verdict: Theorem 2 / simulated / run's batches")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        m, p, n, u = (r[k] for k in ("measured", "predicted", "predicted_near", "predicted_run"))
        e, en, eu = (r[k] for k in ("error", "error_near", "error_run"))
        # TTFT: the simulators' with the HTTP path's latency measured at the calibration's lightest load
        ms = lambda key, d: " / ".join(f"{x.get(key, x.get('ttft_s')) * 1e3:.{d}f}" for x in (m, p, n, u))
        err = lambda key: " / ".join(f"{x.get(key, x.get('ttft_s')) * 100:+.0f}" for x in (e, en, eu)) + " %"
        ratio = r["batch_time_ratio"]
        lines.append(f"| {r['rate_rps']:.2f} | {r['load']:.2f} | {ms('ttft_path_s', 1)} | {err('ttft_path_s')} | "
                     f"{ms('tpot_s', 2)} | {err('tpot_s')} | {m['throughput_rps']:.2f} / {p['throughput_rps']:.2f} / "
                     f"{n['throughput_rps']:.2f} | {ratio['served']:.2f} / {ratio['near']:.2f} | {_verdicts(r)} |")
    s = report["saturation"]
    lines.append("")
    lines.append(f"Predicted capacity λ* = {s['capacity_rps']:.2f} req/s from the served-batch fit before the runs "
                 f"({s['grid_capacity_rps']:.2f} from the grid calibration).")
    if s.get("measured_rps") is not None:
        lines.append(f"At the highest rate: {s['measured_rps']:.2f} req/s completed over the run measured "
                     f"({s['error'] * 100:+.1f} % from λ*; {s['error_near'] * 100:+.1f} % from the λ* = "
                     f"{s['near_capacity_rps']:.2f} of the fit just before), {s['simulated_rps']:.2f} simulated; "
                     f"middle-half served rate {s['measured_served_rps']:.2f} req/s; λ* of the run's own batches "
                     f"{s['run_capacity_rps']:.2f} req/s.")
    return lines


def plot(report: dict, path: Path) -> Path:
    """Client-measured against simulated TTFT, time between tokens and throughput, per arrival rate
    (llmqueue.plots' look: distinct lines, labels with units, the legend off the data, λ* drawn)."""
    from matplotlib.ticker import LogLocator, ScalarFormatter

    from llmqueue.plots import legend_outside, line_style, metric_label, plt, save_figure

    rows = report["rows"]
    x = [r["rate_rps"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), dpi=120)
    series = (("measured", "measured (openai client)"), ("predicted", "simulated (served-batch fit before the runs)"),
              ("predicted_near", "simulated (served-batch fit just before)"),
              ("predicted_grid", "simulated (grid calibration)"), ("predicted_run", "simulated (the run's own batches)"))
    series = tuple((k, what) for k, what in series if all(k in r for r in rows))
    capacity = report["saturation"]["capacity_rps"]
    # the client's time between tokens of a request is the simulator's tbt_s (docs/serving.md)
    ms = lambda key: metric_label(key).replace("(s)", "(ms)")
    for ax, key, label, scale in ((axes[0], "ttft_s", ms("ttft_s.p50"), 1e3),
                                  (axes[1], "tpot_s", ms("tbt_s.p50") + ", per request", 1e3),
                                  (axes[2], "throughput_rps", metric_label("throughput_rps"), 1.0)):
        for i, (name, what) in enumerate(series):
            # TTFT: the simulated ones with the HTTP path's latency where the bench measured it
            values = [r[name].get("ttft_path_s", r[name]["ttft_s"]) if key == "ttft_s" else r[name][key] for r in rows]
            ax.plot(x, [v * scale for v in values], linewidth=1.4, label=what, **line_style(i, len(series)))
        ax.axvline(capacity, color="k", linestyle=":", linewidth=1,
                   label=f"predicted λ* = {capacity:.1f} requests/s")
        ax.set_xlabel("arrival rate λ (requests/s)")
        ax.set_ylabel(label)
        if key != "throughput_rps":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
    legend_outside(axes[-1])
    engine = report.get("engine_loop", "thread")
    fig.suptitle(f"llmqueue serve ({report['scheduler']}, b_max = {report['token_budget']}, engine in its own "
                 f"{engine}): client-measured vs simulated", fontsize=10)
    return save_figure(fig, path)


def main(args) -> int:
    from llmqueue.cli.common import write_json, write_text

    loads = rates = None
    try:
        if args.rates:
            rates = [float(x) for x in args.rates.split(",") if x.strip()]
        else:
            loads = [float(x) for x in args.loads.split(",") if x.strip()]
    except ValueError:
        raise LlmqueueError(f"--rates/--loads: {args.rates or args.loads!r} is not allowed: comma-separated numbers > 0") from None
    values = rates or loads
    if not values or min(values) <= 0 or not all(np.isfinite(values)):
        raise LlmqueueError(f"--rates/--loads: {args.rates or args.loads!r} is not allowed: comma-separated numbers > 0")
    if not 2 <= args.requests <= 100_000:
        raise LlmqueueError(f"--requests: {args.requests} is not allowed: an integer from 2 to 100000")
    if args.repeats < 1:
        raise LlmqueueError(f"--repeats: {args.repeats} is not allowed: an integer >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        ramp = tuple(float(x) for x in args.calibration_loads.split(",") if x.strip())
    except ValueError:
        ramp = ()
    if not ramp or min(ramp) <= 0 or not all(np.isfinite(ramp)):
        raise LlmqueueError(f"--calibration-loads: {args.calibration_loads!r} is not allowed: comma-separated "
                            "numbers > 0")
    report = run_bench(args.config, args.set, rates, loads, args.requests, args.seed, args.repeats, out,
                       log=lambda line: print(line, file=sys.stderr), calibration_loads=ramp)
    write_json(out / "bench.json", report)
    lines = table(report)
    write_text(out / "bench.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.no_plot:
        plot(report, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'}, bench.md" + ("" if args.no_plot else ", bench.png"))
    return 0


__all__ = ["Sample", "ServerProcess", "drive", "main", "measured_row", "predicted_row", "run_bench"]
