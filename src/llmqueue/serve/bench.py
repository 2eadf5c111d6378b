"""``llmqueue serve-bench``: the server measured by a real load client, next to the simulator's
prediction for the same arrivals (docs/serving.md, "Measured against the simulator").

1. Calibrate the batch-time model of the config's ``[real]`` model on this machine (the grid of
   :func:`llmqueue.real.calibrate.calibrate_config`, wall-clock timer, before the server starts),
   which gives the predicted capacity λ* (paper arXiv 2504.07347, §5, Theorem 2).
2. Start ``llmqueue serve`` in a child process on a free port.
3. At each rate, send the config workload's Poisson arrivals (prompt of ``v_p`` token ids,
   ``max_tokens = v_d + 1``, ``ignore_eos``) with the ``openai`` client's asyncio API, streamed,
   and time every token as the client receives it.
4. Simulate the same arrivals with the calibrated model and the same scheduler.
5. Compare median TTFT, median time between tokens per request (TPOT, what the simulator's
   ``tbt_s`` is), and throughput; near saturation the served rate (completions per second while
   arrivals last) against λ*; write bench.json, bench.md and bench.png.
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

#: the calibration load's rates, as fractions of the grid calibration's λ* (a batch inside the server
#: costs more than alone, so 0.6 of the grid's λ* is about the server's own capacity on 2 shared cores;
#: a ramp (0.2, 0.4, 0.6) predicted no better there, docs/serving.md)
CALIBRATION_LOADS = (0.6,)
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
    return {"completed": len(ok), "errors": len(samples) - len(ok), "ttft_s": _median(s.ttft for s in ok),
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


def served_fit(batch_log: Path, mean_prompt_len: float, mean_output_len: float):
    """prefill_decode (+ attention pairs) fitted to a server's batch log: each batch's busy time of
    the engine thread (plan, forward pass, tokens handed back), as it was while serving."""
    from llmqueue.real.fit import Samples, fit_prefill_decode, workload_mix

    import csv

    with open(batch_log, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) < 10:
        raise LlmqueueError(f"{batch_log}: {len(rows)} batches, too few to fit a batch-time model")
    col = lambda name: np.array([float(r[name]) for r in rows])
    samples = Samples(col("prefill_tokens"), col("decode_tokens"), np.zeros(len(rows)), col("attention_pairs"),
                      col("busy_duration"))
    return fit_prefill_decode(samples, True, *workload_mix(mean_prompt_len, mean_output_len))


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
              repeats: int = 3, out: Path = Path("."), log=print) -> dict:
    """Calibrate (grid, then the server's own batches), load at each rate, simulate the same arrivals."""
    import torch

    from llmqueue.real.calibrate import calibrate_config
    from llmqueue.real.serve import load_model, real_settings
    from llmqueue.runner import analysis_of, build_workload
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
    ramp = [f * grid_capacity for f in CALIBRATION_LOADS]
    log(f"2. calibration load: {num_requests} requests at each of {', '.join(f'{r:.1f}' for r in ramp)} req/s, "
        "batches logged ...")
    server = ServerProcess(config_path, keep, extra=["--batch-log", str(batch_log)])
    try:
        for j, rate in enumerate(ramp):
            _load(server, settings, workload, rate, num_requests, seed + 1000 + j, vocab)
    finally:
        server.stop()
    served = served_fit(batch_log, workload.mean_prompt_len, workload.mean_output_len)
    served_cfg = _with_batch_time(cfg, served)
    capacity = analysis_of(served_cfg, workload).max_stable_rate_rps
    log(f"   served-batch fit: {_fit_line(served)}; λ* = {capacity:.2f} req/s")
    rates = list(rates) if rates else [f * capacity for f in loads]
    rows = []
    status, metrics = 0, ""
    for i, rate in enumerate(rates):   # a fresh server per rate, its batches logged
        log_i = out / f"batches_{i}.csv"
        server = ServerProcess(config_path, keep, extra=["--batch-log", str(log_i)])
        try:
            _load(server, settings, workload, capacity, 4, seed + 2000, vocab)   # warm-up
            samples, requests = _load(server, settings, workload, rate, num_requests, seed + i, vocab)
            metrics = server.metrics()
        finally:
            status = max(status, server.stop()[0])
        measured = measured_row(samples)
        run = served_fit(log_i, workload.mean_prompt_len, workload.mean_output_len)
        predictions = {"predicted": predicted_row(served_cfg, requests),
                       "predicted_grid": predicted_row(grid_cfg, requests),
                       "predicted_run": predicted_row(_with_batch_time(cfg, run), requests)}
        row = {"rate_rps": rate, "load": rate / capacity, "measured": measured, **predictions,
               "run_fit": {"r2": run.r2, **run.batch_time.to_dict()},
               "run_capacity_rps": analysis_of(_with_batch_time(cfg, run), workload).max_stable_rate_rps,
               **{k.replace("predicted", "error"): {q: _error(measured[q], v) for q, v in p.items()}
                  for k, p in predictions.items()}}
        rows.append(row)
        predicted = predictions["predicted"]
        log(f"   λ = {rate:.2f} req/s ({rate / capacity:.2f} λ*): TTFT {measured['ttft_s'] * 1e3:.1f} ms measured, "
            f"{predicted['ttft_s'] * 1e3:.1f} predicted, {row['predicted_run']['ttft_s'] * 1e3:.1f} with the run's "
            f"batches; TPOT {measured['tpot_s'] * 1e3:.2f} / {predicted['tpot_s'] * 1e3:.2f} / "
            f"{row['predicted_run']['tpot_s'] * 1e3:.2f} ms; served {measured['served_rps']:.2f} / "
            f"{predicted['served_rps']:.2f} req/s; {measured['errors']} errors")
    over = [r for r in rows if r["load"] > 1.0]
    saturation = {"capacity_rps": capacity, "grid_capacity_rps": grid_capacity,
                  "measured_rps": max((r["measured"]["served_rps"] for r in over), default=None),
                  "simulated_rps": max((r["predicted"]["served_rps"] for r in over), default=None),
                  "run_capacity_rps": over[-1]["run_capacity_rps"] if over else None}
    if saturation["measured_rps"] is not None:
        saturation["error"] = _error(saturation["measured_rps"], capacity)
    return {"config": str(config_path), "scheduler": cfg.engine["scheduler"], "token_budget": cfg.engine["token_budget"],
            "requests_per_rate": num_requests, "seed": seed,
            "calibration": {"grid": {"r2": grid.r2, **grid.batch_time.to_dict()},
                            "served": {"r2": served.r2, **served.batch_time.to_dict()}},
            "rows": rows, "saturation": saturation, "server_exit": status,
            "metrics_sample": [line for line in metrics.splitlines() if line.startswith(("vllm:num_preemptions_total",
                                                                                          "vllm:request_success_total"))]}


def table(report: dict) -> list[str]:
    """A Markdown table of the comparison: measured / simulated with the served-batch fit / with the grid fit."""
    head = ("λ (req/s)", "load", "TTFT p50 ms: meas / sim / grid / run", "err sim / run",
            "TPOT p50 ms: meas / sim / grid / run", "err sim / run", "throughput req/s: meas / sim",
            "served req/s: meas / sim / run")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        m, p, g, u, e, eu = (r[k] for k in ("measured", "predicted", "predicted_grid", "predicted_run", "error",
                                             "error_run"))
        ms = lambda key, d: " / ".join(f"{x[key] * 1e3:.{d}f}" for x in (m, p, g, u))
        lines.append(f"| {r['rate_rps']:.2f} | {r['load']:.2f} | {ms('ttft_s', 1)} | {e['ttft_s'] * 100:+.0f} / "
                     f"{eu['ttft_s'] * 100:+.0f} % | {ms('tpot_s', 2)} | {e['tpot_s'] * 100:+.0f} / "
                     f"{eu['tpot_s'] * 100:+.0f} % | {m['throughput_rps']:.2f} / {p['throughput_rps']:.2f} | "
                     f"{m['served_rps']:.2f} / {p['served_rps']:.2f} / {u['served_rps']:.2f} |")
    s = report["saturation"]
    lines.append("")
    lines.append(f"Predicted capacity λ* = {s['capacity_rps']:.2f} req/s from the served-batch fit "
                 f"({s['grid_capacity_rps']:.2f} from the grid calibration).")
    if s.get("measured_rps") is not None:
        lines.append(f"Above λ*: served {s['measured_rps']:.2f} req/s measured, {s['simulated_rps']:.2f} simulated "
                     f"({s['error'] * 100:+.1f} % from λ*); λ* of the overloaded run's own batches: "
                     f"{s['run_capacity_rps']:.2f} req/s.")
    return lines


def plot(report: dict, path: Path) -> Path:
    """Client-measured against simulated TTFT, time between tokens and throughput, per arrival rate
    (llmqueue.plots' look: distinct lines, units, the legend off the data, λ* drawn)."""
    from llmqueue.plots import legend_outside, line_style, plt, save_figure

    rows = report["rows"]
    x = [r["rate_rps"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), dpi=110)
    series = (("measured", "measured (openai client)"), ("predicted", "simulated (served-batch fit)"),
              ("predicted_grid", "simulated (grid calibration)"), ("predicted_run", "simulated (the run's own batches)"))
    for ax, key, label, scale in ((axes[0], "ttft_s", "median time to first token (ms)", 1e3),
                                  (axes[1], "tpot_s", "median time between tokens (ms)", 1e3),
                                  (axes[2], "throughput_rps", "throughput (requests/s)", 1.0)):
        for i, (name, what) in enumerate(series):
            ax.plot(x, [r[name][key] * scale for r in rows], label=what, **line_style(i, len(series)))
        ax.axvline(report["saturation"]["capacity_rps"], color="grey", lw=0.8, ls=":",
                   label=f"predicted λ* = {report['saturation']['capacity_rps']:.1f} requests/s")
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel(label)
        if key == "ttft_s":
            ax.set_yscale("log")
    legend_outside(axes[-1])
    fig.suptitle(f"llmqueue serve ({report['scheduler']}, b_max = {report['token_budget']}): client-measured vs "
                 "simulated", fontsize=10)
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
    report = run_bench(args.config, args.set, rates, loads, args.requests, args.seed, args.repeats, out,
                       log=lambda line: print(line, file=sys.stderr))
    write_json(out / "bench.json", report)
    lines = table(report)
    write_text(out / "bench.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.no_plot:
        plot(report, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'}, bench.md" + ("" if args.no_plot else ", bench.png"))
    return 0


__all__ = ["Sample", "ServerProcess", "drive", "main", "measured_row", "predicted_row", "run_bench"]
