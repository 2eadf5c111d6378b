"""The 2-D stability region under a batch-size limit (arXiv 2504.07347 §6, Theorem 10).

With at most k_max requests per batch, stability is a region in the plane of (prefill token
rate λ·m_p, decode token rate λ·m_d): the convex hull of the rates (x/t_b, y/t_b) of the
feasible batch types and the origin, closed downward.  A batch type is x prefill + y decode
tokens with b = x + y <= b_max, at most k_max requests (one per decode token, at least one
prefill request when x > 0).  Only three types per load b can be vertices, since every other
type with load b lies on the segment between them:

* prefill only  (b, 0)                        one request's chunk;
* mixed         (b - y, y), y = min(k_max - 1, b - 1)   the most decodes that leave a prefill slot;
* decode only   (0, b)                        when b <= k_max.

Without a cap the mixed and decode-only types span the whole segment x + y = b, and the
region is Theorem 2's triangle x + y <= max_b b/t_b (= b_max/t_{b_max} under Assumption 1).

Arithmetic: rates are computed in double precision from the model's t_b (relative error
~1e-15); a point is dropped from the vertex list when it lies within ``TOLERANCE`` (relative,
the sine of the turn) of the line through its neighbours, and a workload within
``TOLERANCE`` of the boundary along its ray is reported as ``boundary``.  Cost: O(b_max)
numpy work plus a hull over the Pareto-optimal types (20-60 ms at b_max = 65,536 for every
model on an idle 2-core machine).

Beyond the paper, ``max_prefill_chunk`` L bounds the prefill tokens one request gives a batch
(prompts no longer than L), so x prefill tokens need ceil(x/L) request slots: a smaller region.
docs/region.md has the derivation, the commands and the evidence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from llmqueue.model.batch_time import BatchTime, make_batch_time
from llmqueue.checks import integer
from llmqueue.errors import ConfigError

TOLERANCE = 1e-9
INSIDE, BOUNDARY, OUTSIDE = "inside", "boundary", "outside"


@dataclass(frozen=True)
class BatchType:
    """x prefill + y decode tokens in one batch of ``duration_s`` seconds."""

    num_prefill_tokens: int
    num_decode_tokens: int
    duration_s: float

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    def to_dict(self) -> dict:
        return {"num_prefill_tokens": self.num_prefill_tokens, "num_decode_tokens": self.num_decode_tokens,
                "num_tokens": self.num_tokens, "duration_ms": self.duration_s * 1e3}


@dataclass(frozen=True)
class Vertex:
    """A corner of the region, in tokens/s; ``batch`` is the type that reaches it (None for
    the points where the downward closure meets an axis)."""

    prefill_rate: float
    decode_rate: float
    batch: BatchType | None

    def to_dict(self) -> dict:
        return {"prefill_tokens_per_s": self.prefill_rate, "decode_tokens_per_s": self.decode_rate,
                "batch": self.batch.to_dict() if self.batch else None}


@dataclass(frozen=True)
class Position:
    """Where a workload (λ·m_p, λ·m_d) lies relative to the region."""

    prefill_rate: float            # λ·m_p, tokens/s
    decode_rate: float             # λ·m_d, tokens/s
    rho: float                     # load along the ray: 1 on the boundary (the region's gauge)
    status: str                    # inside | boundary | outside
    max_stable_rate_rps: float     # λ at which the ray leaves the region
    margin_tokens_per_s: float     # distance to the nearest boundary line (negative outside)
    edge: tuple[Vertex, Vertex]    # the boundary edge the ray crosses
    edge_time_share: float         # fraction of time in edge[0]'s batch type at the crossing

    def to_dict(self) -> dict:
        return {"prefill_tokens_per_s": self.prefill_rate, "decode_tokens_per_s": self.decode_rate,
                "rho": self.rho, "status": self.status, "max_stable_rate_rps": self.max_stable_rate_rps,
                "margin_tokens_per_s": self.margin_tokens_per_s, "edge": [v.to_dict() for v in self.edge],
                "edge_time_share": [self.edge_time_share, 1.0 - self.edge_time_share]}


class Region:
    """The downward-closed convex region; ``vertices`` run from the decode axis to the prefill axis."""

    def __init__(self, token_budget: int, max_batch_requests: int | None, vertices: list[Vertex],
                 max_prefill_chunk: int | None = None) -> None:
        self.token_budget = token_budget
        self.max_batch_requests = max_batch_requests
        self.max_prefill_chunk = max_prefill_chunk
        self.vertices = tuple(vertices)
        u = np.array([v.prefill_rate for v in vertices])
        w = np.array([v.decode_rate for v in vertices])
        # Edge i joins vertex i and i+1; its outward normal (dv, du) is >= 0 componentwise.
        self._normals = np.column_stack([w[:-1] - w[1:], u[1:] - u[:-1]])
        self._offsets = self._normals[:, 0] * u[:-1] + self._normals[:, 1] * w[:-1]

    @property
    def max_prefill_rate(self) -> float:
        return self.vertices[-1].prefill_rate

    @property
    def max_decode_rate(self) -> float:
        return self.vertices[0].decode_rate

    def gauge(self, prefill_rate: float, decode_rate: float) -> float:
        """The load along the ray: the smallest g with (x, y)/g in the region (1 on the boundary)."""
        return float(np.max((self._normals @ np.array([prefill_rate, decode_rate])) / self._offsets))

    def contains(self, prefill_rate: float, decode_rate: float) -> bool:
        """Inside or on the boundary (within TOLERANCE)."""
        return self.gauge(prefill_rate, decode_rate) <= 1 + TOLERANCE

    def locate(self, arrival_rate: float, mean_prompt_len: float, mean_output_len: float) -> Position:
        """Position of the workload (λ·m_p, λ·m_d); λ* is where its ray leaves the region."""
        z = np.array([arrival_rate * mean_prompt_len, arrival_rate * mean_output_len])
        ratios = (self._normals @ z) / self._offsets
        i = int(np.argmax(ratios))
        g = float(ratios[i])
        margin = float(np.min((self._offsets - self._normals @ z) / np.hypot(*self._normals.T)))
        status = BOUNDARY if abs(g - 1) <= TOLERANCE else (INSIDE if g < 1 else OUTSIDE)
        if status == BOUNDARY:
            margin = 0.0
        a, b = self.vertices[i], self.vertices[i + 1]
        # The crossing point z/g = θ a + (1-θ) b: θ of the time in a's type.
        p = z / g if g > 0 else z
        du = a.prefill_rate - b.prefill_rate
        dv = a.decode_rate - b.decode_rate
        theta = (p[0] - b.prefill_rate) / du if abs(du) >= abs(dv) else (p[1] - b.decode_rate) / dv
        return Position(float(z[0]), float(z[1]), g, status,
                        arrival_rate / g if g > 0 else float("inf"), margin, (a, b),
                        float(np.clip(theta, 0.0, 1.0)))

    def to_dict(self) -> dict:
        return {"token_budget": self.token_budget, "max_batch_requests": self.max_batch_requests,
                "max_prefill_chunk": self.max_prefill_chunk, "tolerance": TOLERANCE, "vertices": [v.to_dict() for v in self.vertices]}


def served_rates(result, since: float | None = None) -> tuple[float, float]:
    """(prefill, decode) tokens/s a run served from ``since`` (default half the horizon) to its end;
    needs per-batch records (``run.record_batches``)."""
    if result.batches is None:
        raise ConfigError("run.record_batches", False, "true, to measure the prefill and decode rates a run served")
    end = result.end_time
    start = end / 2 if since is None else since
    ends = result.batches["end_time"]
    window = (ends > start) & (ends <= end)
    span = end - start
    if span <= 0:
        return 0.0, 0.0
    return (float(result.batches["num_prefill_tokens"][window].sum()) / span,
            float(result.batches["num_decode_tokens"][window].sum()) / span)


def _check_cap(max_batch_requests: int | None, token_budget: int) -> int | None:
    if max_batch_requests is None:
        return None
    k = integer(max_batch_requests, "engine.max_batch_requests", 1, what="or omitted for no cap")
    if k > token_budget:
        raise ConfigError("engine.max_batch_requests", k,
                          f"at most engine.token_budget = {token_budget} (every request in a batch takes at "
                          f"least one token, so a larger cap never binds); omit it for no cap")
    return k


def candidate_types(batch_time: BatchTime, token_budget: int, max_batch_requests: int | None,
                    max_prefill_chunk: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, t_b) of the prefill-only, mixed and decode-only types of every load b (see module doc).

    ``max_prefill_chunk`` L (None: unbounded, as in Theorem 10) caps the prefill tokens one request
    gives a batch, so x prefill tokens take at least ceil(x/L) request slots.
    """
    b = np.arange(1, token_budget + 1)
    t = np.asarray(batch_time.table(token_budget)[1:])   # validated finite and > 0
    k = token_budget if max_batch_requests is None else max_batch_requests
    prefill = np.ones(len(b), dtype=bool)
    slots = np.ones(len(b), dtype=b.dtype)   # prefill requests of the mixed type
    if max_prefill_chunk is not None and max_prefill_chunk < token_budget:
        chunk = max_prefill_chunk
        prefill = -(-b // chunk) <= k
        if chunk > 1:   # j requests with y = k - j decodes need b - k + j <= j·L
            slots = np.maximum(1, -(-(b - k) // (chunk - 1)))
        else:           # one token per request: any mix with b <= k
            prefill &= b <= k
    y_mixed = np.minimum(k - slots, b - 1)
    mixed = (y_mixed > 0) & prefill
    decode = b <= k
    x = np.concatenate([b[prefill], (b - y_mixed)[mixed], np.zeros(np.count_nonzero(decode), dtype=b.dtype)])
    y = np.concatenate([np.zeros(np.count_nonzero(prefill), dtype=b.dtype), y_mixed[mixed], b[decode]])
    return x, y, np.concatenate([t[prefill], t[mixed], t[decode]])


def stability_region(batch_time: BatchTime | Mapping | None, token_budget: int,
                     max_batch_requests: int | None = None, max_prefill_chunk: int | None = None) -> Region:
    """Theorem 10's region for an engine (``batch_time`` a model or its config table).

    ``max_prefill_chunk`` (beyond the paper): the most prefill tokens one request can give a batch,
    e.g. the prompt length of a fixed-length workload; the region it gives is smaller and is still
    an outer bound for every scheduler when no prompt is longer.
    """
    if not isinstance(batch_time, BatchTime):
        batch_time = make_batch_time(batch_time)
    if not batch_time.tokens_only:
        raise ConfigError("engine.batch_time.model", batch_time.name,
                          "a batch time that depends on the token load only (staircase, piecewise_linear, "
                          "constant, table): Theorem 10's region assumes it")
    token_budget = integer(token_budget, "engine.token_budget", 1, what="a batch must fit at least one decode token")
    k = _check_cap(max_batch_requests, token_budget)
    if max_prefill_chunk is not None:
        max_prefill_chunk = integer(max_prefill_chunk, "--max-chunk", 1, what="prefill tokens per request per batch")
    x, y, t = candidate_types(batch_time, token_budget, k, max_prefill_chunk)
    u, v = x / t, y / t
    # Pareto-optimal types (no other type serves at least as much of both): sort by prefill
    # rate descending and keep those whose decode rate beats every faster-prefill type's.
    order = np.lexsort((-v, -u))
    best_v = np.maximum.accumulate(v[order])
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = v[order][1:] > best_v[:-1]
    idx = order[keep][::-1]   # prefill rate ascending, decode rate descending
    pu, pv = u[idx], v[idx]
    head, tail = int(pu[0] > 0), int(pv[-1] > 0)  # close downward: add the axis points if missing
    pu = np.concatenate([[0.0] * head, pu, [pu[-1]] * tail])
    pv = np.concatenate([[pv[0]] * head, pv, [0.0] * tail])
    types = [None] * head + list(idx) + [None] * tail
    vertices = []
    for j in _upper_hull(pu, pv):
        i = types[j]
        batch = None if i is None else BatchType(int(x[i]), int(y[i]), float(t[i]))
        vertices.append(Vertex(float(pu[j]), float(pv[j]), batch))
    return Region(token_budget, k, vertices, max_prefill_chunk)


def _turns(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """For each interior point of a chain: True where it makes a strict right turn."""
    ax, ay = u[1:-1] - u[:-2], v[1:-1] - v[:-2]
    bx, by = u[2:] - u[:-2], v[2:] - v[:-2]
    return ax * by - ay * bx < -TOLERANCE * np.hypot(ax, ay) * np.hypot(bx, by)


def _upper_hull(u: np.ndarray, v: np.ndarray) -> list[int]:
    """Indices of the hull vertices of a chain sorted by u: monotone chain, strict right turns."""
    # perf: a point without a right turn between its neighbours is no vertex of the hull,
    # so numpy passes drop such points first (all at once, a few passes); without them a
    # piecewise-linear model at b_max = 65,536 (65k collinear types) took 0.7 s in the loop.
    idx = np.arange(len(u))
    for _ in range(8):
        if len(idx) < 3:
            break
        keep = np.ones(len(idx), dtype=bool)
        keep[1:-1] = _turns(u[idx], v[idx])
        if keep.all():
            break
        idx = idx[keep]
    us, vs = u.tolist(), v.tolist()
    hull: list[int] = []
    for p in idx.tolist():
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            ax, ay, bx, by = us[a] - us[o], vs[a] - vs[o], us[p] - us[o], vs[p] - vs[o]
            if ax * by - ay * bx < -TOLERANCE * math.hypot(ax, ay) * math.hypot(bx, by):
                break
            hull.pop()
        hull.append(p)
    return hull


__all__ = ["BOUNDARY", "INSIDE", "OUTSIDE", "TOLERANCE", "BatchType", "Position", "Region", "Vertex",
           "candidate_types", "served_rates", "stability_region"]
