"""Calibration: time the real model over a grid of batches (docs/real_engine.md).

Each grid point is a batch of P prefill tokens (one chunk of a fresh prompt) and D decode
tokens, one for each of D requests holding K tokens of context.  Every point is timed
``repeats`` times, the whole grid shuffled anew for each repeat (seeded) so slow phases of
a shared machine spread over all points; the median is kept.  The KV contents do not change
the time, so the decode requests' caches are reserved, not computed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np

from llmqueue.config import Config, parse_config
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
            repeats: int = 3, seed: int = 0,
            progress: Callable[[int, int], None] | None = None) -> Samples:
    """Median seconds of each grid point (P, D, K) or (P, D, K, C) on ``model``."""
    max_position = model.config.max_position
    longest = max(max(_cached(pt) + pt[0], pt[2] + 1) for pt in points)
    if longest >= max_position:
        from llmqueue.errors import ConfigError

        raise ConfigError("--context", longest, f"below the model's max_position = {max_position}")
    capacity = max(_cached(pt) + pt[0] + pt[1] * (pt[2] + 1) for pt in points)
    pool = KVPool(model.config, capacity)
    rng = np.random.default_rng(seed)
    times: dict[tuple[int, ...], list[float]] = {pt: [] for pt in points}
    model.forward([Chunk(0, 0, [1] * max(1, min(256, capacity - 1)))], pool.k, pool.v)   # warm-up
    done, total = 0, len(points) * repeats
    for _ in range(repeats):
        for i in rng.permutation(len(points)):
            p, d, k = points[i][:3]
            c = _cached(points[i])
            chunks = [Chunk(0, c, [1] * p)] if p else []
            chunks += [Chunk(c + p + j * (k + 1), k, [1]) for j in range(d)]
            began = timer()
            model.forward(chunks, pool.k, pool.v).argmax(-1)
            times[points[i]].append(timer() - began)
            done += 1
            if progress is not None:
                progress(done, total)
    rows = [(pt[0], pt[1], pt[2], pt[0] * _cached(pt) + pt[0] * (pt[0] + 1) // 2 + pt[1] * (pt[2] + 1),
             float(np.median(times[pt]))) for pt in points]
    return Samples.from_rows(rows)


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
