"""The ``region`` command: the 2-D stability region under a request cap (paper §6, Theorem 10).

Also the region part of ``capacity`` when ``engine.max_batch_requests`` is set.
"""

from __future__ import annotations

import argparse
import json
import sys

from llmqueue.cli.common import Progress, add_overrides, config_from, plot_path, saved, scheduler_names
from llmqueue.analysis.region import Position, Region, served_rates, stability_region


def region_of(cfg, max_prefill_chunk: int | None = None) -> Region:
    from llmqueue.runner import batch_time_of

    return stability_region(batch_time_of(cfg), cfg.engine["token_budget"], cfg.engine.get("max_batch_requests"),
                            max_prefill_chunk)


def _batch(v) -> str:
    b = v.batch
    if b is None:
        return "(closure on the axis)"
    return f"{b.num_prefill_tokens} + {b.num_decode_tokens} = {b.num_tokens} tokens in {b.duration_s * 1e3:.2f} ms"


def region_lines(region: Region, pos: Position, mean_prompt_len: float, mean_output_len: float) -> list[str]:
    """The vertices, where the workload lies and λ along its ray, as printed lines."""
    cap = region.max_batch_requests
    head = (f"stability region (paper §6, Theorem 10): b_max = {region.token_budget}, "
            + (f"k_max = {cap}" if cap is not None else "no request cap (Theorem 2's triangle)"))
    lines = [head, f"{'vertex':>6}  {'prefill tok/s':>13}  {'decode tok/s':>12}  batch type (prefill + decode tokens)"]
    for i, v in enumerate(region.vertices):
        lines.append(f"{i:>6}  {v.prefill_rate:>13.1f}  {v.decode_rate:>12.1f}  {_batch(v)}")
    a, b = pos.edge
    ia, ib = region.vertices.index(a), region.vertices.index(b)
    lines += [
        (f"workload: λ·(m_p, m_d) = λ·({mean_prompt_len:.2f}, {mean_output_len:.2f}) = "
         f"({pos.prefill_rate:.1f}, {pos.decode_rate:.1f}) tokens/s"),
        (f"position: {pos.status} (load along the ray ρ = {pos.rho:.4f}; margin to the boundary "
         f"{pos.margin_tokens_per_s:.1f} tokens/s)"),
        f"largest stable rate along the ray: λ* = {pos.max_stable_rate_rps:.4f} requests/s",
        (f"the ray leaves the region between vertices {ia} and {ib}: a mix of {pos.edge_time_share:.3f} of the "
         f"time in vertex {ia}'s batch type and {1 - pos.edge_time_share:.3f} in vertex {ib}'s"),
    ]
    if region.max_prefill_chunk is not None:
        lines.append(f"(types limited to {region.max_prefill_chunk} prefill tokens per request and batch)")
    return lines


def chunk_note(cfg, region: Region, pos: Position, mean_prompt_len: float, mean_output_len: float) -> str | None:
    """When the crossed edge needs one request to give more prefill tokens than the mean prompt,
    how much λ* drops if chunks were limited to the mean prompt (docs/region.md)."""
    cap = region.max_batch_requests
    if cap is None or region.max_prefill_chunk is not None:
        return None
    chunk = max((v.batch.num_prefill_tokens for v in pos.edge
                 if v.batch is not None and v.batch.num_decode_tokens == cap - 1), default=0)
    if chunk <= mean_prompt_len:
        return None
    limit = max(1, round(mean_prompt_len))
    limited = region_of(cfg, limit).locate(pos.max_stable_rate_rps, mean_prompt_len, mean_output_len)
    return (f"note: the crossed edge needs one request to give {chunk} prefill tokens to a batch, more than the "
            f"mean prompt ({mean_prompt_len:.0f}); with chunks of at most {limit} tokens (`region --max-chunk {limit}`) "
            f"λ* would be {limited.max_stable_rate_rps:.4f} requests/s")


