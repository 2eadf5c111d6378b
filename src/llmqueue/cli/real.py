"""Real-engine commands: ``engine run``, ``engine validate``, ``calibrate`` (docs/real_engine.md).

The real engine needs PyTorch (``pip install 'llmqueue[cpu]'``); without it these commands
print that one line and exit 2.  Calibration from a samples CSV or from Vidur's GPU
profiles needs only numpy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from llmqueue.cli.common import (
    Progress,
    add_overrides,
    analysis_line,
    fmt,
    interrupted,
    kept_files,
    rejection_warnings,
    saved,
    scheduler_names,
    table,
    timeseries_columns,
    trace_shortfall,
    write_columns_csv,
    write_json,
    write_requests_csv,
    write_text,
)
from llmqueue.checks import check_input_file
from llmqueue.config import MAX_CONFIG_BYTES, dumps
from llmqueue.errors import LlmqueueError
from llmqueue.real import require_torch

DEFAULT_VIDUR_ROOT = "../shared/data/vidur_profiles"
#: seconds between progress lines when stderr is not a terminal (a log, CI)
PROGRESS_EVERY_S = 5.0
#: how each source of the batch-time model is named in the tables
SOURCE_NAMES = {"config": "the config's batch-time model", "file": "the calibration file's model",
                "machine": "this machine's cached calibration", "fresh": "a calibration measured just now"}


class _Progress(Progress):
    """The one-line display on a terminal; elsewhere (a log, CI) a plain line every few seconds."""

    def __init__(self, quiet: bool) -> None:
        tty = sys.stderr.isatty()
        super().__init__(tty and not quiet)
        self.plain = not tty
        self.began = time.monotonic()
        self.next = self.began + PROGRESS_EVERY_S

    def __call__(self, name: str, fraction: float) -> None:
        super().__call__(name, fraction)
        now = time.monotonic()
        if self.plain and now >= self.next:
            self.next = now + PROGRESS_EVERY_S
            print(f"  {name}: {fraction * 100:.0f} % after {now - self.began:.0f} s", file=sys.stderr, flush=True)


def _ints(arg: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in arg.split(",") if x.strip()]
    except ValueError:
        raise LlmqueueError(f"{flag}: {arg!r} is not allowed: comma-separated integers >= 0") from None
    if not values or min(values) < 0:
        raise LlmqueueError(f"{flag}: {arg!r} is not allowed: comma-separated integers >= 0")
    return values


def _real_line(summary: dict) -> str:
    r, m = summary["real"], summary["real"]["model"]
    source = r["hf_path"] or f"random weights, seed {m['seed']}"
    pool = r.get("kv_pool", {})
    if pool.get("kind") == "paged":
        kv = (f"paged KV pool {pool['kv_blocks']} blocks of {pool['block_size']} tokens ({pool['usable_tokens']} "
              f"usable, {pool['kv_policy']})")
    else:
        kv = f"KV pool {r['kv_capacity_tokens']} tokens"
    return (f"real engine: {m['num_params'] / 1e6:.1f} M params (hidden {m['hidden_size']}, {m['num_layers']} layers, "
            f"{m['num_heads']}/{m['num_kv_heads']} heads, {m['dtype']}, {source}); torch threads {r['torch_threads']}; "
            f"clock {r['clock']} (timer {r['timer']}); {kv} ({r['kv_pool_bytes'] / 2**20:.0f} MiB)")


#: (label, key of a summary's "kv" block, digits) of the KV quantities compared
KV_QUANTITIES = (("preemptions", "preemptions", 0), ("preempted requests", "preempted_requests", 0),
                 ("recomputed tokens", "recomputed_tokens", 0), ("blocks in use, peak", "peak_blocks", 0),
                 ("blocks in use, mean", "mean_blocks", 1), ("memory-limited batches", "memory_limited_batches", 0))


def _kv_table(rows: list[tuple[str, dict, dict[str, dict]]]) -> list[str]:
    """Lines of a table of KV quantities: per scheduler, the real run next to each simulation
    (``rows``: scheduler, the real summary, {label: simulated summary})."""
    sims = list(rows[0][2])
    head = ("scheduler", "KV quantity", "real", *(f"sim ({k})" for k in sims))
    lines = [head]
    for name, real, sim in rows:
        for label, key, digits in KV_QUANTITIES:
            lines.append((name, label, fmt(real["kv"].get(key), digits),
                          *(fmt(sim[k]["kv"].get(key), digits) for k in sims)))
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = []
    for i, x in enumerate(lines):
        out.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(x, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _kv_head(summary: dict) -> str:
    kv = summary["kv"]
    return (f"KV memory: engine.kv_blocks = {kv['kv_blocks']} ({kv['kv_blocks'] - 1} usable) of {kv['block_size']} "
            f"tokens, kv_policy {kv['kv_policy']}; the real engine's pool is paged and mirrors its memory model")


def _check_config_file(source: str) -> None:
    """A config path that is a device, a folder or too large is refused before it is read."""
    check_input_file(Path(source), "config", "TOML file", MAX_CONFIG_BYTES)


def _setup(args: argparse.Namespace, progress: Progress | None = None):
    """The config (its batch time settled: file, cached or fresh calibration, or its own table),
    the [real] settings, the schedulers to run, the real engine, the out folder and the source."""
    from llmqueue.real import read_engine_data, split_engine_config
    from llmqueue.real.machine import resolve
    from llmqueue.real.serve import RealEngine, real_settings

    _check_config_file(args.config)
    base = split_engine_config(args.config, args.set)[0]      # every table checked before the model loads
    data, real = read_engine_data(args.config, args.set)
    settings = real_settings(real)
    names = scheduler_names(args.schedulers, [base.engine["scheduler"]])
    engine = RealEngine(settings, base.base_dir)
    report = None if progress is None else (lambda done, total: progress("calibration", done / total))
    resolved = resolve(data, base.base_dir, engine, args.batch_time, args.recalibrate, report)
    if progress is not None:
        progress.done()
    for note in resolved.notes:
        print(f"llmqueue: {note}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return resolved.config, settings, names, engine, out, resolved


def _source_label(resolved) -> str:
    """The simulator column's name: where its batch-time model came from."""
    if resolved.label == "machine" and any(n.startswith("calibrating") for n in resolved.notes):
        return "fresh"
    return resolved.label


