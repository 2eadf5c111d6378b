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
                max_tokens: int) -> list[tuple[int, int, int]]:
    """(P, D, K) with 1 <= P + D <= max_tokens; K only matters (and varies) when D > 0."""
    return [(p, d, k) for p in prefill for d in decode if 1 <= p + d <= max_tokens
            for k in (context if d else [0])]


def measure(model: Transformer, points: Sequence[tuple[int, int, int]], timer: Callable[[], float],
            repeats: int = 3, seed: int = 0,
            progress: Callable[[int, int], None] | None = None) -> Samples:
    """Median seconds of each grid point on ``model``."""
    max_position = model.config.max_position
    longest = max(max(p, k + 1) for p, _, k in points)
    if longest >= max_position:
        from llmqueue.errors import ConfigError

        raise ConfigError("--context", longest, f"below the model's max_position = {max_position}")
    capacity = max(p + d * (k + 1) for p, d, k in points)
    pool = KVPool(model.config, capacity)
    rng = np.random.default_rng(seed)
    times: dict[tuple[int, int, int], list[float]] = {pt: [] for pt in points}
    model.forward([Chunk(0, 0, [1] * max(1, min(256, capacity - 1)))], pool.k, pool.v)   # warm-up
    done, total = 0, len(points) * repeats
    for _ in range(repeats):
        for i in rng.permutation(len(points)):
            p, d, k = points[i]
            chunks = [Chunk(0, 0, [1] * p)] if p else []
            chunks += [Chunk(p + j * (k + 1), k, [1]) for j in range(d)]
            began = timer()
            model.forward(chunks, pool.k, pool.v).argmax(-1)
            times[points[i]].append(timer() - began)
            done += 1
            if progress is not None:
                progress(done, total)
    rows = [(p, d, k, p * (p + 1) // 2 + d * (k + 1), float(np.median(times[(p, d, k)]))) for p, d, k in points]
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