def capacity_report(cfg, analysis, as_json: bool) -> int:
    """``llmqueue capacity`` under a cap: the region's λ* and ρ replace Theorem 2's line."""
    region = region_of(cfg)
    a = analysis
    pos = region.locate(a.arrival_rate, a.mean_prompt_len, a.mean_output_len)
    basis = f"region (paper §6, Theorem 10): max_batch_requests = {region.max_batch_requests}"
    if as_json:
        out = {**a.to_dict(), "basis": basis, "rho": pos.rho, "max_stable_rate_rps": pos.max_stable_rate_rps,
               "fluid_growth_tokens_per_s": None,
               "theorem2": {"capacity_tokens_per_s": a.capacity_tokens_per_s, "rho": a.rho,
                            "max_stable_rate_rps": a.max_stable_rate_rps},
               "region": {**region.to_dict(), "position": pos.to_dict()}}
        print(json.dumps(out))
        return 0
    print(f"basis: the 2-D stability region, not Theorem 2's line, since engine.max_batch_requests = "
          f"{region.max_batch_requests}")
    print(f"Theorem 2's line alone (an upper bound here): λ* = {a.max_stable_rate_rps:.4f} requests/s, "
          f"ρ = {a.rho:.4f}")
    for line in region_lines(region, pos, a.mean_prompt_len, a.mean_output_len):
        print(line)
    note = chunk_note(cfg, region, pos, a.mean_prompt_len, a.mean_output_len)
    if note:
        print(note)
    for note in a.notes:
        print(f"note: {note}")
    return 0


def cmd_region(args: argparse.Namespace) -> int:
    from llmqueue.runner import analysis_of, build_workload, compare

    plot = plot_path(args.plot, "--plot", "region.png") if args.plot else None   # checked before any work
    simulate = plot is not None and not args.no_simulate
    cfg = config_from(args.config, [*args.set, *(["run.record_batches=true"] if simulate else [])])
    names = scheduler_names(args.schedulers, [cfg.engine["scheduler"]])  # checked even without --plot
    workload = build_workload(cfg)
    a = analysis_of(cfg, workload)
    region = region_of(cfg, args.max_chunk)
    pos = region.locate(a.arrival_rate, a.mean_prompt_len, a.mean_output_len)
    achieved = []
    if simulate:
        progress = Progress(sys.stderr.isatty() and not args.json)
        try:
            for run in compare(cfg, names, progress):
                progress.done()
                u, v = served_rates(run.result)
                achieved.append({"scheduler": run.summary["scheduler"], "verdict": run.summary["verdict"],
                                 "prefill_tokens_per_s": u, "decode_tokens_per_s": v})
        finally:
            progress.done()
    if args.json:
        print(json.dumps({**region.to_dict(), "position": pos.to_dict(), "achieved": achieved}))
    else:
        for line in region_lines(region, pos, a.mean_prompt_len, a.mean_output_len):
            print(line)
        note = chunk_note(cfg, region, pos, a.mean_prompt_len, a.mean_output_len)
        if note:
            print(note)
        for r in achieved:
            print(f"{r['scheduler']} served ({r['prefill_tokens_per_s']:.1f}, {r['decode_tokens_per_s']:.1f}) tokens/s "
                  f"over the second half of the run: {r['verdict']}")
    if args.plot:
        from llmqueue.plots import plot_region

        path = saved(plot_region(region, pos, achieved, plot,
                                 f"Stability region: b_max = {region.token_budget}, k_max = "
                                 f"{region.max_batch_requests}"))
        if not args.json:
            print(f"wrote {path}")
    return 0


def register(sub) -> None:
    r = sub.add_parser("region", help="2-D stability region under a request cap (paper §6, Theorem 10)")
    r.add_argument("config", help="TOML config or scenario name (e.g. point-c)")
    add_overrides(r)
    r.add_argument("--json", action="store_true", help="print vertices and position as JSON")
    r.add_argument("--plot", metavar="FILE.png", help="draw the region, the workload and the rates schedulers achieve "
                   "(a .png, .pdf or .svg file, or a folder for region.png)")
    r.add_argument("--schedulers", help="with --plot: simulate these (comma-separated; default the config's)")
    r.add_argument("--max-chunk", type=int, metavar="TOKENS",
                   help="most prefill tokens one request gives a batch (e.g. a fixed prompt length; beyond the paper)")
    r.add_argument("--no-simulate", action="store_true", help="with --plot: draw the region and workload only")
    r.set_defaults(func=cmd_region)