def cmd_engine_run(args: argparse.Namespace) -> int:
    require_torch()
    return _engine_run(args)


def _engine_run(args: argparse.Namespace) -> int:
    from llmqueue.real.machine import drift_line, probed_run

    progress = _Progress(args.json)
    cfg, settings, names, engine, out, resolved = _setup(args, progress)
    source = SOURCE_NAMES[_source_label(resolved)]
    write_text(out / "config.toml", dumps({**cfg.portable(), "real": settings.to_table()}))
    from llmqueue.runner import build_workload, generate

    workload = build_workload(cfg)
    requests = generate(cfg, workload)   # the same arrivals for every scheduler
    shortfall = trace_shortfall(cfg, len(requests.arrival_time))
    if shortfall:
        warnings.warn(shortfall)
    total = max(len(requests), 1)
    runs = []
    written: list[str] = []
    sim_kv: dict[str, dict] = {}   # with engine.kv_blocks: the simulator's summary on the same requests
    stop = None
    try:
        for name in names:
            run = probed_run(engine, cfg, name, requests, lambda now, n, name=name: progress(name, n / total),
                             resolved.calibration)
            progress.done()
            runs.append(run)
            if "kv" in run.summary:
                from llmqueue.runner import build_engine, execute

                sim = execute(cfg, build_engine(cfg, name), workload, requests).summary
                sim_kv[name] = sim
                run.summary["simulator_kv"] = sim["kv"]
            prefix = f"{name}_" if len(names) > 1 else ""
            write_requests_csv(out / f"{prefix}requests.csv", run.result)
            write_columns_csv(out / f"{prefix}batches.csv", run.result.batches)
            written += [f"{prefix}requests.csv", f"{prefix}batches.csv"]
            write_json(out / "summary.json", {"config": cfg.portable(), "runs": [r.summary for r in runs]})
    except KeyboardInterrupt as exc:   # Ctrl-C or SIGTERM: what finished is printed and kept
        stop = exc
        progress.done()
    if not runs:
        return interrupted(stop or KeyboardInterrupt(), f"no scheduler finished; {kept_files()}")
    if stop is not None:   # in case the signal came while it was being rewritten
        write_json(out / "summary.json", {"config": cfg.portable(), "runs": [r.summary for r in runs]})
    summaries = [r.summary for r in runs]
    write_columns_csv(out / "timeseries.csv", timeseries_columns(runs))
    if args.json:
        print(json.dumps({"runs": summaries}, default=float))
    else:
        print(_real_line(summaries[0]))
        print(analysis_line(runs[0]) + f"  (from {source})")
        clock = {"measured": "measured service time", "wall": "wall time",
                 "model": f"model time ({source})"}[summaries[0]["real"]["clock"]]
        print(f"horizon {runs[0].result.end_time:.0f} s of {clock}, seed {cfg.run.seed}, "
              f"{summaries[0]['arrived']} arrivals\n")
        print(table(summaries))
        for line in rejection_warnings(summaries):
            print(line, file=sys.stderr)
        for s in summaries:
            r = s["real"]
            measured = (f" (model clock; measured {r['measured_s'] / max(s['batches'], 1) * 1e3:.2f} ms)"
                        if r["clock"] == "model" else "")
            print(f"{s['scheduler']}: mean batch {r['mean_batch_ms']:.2f} ms{measured}, KV peak {r['kv_peak_reserved_tokens']} "
                  f"tokens reserved, at most {r['peak_waiting_for_memory']} waiting for memory, "
                  f"{r['output_tokens']} output tokens, wall {s['wall_s']:.0f} s")
        for run in runs:
            d = run.summary["real"].get("drift")
            if d is not None:
                print(drift_line(run.summary["scheduler"], d, run.summary["work_conserving_claimed"]))
        if sim_kv:
            print("\n" + _kv_head(summaries[0]))
            label = _source_label(resolved)
            print("\n".join(_kv_table([(s["scheduler"], s, {label: sim_kv[s["scheduler"]]}) for s in summaries
                                       if s["scheduler"] in sim_kv])))
            print(f"(sim ({label}): the simulator with {source} on the same requests)")
    files = [out / "summary.json", out / "timeseries.csv", out / "config.toml", *(out / f for f in written)]
    if not args.no_plot:
        from llmqueue.plots import plot_in_system

        a = runs[0].analysis
        files.insert(0, saved(plot_in_system(runs, out / "number_in_system.png",
                              f"Real engine: requests in system, λ = {a.arrival_rate:.2f} req/s "
                              f"(ρ = {a.rho:.2f} by {source}), b_max = {a.token_budget}",
                              xlabel="engine clock (s): measured service time or wall clock, as configured")))
    if not args.json:
        print(f"\nwrote {out}/: " + ", ".join(Path(f).name for f in files))
    if stop is not None:
        done = ", ".join(r.summary["scheduler"] for r in runs)
        return interrupted(stop, f"{len(runs)} of {len(names)} schedulers finished ({done}), shown in the table; "
                                 + kept_files())
    return 0


