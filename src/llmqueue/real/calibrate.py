"""Calibration: time the real model over a grid of batches (docs/real_engine.md).

Each grid point is a batch of P prefill tokens (one chunk of a fresh prompt) and D decode
tokens, one for each of D requests holding K tokens of context.  Every point is timed
``repeats`` times, the whole grid shuffled anew for each repeat (seeded) so slow phases of
a shared machine spread over all points; the median is kept.  The KV contents do not change
the time, so the decode requests' caches are reserved, not computed.

The machine calibration also times the batches the config's scheduler forms (:func:`replay_spec`,
:func:`replay_shapes`, :func:`measure_batches`): simulated runs at 0.5–1.0 of the grid fit's λ*
(paper arXiv 2504.07347, Theorem 2) carry several prompt chunks, cached prefixes and many decodes
of varied contexts, which no grid point does; near capacity the grid's fit underpredicted them by
8–11 % (docs/real_engine.md, "Calibration that transfers").
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np

from llmqueue.config import Config, parse_config
from llmqueue.model.workload import make_length
from llmqueue.real.fit import Fit, Samples, fit_prefill_decode, workload_mix
from llmqueue.real.kvcache import KVPool
from llmqueue.real.model import Chunk, Transformer
from llmqueue.runner import build_workload

DEFAULT_PREFILL = (0, 16, 64, 128, 192, 256, 384, 512)
DEFAULT_DECODE = (0, 1, 8, 16, 32, 64)
DEFAULT_CONTEXT = (64, 256, 512)


def grid_points(prefill: Sequence[int], decode: Sequence[int], context: Sequence[int],
                max_tokens: int, cached: Sequence[int] = ()) -> list[tuple[int, ...]]:
    """(P, D, K) with 1 <= P + D <= max_tokens; K only matters (and varies) when D > 0.  With
    ``cached``, also (P, D, K, C): the prompt chunk continues after C cached tokens (a later chunk
    of a chunked prompt), alone and with a middle decode count at a middle context."""
    points: list[tuple[int, ...]] = [(p, d, k) for p in prefill for d in decode if 1 <= p + d <= max_tokens
                                     for k in (context if d else [0])]
    mid_d = sorted(decode)[len(decode) // 2] if decode else 0
    mid_k = sorted(context)[len(context) // 2] if context else 0
    for c in cached:
        for p in prefill:
            for d in sorted({0, mid_d}):
                if p > 0 and c > 0 and p + d <= max_tokens:
                    points.append((p, d, mid_k if d else 0, c))
    return points


def run_grid(mean_prompt_len: float, mean_output_len: float, max_tokens: int) -> dict:
    """A grid that covers what runs of a workload contain: fresh and later prompt chunks (after
    m_p/2 and m_p cached tokens), decode contexts m_p + m_d·{0, ½, 1, 2}, and decode counts up to
    128 (the batches schedulers form near capacity), within the budget."""
    decode = sorted({*DEFAULT_DECODE, 96, 128})
    return {"prefill": list(DEFAULT_PREFILL), "decode": [d for d in decode if d <= max_tokens],
            "context": workload_contexts(mean_prompt_len, mean_output_len),
            "cached": sorted({max(1, round(mean_prompt_len / 2)), max(1, round(mean_prompt_len))}),
            "max_tokens": max_tokens}


def _cached(point: tuple[int, ...]) -> int:
    return point[3] if len(point) > 3 else 0


def measure(model: Transformer, points: Sequence[tuple[int, ...]], timer: Callable[[], float],
            repeats: int = 3, seed: int = 0, progress: Callable[[int, int], None] | None = None,
            between: Callable[[], None] | None = None) -> Samples:
    """Median seconds of each grid point (P, D, K) or (P, D, K, C) on ``model`` (``between``: see
    :func:`_time_batches`)."""
    max_position = model.config.max_position
    longest = max(max(_cached(pt) + pt[0], pt[2] + 1) for pt in points)
    if longest >= max_position:
        from llmqueue.errors import ConfigError

        raise ConfigError("--context", longest, f"below the model's max_position = {max_position}")
    capacity = max(_cached(pt) + pt[0] + pt[1] * (pt[2] + 1) for pt in points)
    pool = KVPool(model.config, capacity)
    model.forward([Chunk(0, 0, [1] * max(1, min(256, capacity - 1)))], pool.k, pool.v)   # warm-up
    batches = []
    for pt in points:
        p, d, k = pt[:3]
        c = _cached(pt)
        batches.append(([Chunk(0, c, [1] * p)] if p else []) + [Chunk(c + p + j * (k + 1), k, [1]) for j in range(d)])
    times: dict[tuple[int, ...], list[float]] = {pt: [] for pt in points}
    for pt, t in zip(points, _time_batches(model, pool, batches, timer, repeats, seed, progress, between)):
        times[pt] += t
    rows = [(pt[0], pt[1], pt[2], pt[0] * _cached(pt) + pt[0] * (pt[0] + 1) // 2 + pt[1] * (pt[2] + 1),
             float(np.median(times[pt]))) for pt in points]
    return Samples.from_rows(rows)


#: batches timed between two instances of a speed probe (``between``), in calibrations and runs
PROBE_EVERY = 25


def _time_batches(model: Transformer, pool: KVPool, batches: Sequence[list[Chunk]], timer: Callable[[], float],
                  repeats: int, seed: int, progress: Callable[[int, int], None] | None,
                  between: Callable[[], None] | None = None) -> list[list[float]]:
    """Seconds of each batch's forward pass (and argmax), ``repeats`` times, the batches in a fresh
    seeded order each time so that slow phases of a shared machine spread over all of them;
    ``between`` (the speed probe, :class:`llmqueue.real.machine.Probe`) is called every
    :data:`PROBE_EVERY` batches, off the measured times."""
    rng = np.random.default_rng(seed)
    times: list[list[float]] = [[] for _ in batches]
    done, total = 0, len(batches) * repeats
    for _ in range(repeats):
        for i in rng.permutation(len(batches)):
            began = timer()
            model.forward(batches[i], pool.k, pool.v).argmax(-1)
            times[i].append(timer() - began)
            done += 1
            if progress is not None:
                progress(done, total)
            if between is not None and done % PROBE_EVERY == 0:
                between()
    return times


def workload_contexts(mean_prompt_len: float, mean_output_len: float) -> list[int]:
    """Decode contexts spanning a workload's requests: m_p + m_d·{0, 0.5, 1, 2}."""
    return sorted({max(1, round(mean_prompt_len + f * mean_output_len)) for f in (0.0, 0.5, 1.0, 2.0)})


def calibrate_config(config: Config, model: Transformer, timer: Callable[[], float], repeats: int = 3,
                     seed: int = 0) -> tuple[Config, Fit]:
    """Measure the grid (up to the token budget, contexts from the workload) and return the config
    with ``engine.batch_time`` replaced by the prefill_decode + context fit, and that fit."""
    workload = build_workload(config)
    m_p, m_d = workload.mean_prompt_len, workload.mean_output_len
    budget = config.engine["token_budget"]
    points = grid_points(DEFAULT_PREFILL, DEFAULT_DECODE, workload_contexts(m_p, m_d), budget)
    samples = measure(model, points, timer, repeats=repeats, seed=seed)
    fit = fit_prefill_decode(samples, True, *workload_mix(m_p, m_d))
    data = copy.deepcopy(config.data)
    data["engine"]["batch_time"] = fit.batch_time.to_dict()
    return parse_config(data, config.base_dir), fit


# ---- the batches the scheduler forms (the machine calibration's second part) ----------------

#: loads (fractions of the grid fit's λ*) at which the machine calibration simulates the config's
#: scheduler and times a sample of the batches it forms: from half load to capacity, where runs'
#: batches carry more decodes, several prompt chunks and varied contexts than any grid point
REPLAY_LOADS = (0.5, 0.75, 0.9, 1.0)
REPLAY_BATCHES = 80          # batches timed per load
REPLAY_REQUESTS = 2000       # simulated arrivals per load (a run's worth of batches, in a second or so)


def replay_spec(config: Config) -> dict | None:
    """What the machine calibration replays for ``config`` (its scheduler, budget and request
    lengths under Poisson arrivals), part of the calibration's grid and so of its cache key; None
    for a trace's arrivals, whose lengths are the trace's (the grid alone then)."""
    w = config.workload
    if w.get("arrival") == "trace" or not isinstance(w.get("prompt"), dict) or not isinstance(w.get("output"), dict):
        return None
    engine = {k: config.engine[k] for k in ("scheduler", "token_budget", "max_batch_requests")
              if config.engine.get(k) is not None}
    lengths = {}
    for key in ("prompt", "output"):   # an empirical law's file, relative to the config: made absolute
        law = copy.deepcopy(w[key])
        if isinstance(law.get("trace"), str):
            law["trace"] = str(config.resolve(law["trace"]))
        lengths[key] = law
    return {"engine": engine, **lengths, "loads": list(REPLAY_LOADS), "batches": REPLAY_BATCHES,
            "requests": REPLAY_REQUESTS, "seed": 0}


def replay_fit(spec: dict, grid: Samples) -> Fit:
    """The grid samples' prefill_decode + context fit for the replay spec's mean lengths."""
    m_p = make_length(spec["prompt"], field="workload.prompt", minimum=1).mean
    m_d = make_length(spec["output"], field="workload.output", minimum=0).mean
    return fit_prefill_decode(grid, True, *workload_mix(m_p, m_d))