def cmd_engine_capacity(args: argparse.Namespace) -> int:
    require_torch()
    return _engine_capacity(args)


def _engine_capacity(args: argparse.Namespace) -> int:
    from llmqueue.real.capacity import real_capacity

    if args.steps < 0 or not args.horizon > 0:
        raise LlmqueueError(f"--steps/--horizon: {args.steps}, {args.horizon} are not allowed: steps >= 0, "
                            "horizon > 0 seconds")
    if not 0 < args.low < args.high:
        raise LlmqueueError(f"--low/--high: {args.low}, {args.high} are not allowed: 0 < low < high (fractions of λ*)")
    args.schedulers = args.scheduler
    cfg, settings, names, engine, out, resolved = _setup(args, _Progress(args.json))
    if settings.clock == "model":
        raise LlmqueueError("real.clock: \"model\" is not allowed here: the model clock's times are the "
                            "config's model, so its capacity is the simulator's")
    if len(names) != 1:
        raise LlmqueueError(f"--scheduler: {args.scheduler!r} is not allowed: one scheduler")

    def on_trial(t: dict) -> None:
        if not args.json:
            print(f"  load {t['load']:.3f} (λ = {t['arrival_rate_rps']:.2f} req/s): {t['side']:<8} ({t['why']}), "
                  f"served {t['throughput_rps']:.2f} req/s, {t['final_in_system']} in system at the end, "
                  f"wall {t['wall_s']:.0f} s", flush=True)

    result = real_capacity(cfg, engine, names[0], args.low, args.high, args.steps, args.horizon,
                           resolved.calibration, on_trial)
    write_json(out / "capacity.json", {"config": cfg.portable(), **result})
    if args.json:
        print(json.dumps(result, default=float))
        return 0
    lam = result["predicted_lambda_star_rps"]
    lo, hi = result["stable_up_to_rps"], result["unstable_from_rps"]
    span = (f"above {lo:.2f} req/s (stable at the highest load tried)" if hi is None else
            f"below {hi:.2f} req/s (unstable at every load tried)" if lo is None else
            f"between {lo:.2f} and {hi:.2f} req/s")
    print(f"{result['scheduler']}: real saturation rate {span}; predicted λ* {lam:.2f} req/s "
          f"({SOURCE_NAMES[_source_label(resolved)]})")
    print(f"most served in one trial: {result['most_served_rps']:.2f} req/s (a plateau of served rates across "
          "loads marks the real capacity too)")
    if result["overloaded_tokens_per_s"] is not None:
        print(f"overloaded runs served up to {result['overloaded_tokens_per_s']:.0f} tokens/s; predicted capacity "
              f"{result['predicted_capacity_tokens_per_s']:.0f} tokens/s")
    print(f"\nwrote {out / 'capacity.json'}")
    return 0