def replay_shapes(spec: dict, batch_time: dict) -> list[tuple[tuple[tuple[int, int], ...], tuple[int, ...]]]:
    """Batches of ``spec``'s scheduler in simulated runs timed by ``batch_time`` (the grid fit), at each
    of ``spec["loads"]`` of its λ*: ``spec["batches"]`` of each run's batches drawn uniformly (seeded),
    each as ((prefill chunk tokens, tokens cached before it), ...) and (decode contexts, ...)."""
    import warnings

    from llmqueue.core.simulator import simulate
    from llmqueue.runner import build_engine

    shapes = []
    for i, load in enumerate(spec["loads"]):
        data = {"engine": {**spec["engine"], "batch_time": dict(batch_time)},
                "workload": {"arrival": "poisson", "load": load, "prompt": spec["prompt"], "output": spec["output"]},
                "run": {"seed": spec["seed"] + i, "requests": spec["requests"]}}
        with warnings.catch_warnings():   # the prefill_decode caveat: the calibration's own runs
            warnings.simplefilter("ignore")
            cfg = parse_config(data)
            engine = build_engine(cfg)
        seen = []
        timed = engine.batch_time.plan_seconds

        def record(plan, seen=seen, timed=timed):   # read before the plan is applied, as batch times are
            seen.append((tuple((n, r.num_prompt_tokens - r.prefill_left) for r, n in plan.prefill),
                         tuple(r.num_prompt_tokens + r.num_output_tokens - r.decode_left for r in plan.decode)))
            return timed(plan)

        engine.batch_time.plan_seconds = record
        simulate(engine, build_workload(cfg).generate(spec["seed"] + i, num_requests=spec["requests"]), method="reference")
        rng = np.random.default_rng([spec["seed"], i])
        pick = np.sort(rng.choice(len(seen), min(spec["batches"], len(seen)), replace=False))
        shapes += [seen[j] for j in pick]
    return shapes


def batch_layout(shapes) -> tuple[int, list[list[Chunk]]]:
    """The KV pool size and the chunks of each batch shape (:func:`replay_shapes`): its requests'
    KV runs one after another, as a first-fit allocator leaves them."""
    def sizes(shape):
        prefill, decode = shape
        return [c + n + 1 for n, c in prefill] + [k + 1 for k in decode]

    batches = []
    for shape in shapes:
        starts = np.concatenate([[0], np.cumsum(sizes(shape))[:-1]]).astype(int).tolist()
        prefill, decode = shape
        chunks = [Chunk(s, c, [1] * n) for s, (n, c) in zip(starts, prefill)]
        chunks += [Chunk(s, k, [1]) for s, k in zip(starts[len(prefill):], decode)]
        batches.append(chunks)
    return max(sum(sizes(s)) for s in shapes), batches


def longest_context(shapes) -> int:
    """The most positions any request of the batch shapes reaches."""
    longest = max((c + n for shape in shapes for n, c in shape[0]), default=0)
    return max(longest, max((k + 1 for shape in shapes for k in shape[1]), default=0))


def check_positions(model: Transformer, shapes) -> None:
    longest = longest_context(shapes)
    if longest >= model.config.max_position:
        from llmqueue.errors import ConfigError

        raise ConfigError("real.model.max_position", model.config.max_position,
                          f"more than the longest context the scheduler's batches reach ({longest + 1} tokens)")


def measure_batches(model: Transformer, shapes, timer: Callable[[], float], repeats: int = 3, seed: int = 0,
                    progress: Callable[[int, int], None] | None = None,
                    between: Callable[[], None] | None = None) -> Samples:
    """Median seconds of each batch shape (:func:`replay_shapes`) on ``model``, laid out by
    :func:`batch_layout`; shuffled per repeat (``between``: see :func:`_time_batches`)."""
    check_positions(model, shapes)
    capacity, batches = batch_layout(shapes)
    pool = KVPool(model.config, capacity)
    model.forward(batches[0], pool.k, pool.v)   # warm-up
    times = _time_batches(model, pool, batches, timer, repeats, seed, progress, between)
    rows = []
    for (prefill, decode), t in zip(shapes, times):
        rows.append((sum(n for n, _ in prefill), len(decode), float(np.mean(decode)) if decode else 0.0,
                     shape_pairs((prefill, decode)), float(np.median(t))))
    return Samples.from_rows(rows)


def shape_pairs(shape) -> int:
    """Attention pairs of a batch shape (:func:`llmqueue.model.batch_time.attention_pairs`)."""
    prefill, decode = shape
    return sum(n * c + n * (n + 1) // 2 for n, c in prefill) + sum(k + 1 for k in decode)