def _span(r: tuple[float, float] | None) -> str:
    return "-" if r is None else f"{fmt(r[0], 3)}–{fmt(r[1], 3)}"


def cmd_engine_validate(args: argparse.Namespace) -> int:
    require_torch()
    return _engine_validate(args)


def _engine_validate(args: argparse.Namespace) -> int:
    from llmqueue.real.machine import drift_line
    from llmqueue.real.validate import QUANTITIES, validate

    args.recalibrate = args.recalibrate or args.calibrate
    cfg, settings, names, engine, out, resolved = _setup(args, _Progress(args.json))
    label = _source_label(resolved)
    if label == "fresh":
        fit = cfg.engine["batch_time"]
        print("calibrated just before the runs: prefill_decode+context, "
              + ", ".join(f"{k} = {v:.4g}" for k, v in fit.items() if k != "model"))
    rows: list[dict] = []
    keys = ("scheduler", "real", "sim", "relative_error", "batch_time", "range", "drift")

    def on_done(row: dict) -> None:
        rows.append(row)
        write_json(out / "validation.json", {"config": cfg.portable(), "rows": [{k: r[k] for k in keys} for r in rows]})

    stop = None
    try:
        validate(cfg, engine, names, refit=not args.no_refit, on_done=on_done, label=label,
                 calibration=resolved.calibration)
    except KeyboardInterrupt as exc:   # Ctrl-C or SIGTERM: what finished is printed and kept
        if not rows:
            return interrupted(exc, f"no scheduler finished; {kept_files()}")
        stop = exc
    if args.json:
        print(json.dumps([{**{k: r[k] for k in ("scheduler", "relative_error", "range", "drift")},
                           **({"kv": {"real": r["real"]["kv"], **{f"sim_{k}": s["kv"] for k, s in r["sim"].items()}}}
                              if "kv" in r["real"] else {})} for r in rows], default=float))
        return _validate_end(stop, rows, names)
    print(_real_line(rows[0]["real"]))
    print(analysis_line(rows[0]["sim_runs"][label]) + f"  (from {SOURCE_NAMES[label]})")
    sims = list(rows[0]["sim"])
    ranged = bool(rows[0]["range"])
    head = ("scheduler", "quantity", "real", *(f"sim ({k})" for k in sims),
            *((f"range ({label}, drift)",) if ranged else ()), *(f"error ({k})" for k in sims))
    lines = [head]
    for r in rows:
        for q, get in QUANTITIES:
            errs = [r["relative_error"][k][q] for k in sims]
            span = (_span(r["range"][label][q]),) if ranged else ()
            lines.append((r["scheduler"], q, fmt(get(r["real"]), 3), *(fmt(get(r["sim"][k]), 3) for k in sims),
                          *span, *("-" if e is None else f"{e * 100:+.1f}%" for e in errs)))
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    for i, x in enumerate(lines):
        print("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(x, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"(sim ({label}): the simulator with {SOURCE_NAMES[label]}"
          + ("; sim (speed): the same with its batch times scaled by the speed probe during the run against the "
             "calibration's" if "speed" in sims else "")
          + ("; range: the same with its batch times scaled by the drift measured around the run" if ranged else "")
          + ")")
    if "kv" in rows[0]["real"]:
        print("\n" + _kv_head(rows[0]["real"]))
        print("\n".join(_kv_table([(r["scheduler"], r["real"], r["sim"]) for r in rows])))
    for r in rows:
        if r["drift"] is not None:
            print(drift_line(r["scheduler"], r["drift"], r["real"]["work_conserving_claimed"]))
        if "run_fit" in r["batch_time"]:
            bt = r["batch_time"]["run_fit"]
            print(f"{r['scheduler']}: run_fit = prefill_decode fitted to the real run's {r['real']['batches']} batches, "
                  f"R² {bt['r2']:.3f}: c {bt['c_ms']:.3f} ms, prefill {bt['prefill_ms_per_token']:.4f}, decode "
                  f"{bt['decode_ms_per_token']:.4f} ms/token, context {bt['context_ms_per_token']:.3g} ms/pair")
        if "run_fit_noise" in r["batch_time"]:
            n = r["batch_time"]["run_fit_noise"]["noise"]
            print(f"{r['scheduler']}: run_fit_noise = run_fit times the run's own scatter around it, lognormal "
                  f"cv {n['cv']:.3f} with lag-1 correlation {n['correlation']:.2f} between successive batches "
                  "(one seeded draw)")
    print(f"\nwrote {out / 'validation.json'}")
    return _validate_end(stop, rows, names)


def _validate_end(stop, rows: list[dict], names: list[str]) -> int:
    if stop is None:
        return 0
    return interrupted(stop, f"{len(rows)} of {len(names)} schedulers finished "
                             f"({', '.join(r['scheduler'] for r in rows)}), shown in the table; {kept_files()}")


def _grid_line(prefill: list[int], decode: list[int], context: list[int], budget: int) -> str:
    join = lambda xs: ",".join(map(str, xs))
    return f"grid: --prefill {join(prefill)} --decode {join(decode)} --context {join(context)} --max-tokens {budget}"


def cmd_calibrate(args: argparse.Namespace) -> int:
    from llmqueue.real.fit import Samples, batch_time_toml, best_fit, fit_all, workload_mix

    prefill = _ints(args.prefill, "--prefill") if args.prefill else None
    decode = _ints(args.decode, "--decode") if args.decode else None
    context = _ints(args.context, "--context") if args.context else None
    if args.repeats < 1:
        raise LlmqueueError(f"--repeats: {args.repeats} is not allowed: an integer >= 1")
    header: list[str] = []
    cfg = None
    calibration = None
    if args.config:
        if args.vidur_model or args.samples:   # numpy only: the [real] table is not needed
            from llmqueue.cli.common import config_from
            from llmqueue.real import split_engine_config

            if Path(args.config).exists():
                _check_config_file(args.config)
            cfg = split_engine_config(args.config, args.set)[0] if Path(args.config).exists() \
                else config_from(args.config, args.set)
        else:
            require_torch()
            from llmqueue.real.serve import load_engine_config

            _check_config_file(args.config)
            cfg, settings = load_engine_config(args.config, args.set)
    budget = args.max_tokens or (cfg.engine["token_budget"] if cfg else 512)
    if args.from_run is not None:
        if not args.config or args.samples or args.vidur_model:
            raise LlmqueueError("--from-run: needs --config (the run's workload and engine) and neither --samples "
                                "nor --vidur-model")
        if not args.from_run > 0:
            raise LlmqueueError(f"--from-run: {args.from_run} is not allowed: seconds of measured time > 0")
        samples, calibration, run_header = _from_run(args)
        header += run_header
    elif args.samples:
        samples = Samples.read_csv(args.samples)
        header.append(f"fitted by llmqueue calibrate from {args.samples}")
    elif args.vidur_model:
        from llmqueue.real.vidur import load_profile, profile_samples

        profile = load_profile(args.vidur_root, args.vidur_model, args.device)
        prefill = prefill or [0, 32, 64, 128, 256, 384, 512, 768, 1024]
        decode, context = decode or [0, 1, 8, 16, 32, 64, 128], context or [128, 512, 1024, 2048]
        samples = profile_samples(profile, prefill, decode, context, budget)
        header += [f"derived from Vidur GPU profiles: {args.vidur_model} on {args.device.upper()}, tensor parallel 1",
                   f"source: {profile.source}",
                   "upstream: microsoft/vidur @ 7d47513363ec447a741ac5e47241580b47724fbf (MIT), data/profiling/",
                   "not included: CPU overheads, sampling, LM head (not in the profiles)",
                   _grid_line(prefill, decode, context, budget)]
    else:
        require_torch()
        import torch

        from llmqueue.real.calibrate import (
            DEFAULT_CONTEXT,
            DEFAULT_DECODE,
            DEFAULT_PREFILL,
            grid_points,
            measure,
        )
        from llmqueue.real.serve import TIMERS, RealSettings, load_model

        if cfg is None:
            settings = RealSettings()
        torch.set_num_threads(settings.threads)
        model = load_model(settings, cfg.base_dir if cfg else None)
        prefill, decode = prefill or list(DEFAULT_PREFILL), decode or list(DEFAULT_DECODE)
        context = context or list(DEFAULT_CONTEXT)
        points = grid_points(prefill, decode, context, budget)
        progress = _Progress(args.json)
        try:
            samples = measure(model, points, TIMERS[settings.timer], repeats=args.repeats, seed=args.seed,
                              progress=lambda done, total: progress("calibration", done / total))
            calibration = _calibration(model, settings, samples, prefill, decode, context, budget)
        except KeyboardInterrupt as exc:
            progress.done()
            return interrupted(exc, "nothing fitted, nothing written (measurements are kept only for a finished "
                                    "grid)")
        progress.done()
        c = model.config
        header.append(f"measured by llmqueue calibrate on the real CPU engine: {c.num_params / 1e6:.1f} M params, "
                      f"hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads}/{c.num_kv_heads} heads, {c.dtype}")
        header.append(f"torch threads {torch.get_num_threads()}, timer {settings.timer}, {args.repeats} repeats "
                      f"(median), {len(points)} grid points")
        header.append(_grid_line(prefill, decode, context, budget))
    fraction, mean_context = 0.5, 0.0
    if cfg is not None:
        from llmqueue.runner import build_workload

        w = build_workload(cfg)
        fraction, mean_context = workload_mix(w.mean_prompt_len, w.mean_output_len)
        header.append(f"token-only view (capacity, λ*) of prefill_decode: the workload's mix, m_p = "
                      f"{w.mean_prompt_len:g}, m_d = {w.mean_output_len:g}")
    skipped: list[str] = []
    fits = fit_all(samples, budget, fraction, mean_context, skipped)
    best = best_fit(fits)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples.write_csv(out / "samples.csv")      # written whole (llmqueue.files)
    saved(out / "samples.csv")
    if calibration is not None:   # measured here: a file for --batch-time and engine.batch_time.file
        calibration.write(out / "calibration.json")
        saved(out / "calibration.json")
    for fit in fits:
        write_text(out / f"batch_time_{fit.name.replace('+', '_')}.toml", batch_time_toml(fit, header))
    write_text(out / "batch_time.toml", batch_time_toml(best, [*header, "the fit with the lowest held-out "
                                                                "(5-fold) RMSE"]))
    write_json(out / "fits.json", {"header": header, "samples": len(samples), "token_budget": budget,
                                   "fits": [f.to_dict() for f in fits], "best": best.name, "not_fitted": skipped})
    if not args.no_plot:
        from llmqueue.real.plots import plot_residuals

        saved(plot_residuals(samples, fits, out / "residuals.png", header[0][:110]))
    if args.json:
        print(json.dumps({"fits": [f.to_dict() for f in fits], "best": best.name}, default=float))
        return 0
    for line in header:
        print(line)
    print(f"{len(samples)} batches; R² and RMSE over all of them, and RMSE on batches each fit did not see "
          f"(5-fold held out; the best is kept):")
    for fit in fits:
        params = {k: v for k, v in fit.batch_time.to_dict().items() if k not in ("model", "points_ms")}
        shown = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in params.items())
        held = fit.to_dict()["heldout_rmse_ms"]
        held = "   -   " if held is None else f"{held:.2f} ms"
        print(f"  {fit.name:<24} R² {fit.r2:.4f}  RMSE {fit.to_dict()['rmse_ms']:.2f} ms  held out {held}  {shown}")
    for reason in skipped:
        print(f"  not fitted: {reason}")
    print(f"\nwrote {out / 'batch_time.toml'} ({best.name}, lowest held-out RMSE), one batch_time_<model>.toml per model, fits.json, "
          f"samples.csv" + (", calibration.json" if calibration is not None else "")
          + ("" if args.no_plot else ", residuals.png"))
    return 0


def _add_batch_time(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-time", metavar="FILE",
                   help="batch times from FILE: a calibration.json (checked against the model and budget) or a "
                        "batch_time.toml from llmqueue calibrate; replaces the config's engine.batch_time")
    p.add_argument("--recalibrate", action="store_true",
                   help="measure this machine's batch times now and refresh the cached calibration")


def _from_run(args: argparse.Namespace):
    """A short real run of the config (its scheduler, load and batch-time source; horizon
    ``--from-run`` seconds of measured time): its batches as samples, and a calibration file."""
    from llmqueue.real import read_engine_data, split_engine_config
    from llmqueue.real.machine import resolve
    from llmqueue.real.serve import RealEngine, real_settings
    from llmqueue.real.validate import batch_samples

    base = split_engine_config(args.config, args.set)[0]
    data, real = read_engine_data(args.config, [*args.set, f"run.horizon_s={args.from_run!r}"])
    settings = real_settings(real)
    if settings.clock == "model":
        raise LlmqueueError("--from-run: needs real.clock = \"measured\" or \"wall\" (the model clock's times "
                            "are the config's model, not measurements)")
    engine = RealEngine(settings, base.base_dir)
    progress = _Progress(args.json)
    resolved = resolve(data, base.base_dir, engine, None, False,
                       lambda done, total: progress("calibration", done / total))
    progress.done()
    cfg = resolved.config
    run = engine.run(cfg, None, None, lambda now, n: progress("run", min(1.0, now / args.from_run)))
    progress.done()
    samples = batch_samples(run.result)
    if len(samples) < 4:
        raise LlmqueueError(f"--from-run: the run had {len(samples)} batches; a longer run or a higher load is needed")
    c = engine.model.config
    budget = cfg.engine["token_budget"]
    header = [f"fitted by llmqueue calibrate to a {args.from_run:g} s real run of {args.config} "
              f"({run.summary['scheduler']}, λ = {run.analysis.arrival_rate:.3g} req/s, {len(samples)} batches): "
              f"{c.num_params / 1e6:.1f} M params, hidden {c.hidden_size}, {c.num_layers} layers, {c.dtype}"]
    cal = _calibration(engine.model, settings, samples, [], [], [], budget)
    return samples, cal, header


def _calibration(model, settings, samples, prefill, decode, context, budget):
    """The measured grid as a calibration file's contents, with the probe timed now."""
    import time as clock

    from llmqueue.real.machine import Calibration, Probe, machine_of, point_shape, probe_points, shape_of
    from llmqueue.real.serve import TIMERS

    points = probe_points(budget, model.config.max_position)
    reference = Probe(model, TIMERS[settings.timer], [point_shape(p) for p in points]).repeat()
    grid = {"prefill": list(prefill), "decode": list(decode), "context": list(context), "max_tokens": budget}
    return Calibration(machine_of(settings.threads, settings.timer), shape_of(model.config), grid, samples,
                       reference, clock.time())


def register(sub) -> None:
    e = sub.add_parser("engine", help="the real CPU engine (PyTorch): run, validate against the simulator")
    esub = e.add_subparsers(dest="engine_command", required=True)
    r = esub.add_parser("run", help="run a config's workload through the real engine")
    r.add_argument("config", help="TOML config with an optional [real] table (model, threads, clock, KV pool)")
    r.add_argument("--schedulers", help="comma-separated, each on the same arrivals (default: the config's)")
    r.add_argument("--out", default="llmqueue_output/engine", help="folder for summary.json, CSVs and the plot")
    r.add_argument("--json", action="store_true", help="print the summaries as JSON")
    r.add_argument("--no-plot", action="store_true", help="skip the PNG")
    _add_batch_time(r)
    add_overrides(r)
    r.set_defaults(func=cmd_engine_run)

    v = esub.add_parser("validate", help="simulator (config's batch-time model) versus real engine, same arrivals")
    v.add_argument("config")
    v.add_argument("--schedulers", help="comma-separated (default: the config's)")
    v.add_argument("--out", default="llmqueue_output/validate", help="folder for validation.json")
    v.add_argument("--calibrate", action="store_true",
                   help="the same as --recalibrate: measure this machine now (grid up to the budget), cache it "
                        "and simulate with that fit instead of the config's")
    v.add_argument("--no-refit", action="store_true",
                   help="skip the second simulation with a model fitted to the real run's own batches")
    v.add_argument("--json", action="store_true")
    _add_batch_time(v)
    add_overrides(v)
    v.set_defaults(func=cmd_engine_validate)

    k = esub.add_parser("capacity", help="the largest stable rate on the real engine by short runs (bisection)")
    k.add_argument("config")
    k.add_argument("--scheduler", help="one scheduler (default: the config's)")
    k.add_argument("--low", type=float, default=0.5, help="lowest load tried, a fraction of λ* (default 0.5)")
    k.add_argument("--high", type=float, default=1.2, help="highest load, tried first (default 1.2)")
    k.add_argument("--steps", type=int, default=4, help="bisection steps after the first run (default 4)")
    k.add_argument("--horizon", type=float, default=20.0, help="seconds of measured time per run (default 20)")
    k.add_argument("--out", default="llmqueue_output/engine_capacity", help="folder for capacity.json")
    k.add_argument("--json", action="store_true")
    _add_batch_time(k)
    add_overrides(k)
    k.set_defaults(func=cmd_engine_capacity)

    c = sub.add_parser("calibrate", help="fit batch-time models to the real engine, a samples CSV or Vidur profiles")
    c.add_argument("--config", help="engine config: its [real] model and threads, token budget and workload mix")
    c.add_argument("--samples", help="fit a samples CSV (from an earlier calibration) instead of measuring")
    c.add_argument("--from-run", type=float, metavar="SECONDS",
                   help="with --config: fit the batches of a short real run of the config (SECONDS of measured "
                        "time) instead of a grid")
    c.add_argument("--vidur-model", help="fit Vidur GPU profiles of this model instead (llama-2-7b, llama-3-8b)")
    c.add_argument("--device", default="a100", help="with --vidur-model: a100 or h100 (default a100)")
    c.add_argument("--vidur-root", default=DEFAULT_VIDUR_ROOT, help=f"profiles folder (default {DEFAULT_VIDUR_ROOT})")
    c.add_argument("--prefill", help="prefill tokens of the grid, comma-separated")
    c.add_argument("--decode", help="decode tokens (requests) of the grid, comma-separated")
    c.add_argument("--context", help="context lengths of the decode requests, comma-separated")
    c.add_argument("--max-tokens", type=int, help="largest batch (default: the config's token budget, else 512)")
    c.add_argument("--repeats", type=int, default=3, help="timings per grid point, median kept (default 3)")
    c.add_argument("--seed", type=int, default=0, help="seed of the measuring order (default 0)")
    c.add_argument("--out", default="llmqueue_output/calibrate", help="folder for the fitted configs and plot")
    c.add_argument("--json", action="store_true")
    c.add_argument("--no-plot", action="store_true")
    add_overrides(c)
    c.set_defaults(func=cmd_calibrate)

    from llmqueue.cli import serve   # serve, serve-bench (docs/serving.md): their imports are lazy too

    serve.register(sub)
