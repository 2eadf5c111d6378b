"""KV-cache memory bounds on the stable arrival rate (docs/memory.md, "Memory-aware capacity").

A request with prompt l and o decode tokens holds l + j tokens of KV during its j-th decode
iteration (j = 1..o; the batch that finishes the prompt emits the first output token), so over its
life it holds

* w = Σ_j (l + j) = l·o + (o + o²)/2 token-iterations (Dong & Cao, arXiv 2604.11001), or
* w_B = Σ_j ceil((l + j)/B) block-iterations in blocks of B tokens (what the engine allocates).

With a cache of M tokens and iterations of mean length t̄, Little's law gives the memory in use,
λ·E[w]·t̄, so stability needs λ·E[w]·t̄ ≤ M: μ = M / (t̄·E[w]) is a **necessary** bound, and
Nie, Si & Zhou (arXiv 2605.04595) show work-conserving policies stable below μ(1 − δ),
δ = ess sup (l + o) / M (**sufficient**; none when the lengths are unbounded).

:func:`memory_rate` is the papers' setting (t̄ given, e.g. one iteration).  :func:`memory_analysis`
is the engine's: at throughput balance a batch carries b̄ = λ·E[l + o]·t̄ tokens and t̄ = t_b(b̄), so
the memory condition is b̄ ≤ b_mem = M·E[l + o]/E[w], and the largest rate is
λ_mem = max_{b ≤ b_mem} b / (E[l + o]·t_b(b)), Theorem 2's λ* with b_max replaced by b_mem.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from llmqueue.analysis.capacity import capacity
from llmqueue.checks import integer, number
from llmqueue.errors import ConfigError
from llmqueue.model.batch_time import BatchTime, Table
from llmqueue.model.kv import DEFAULT_BLOCK_SIZE, KV_POLICIES, RECOMPUTE, RESERVE
from llmqueue.model.workload import Empirical, Fixed, Geometric, LengthDist, LogNormal, Poisson, Uniform, Workload

SOURCES = {
    "token_bound_rps": "Theorem 2 (Dai, Deng, Li, Peng, arXiv 2504.07347, §3.2): λ* = (b_max / t_{b_max}) / E[l + o]",
    "memory_necessary_rps": ("Dong & Cao (arXiv 2604.11001): λ·E[w]·t̄ ≤ M, w = l·o + (o + o²)/2 token-iterations; "
                             "t̄ = t_b(b̄) at throughput balance (fluid fixed point, docs/memory.md)"),
    "memory_necessary_blocks_rps": ("the same in blocks: w_B = Σ_j ceil((l + j)/B) block-iterations against "
                                    "kv_blocks − 1 blocks (the engine's allocation)"),
    "memory_sufficient_rps": ("Nie, Si & Zhou (arXiv 2605.04595): work-conserving policies are stable below "
                              "μ(1 − δ), μ = M/(t̄·E[w]), δ = ess sup (l + o)/M; t̄ from the fixed point"),
    "memory_sufficient_blocks_rps": "the same in blocks: δ_B = ceil(ess sup (l + o)/B)/(kv_blocks − 1)",
}
RESERVE_SOURCE = ("under reserve a request holds its whole prompt + output through its o decode iterations: "
                  "w = o·(l + o), w_B = o·ceil((l + o)/B) (necessary, by the same Little's law)")

_WINDOW = 1 << 20   # support points enumerated per length law; the mass beyond is spread evenly over residues
_TAIL = 1e-15       # laws are enumerated up to their (1 - _TAIL) quantile


# ---- per-request memory, exact --------------------------------------------------------

def token_iterations(prompt, output):
    """w = l·o + (o + o²)/2 = Σ_{j=1..o} (l + j): the token-iterations of KV a request holds over its
    o decode iterations (Dong & Cao, arXiv 2604.11001)."""
    l, o = np.asarray(prompt, dtype=np.float64), np.asarray(output, dtype=np.float64)
    return l * o + (o + o * o) / 2


def _ramp(n, b: int):
    """S(n) = Σ_{k=1..n} ceil(k/b) = n(n + b)/(2b) + r(b − r)/(2b), r = n mod b (exact in integers)."""
    n = np.asarray(n, dtype=object if np.max(n, initial=0) > 2**30 else np.int64)
    q, r = n // b, n % b
    return b * q * (q + 1) // 2 + r * (q + 1)


def block_iterations(prompt, output, block_size: int):
    """w_B = Σ_{j=1..o} ceil((l + j)/B): the block-iterations a request holds when blocks of B tokens
    are allocated as tokens are computed (``kv_policy = "recompute"``)."""
    l, o = np.asarray(prompt, dtype=np.int64), np.asarray(output, dtype=np.int64)
    return np.asarray(_ramp(l + o, block_size) - _ramp(l, block_size), dtype=np.float64)


def reserved_iterations(prompt, output, block_size: int | None = None):
    """o·(l + o) token-iterations (or o·ceil((l + o)/B) block-iterations): a request that reserves its
    whole prompt + output holds it through its o decode iterations (``kv_policy = "reserve"``)."""
    l, o = np.asarray(prompt, dtype=np.float64), np.asarray(output, dtype=np.float64)
    return o * (l + o if block_size is None else np.ceil((l + o) / block_size))


# ---- length laws: the statistics the bounds need -----------------------------------------

@dataclass(frozen=True)
class _Marginal:
    """One length's law: exact mean and E[X²], ess sup, and its pmf enumerated on a window."""

    mean: float
    second: float
    sup: float              # math.inf: unbounded
    values: np.ndarray      # int64 support points
    probs: np.ndarray

    @property
    def tail(self) -> float:
        """Mass beyond the enumerated window (spread evenly over residues)."""
        return max(0.0, 1.0 - float(self.probs.sum()))

    def residues(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(P(X ≡ r), E[X; X ≡ r]) for r = 0..b-1."""
        r = self.values % b
        rho = np.bincount(r, self.probs, minlength=b) + self.tail / b
        first = max(0.0, self.mean - float(self.probs @ self.values.astype(np.float64)))
        return rho, np.bincount(r, self.probs * self.values, minlength=b) + first / b


def _law_window(d: LengthDist) -> tuple[np.ndarray, np.ndarray, float]:
    """(support, pmf, ess sup) of a clipped law, enumerated up to its (1 − 1e-15) quantile (and at most
    2**20 points); the clip puts the mass of Y <= minimum at minimum and of Y >= maximum at maximum."""
    a, b = d.minimum, math.inf if d.maximum is None else d.maximum
    if isinstance(d, Empirical):
        v, counts = np.unique(np.clip(d.values, a, b if d.maximum is not None else None), return_counts=True)
        return v.astype(np.int64), counts / counts.sum(), float(v[-1])
    if isinstance(d, Fixed):
        cdf, top, sup = (lambda k: (k >= d.value).astype(np.float64)), d.value, d.value
    elif isinstance(d, Uniform):
        size = d.high - d.low + 1
        cdf, top, sup = (lambda k: np.clip(k - d.low + 1, 0, size) / size), d.high, d.high
    elif isinstance(d, Poisson):
        from scipy import stats  # here, not at the top: it takes most of a second (docs/performance.md)

        cdf, top, sup = (lambda k: stats.poisson.cdf(k, d.mean_param)), stats.poisson.isf(_TAIL, d.mean_param), math.inf
    elif isinstance(d, Geometric):
        q = 1.0 - 1.0 / d.mean_param
        cdf = lambda k: 1.0 - q ** np.maximum(k, 0)
        top, sup = (math.ceil(math.log(_TAIL) / math.log(q)), math.inf) if q > 0 else (1, 1)
    elif isinstance(d, LogNormal):
        from scipy import stats

        law = stats.lognorm(s=d.sigma, scale=math.exp(math.log(d.mean_param) - d.sigma**2 / 2))
        cdf, top, sup = (lambda k: law.cdf(k + 0.5)), law.isf(_TAIL), math.inf
    else:  # a law this module does not know: moments only, residues taken as uniform
        return np.zeros(0, np.int64), np.zeros(0), b
    top = top if math.isfinite(top) else math.inf        # scipy's isf can fail far in the tail: enumerate the window
    hi = int(min(b, max(top, a), a + _WINDOW))
    k = np.arange(a, hi + 1, dtype=np.int64)
    f = cdf(k)
    p = np.diff(f, prepend=0.0)
    if hi == b and len(k) > 1:
        p[-1] = 1.0 - f[-2]
    elif hi == b:
        p[-1] = 1.0
    return k, np.clip(p, 0.0, None), float(min(max(sup, a), b))


def _marginal(x, weights, field: str) -> _Marginal:
    if isinstance(x, LengthDist):
        values, probs, sup = _law_window(x)
        return _Marginal(x.mean, x.second_moment, sup, values, probs)
    values, w = _rows(x, weights, field)
    v = values.astype(np.float64)
    return _Marginal(float(w @ v), float(w @ (v * v)), float(values[w > 0].max()), values, w)


def _rows(x, weights, field: str) -> tuple[np.ndarray, np.ndarray]:
    """Token counts (int64 >= 0, one per request or class) and their weights, normalised."""
    shape = "a non-empty list of integer token counts >= 0, or a length distribution"
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(field, x, shape) from None
    if arr.ndim != 1 or not arr.size or not np.isfinite(arr).all() or (arr < 0).any() or (arr % 1).any():
        raise ConfigError(field, x, shape)
    if weights is None:
        w = np.full(arr.size, 1.0 / arr.size)
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != arr.shape or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ConfigError("memory.weights", weights, f"{arr.size} finite weights >= 0 with a positive sum "
                              "(the classes' shares of the arrivals)")
        w = w / w.sum()
    return arr.astype(np.int64), w


def _cyclic(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a ⊛ b)[u] = Σ_r a[r]·b[(u − r) mod n]."""
    n = len(a)
    if n <= 1024:
        idx = (np.arange(n)[:, None] + np.arange(n)[None, :]) % n
        return np.bincount(idx.ravel(), (a[:, None] * b[None, :]).ravel(), minlength=n)
    return np.real(np.fft.ifft(np.fft.fft(a) * np.fft.fft(b)))


@dataclass(frozen=True)
class LengthStats:
    """What the memory bounds need from the request lengths, for one block size and policy."""

    mean_request_tokens: float       # E[l + o]
    work_tokens: float               # E[w] token-iterations per request (reserve: E[o·(l + o)])
    work_blocks: float               # E[w_B] block-iterations per request (reserve: E[o·ceil((l + o)/B)])
    max_request_tokens: float | None  # ess sup (l + o); None: unbounded
    block_size: int
    kv_policy: str
    exact: bool                      # False: some law's far tail was taken as evenly spread over residues


def length_stats(prompt, output, *, weights=None, block_size: int = DEFAULT_BLOCK_SIZE,
                 kv_policy: str = RECOMPUTE) -> LengthStats:
    """Exact E[l + o], E[w], E[w_B] and ess sup (l + o).

    ``prompt`` and ``output`` are length laws (independent, as in the synthetic workloads) or arrays of
    token counts; two arrays are joint rows (a trace, or classes with ``weights`` as their shares).
    """
    b = integer(block_size, "engine.block_size", 1, what="tokens per KV block, e.g. 16")
    if kv_policy not in KV_POLICIES:
        raise ConfigError("engine.kv_policy", kv_policy, f"one of {', '.join(KV_POLICIES)}")
    if not isinstance(prompt, LengthDist) and not isinstance(output, LengthDist):
        l, w = _rows(prompt, weights, "memory.prompt")
        o, _ = _rows(output, weights, "memory.output")
        if l.shape != o.shape:
            raise ConfigError("memory.output", output, f"{len(l)} output lengths, one per prompt (joint rows)")
        if kv_policy == RECOMPUTE:
            tokens, blocks = token_iterations(l, o), block_iterations(l, o, b)
        else:
            tokens, blocks = reserved_iterations(l, o), reserved_iterations(l, o, b)
        return LengthStats(float(w @ (l + o)), float(w @ tokens), float(w @ blocks), float((l + o)[w > 0].max()),
                           b, kv_policy, True)
    p, q = _marginal(prompt, weights, "memory.prompt"), _marginal(output, weights, "memory.output")
    (rho_l, _), (rho_o, nu_o) = p.residues(b), q.residues(b)
    r = np.arange(b, dtype=np.float64)
    if kv_policy == RECOMPUTE:   # Σ_j ceil((l+j)/B) = [2lo + o² + Bo + φ(l+o) − φ(l)]/(2B), φ(n) = r(B − r)
        tokens = p.mean * q.mean + (q.mean + q.second) / 2
        phi = r * (b - r)
        blocks = (2 * p.mean * q.mean + q.second + b * q.mean + _cyclic(rho_l, rho_o) @ phi - rho_l @ phi) / (2 * b)
    else:                        # o·ceil((l+o)/B) = o·(l + o + c((l+o) mod B))/B, c(r) = (B − r) mod B
        tokens = p.mean * q.mean + q.second
        blocks = (tokens + _cyclic(rho_l, nu_o) @ ((b - r) % b)) / b
    top = p.sup + q.sup
    exact = p.tail < 1e-12 and q.tail < 1e-12 and (len(p.values) > 0 and len(q.values) > 0)
    return LengthStats(p.mean + q.mean, float(tokens), float(blocks), None if math.isinf(top) else top, b,
                       kv_policy, exact)


def lengths_of(workload: Workload) -> tuple:
    """(prompt, output) of a workload: its length laws, or the trace's own lengths (joint rows)."""
    requests = getattr(workload.arrivals, "requests", None)
    prompt = workload.prompt if workload.prompt is not None else requests.num_prompt_tokens
    output = workload.output if workload.output is not None else requests.num_output_tokens
    return prompt, output


# ---- the papers' setting: t̄ given ---------------------------------------------------------

@dataclass(frozen=True)
class MemoryRate:
    """μ and μ(1 − δ) for a cache of ``memory`` tokens (blocks when ``block_size`` is set)."""

    memory: float
    block_size: int | None
    mean_work: float                 # E[w] per request, token- (or block-) iterations
    iteration_time: float            # t̄
    necessary_rate: float            # μ = M / (t̄·E[w]): unstable above (requests per unit of t̄'s time)
    delta: float | None              # ess sup (l + o) / M (in blocks: ceil(·/B) / M)
    sufficient_rate: float | None    # μ(1 − δ): stable below, for work-conserving policies
    sufficient_reason: str | None    # why there is none


def _sufficient(kv_policy: str, top: float | None, memory: float, block_size: int | None, mu: float):
    if kv_policy == RESERVE:
        return None, None, ("not available: Nie, Si & Zhou's result is for memory allocated as tokens are computed "
                            "(recompute), not for reservations")
    if top is None:
        return None, None, ("not available: the prompt or output law is unbounded, so δ = ess sup (l + o)/M is "
                            "infinite; give the laws a max")
    need = top if block_size is None else math.ceil(top / block_size)
    delta = need / memory
    if delta >= 1:
        unit = "tokens" if block_size is None else "blocks"
        return delta, None, f"not available: the longest request needs {need:g} {unit}, the cache holds {memory:g}"
    return delta, mu * (1 - delta), None


def memory_rate(memory: float, prompt, output, *, weights=None, iteration_time: float = 1.0,
                block_size: int | None = None, kv_policy: str = RECOMPUTE) -> MemoryRate:
    """The papers' bounds with a fixed iteration time t̄ (Dong & Cao; Nie, Si & Zhou): the total
    arrival rate μ = M/(t̄·E[w]) above which memory overflows, and μ(1 − δ).

    ``prompt``/``output``: length laws or token counts (with ``weights``: classes' shares of the
    arrivals; a class k then gets the rate share_k·μ).  ``block_size`` set: ``memory`` is in blocks.
    """
    m = number(memory, "memory", above=0.0)
    t = number(iteration_time, "iteration_time", above=0.0)
    s = length_stats(prompt, output, weights=weights, block_size=block_size or 1, kv_policy=kv_policy)
    work = s.work_tokens if block_size is None else s.work_blocks
    mu = m / (t * work) if work > 0 else math.inf
    delta, suff, reason = _sufficient(kv_policy, s.max_request_tokens, m, block_size, mu)
    return MemoryRate(m, block_size, work, t, mu, delta, suff, reason)


# ---- the engine: t̄ from the batch-time model ------------------------------------------------

def mean_batch_time(batch_time: BatchTime, token_budget: int, arrival_rate: float,
                    mean_request_tokens: float) -> tuple[float, float]:
    """(t̄, b̄) at throughput balance: the least fixed point of b̄ = clip(λ·E[l + o]·t_b(b̄), 1, b_max).

    Exact for staircase, piecewise-linear and constant t_b (found on the integer loads, then solved on
    the unit interval holding it); b̄ = b_max and t̄ = t_{b_max} above capacity.  Assumes t_b
    non-decreasing.
    """
    demand = arrival_rate * mean_request_tokens          # tokens/s to serve
    t_of = lambda b: float(batch_time.seconds(np.asarray([b], dtype=np.float64))[0])
    loads = np.arange(1, token_budget + 1)
    times = batch_time.seconds(loads)
    if demand * times[0] <= 1:
        return float(times[0]), 1.0                      # batches of one token, the engine partly idle
    fits = np.flatnonzero(loads >= demand * times)
    if not fits.size:
        return float(times[-1]), float(token_budget)     # overloaded: full batches
    lo, hi = float(fits[0]), float(fits[0] + 1)          # loads lo fails, hi passes
    while True:
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if mid >= demand * t_of(mid):
            hi = mid
        else:
            lo = mid
    t = t_of(hi)
    return t, min(float(token_budget), max(1.0, demand * t))


def rate_under_load_cap(batch_time: BatchTime, token_budget: int, load_cap: float, mean_request_tokens: float) -> float:
    """max over 0 < b <= load_cap of b / (E[l + o]·t_b(clip(b, 1, b_max))): the largest λ whose balance
    load b̄ stays within ``load_cap`` (Theorem 2's λ* for load_cap = b_max under Assumption 1)."""
    top = min(math.floor(load_cap), token_budget)
    cand = [np.arange(1, top + 1, dtype=np.float64), np.asarray([load_cap], dtype=np.float64)]
    if isinstance(batch_time, Table):                    # breakpoints may fall between integers
        cand.append(batch_time.tokens[(batch_time.tokens >= 1) & (batch_time.tokens <= min(load_cap, token_budget))])
    b = np.concatenate(cand)
    return float(np.max(b / batch_time.seconds(np.clip(b, 1, token_budget)))) / mean_request_tokens


@dataclass(frozen=True)
class MemoryAnalysis:
    """Theorem 2's token bound next to the memory bounds of one engine (rates in requests/s)."""

    kv_blocks: int                       # vLLM's num_gpu_blocks (block 0 reserved)
    block_size: int
    kv_policy: str
    memory_tokens: int                   # M = (kv_blocks − 1)·block_size
    token_budget: int
    mean_request_tokens: float           # E[l + o]
    work_tokens: float                   # E[w] token-iterations per request
    work_blocks: float                   # E[w_B] block-iterations per request
    token_bound_rps: float               # λ*, Theorem 2
    memory_load_cap_tokens: float        # b_mem = M·E[l + o]/E[w]: the balance load memory allows
    memory_load_cap_blocks_tokens: float  # the same with blocks: (kv_blocks − 1)·E[l + o]/E[w_B]
    memory_necessary_rps: float          # in tokens (the papers' model): unstable above
    memory_necessary_blocks_rps: float   # in blocks (the engine's): unstable above
    delta: float | None                  # ess sup (l + o)/M
    delta_blocks: float | None
    memory_sufficient_rps: float | None  # stable below (fluid), or None
    memory_sufficient_blocks_rps: float | None
    sufficient_reason: str | None
    binding: str                         # "tokens" or "memory": the smaller of λ* and the block bound
    max_stable_rate_rps: float           # min(λ*, memory_necessary_blocks_rps)
    arrival_rate: float | None = None
    batch_time_s: float | None = None    # t̄ at the arrival rate
    batch_tokens: float | None = None    # b̄ at the arrival rate
    memory_rho: float | None = None      # λ·E[w_B]·t̄ / (kv_blocks − 1): the cache in use at λ (blocks)
    exact: bool = True
    sources: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sources"] = dict(self.sources)
        d["notes"] = list(self.notes)
        return d


def memory_analysis(batch_time: BatchTime, token_budget: int, kv_blocks: int, lengths, *, weights=None,
                    block_size: int = DEFAULT_BLOCK_SIZE, kv_policy: str = RECOMPUTE,
                    arrival_rate: float | None = None) -> MemoryAnalysis:
    """Theorem 2's token bound and the memory bounds of one engine with a cache of ``kv_blocks``.

    ``lengths``: a :class:`Workload` (its arrival rate is used unless ``arrival_rate`` is given) or a
    (prompt, output) pair as :func:`length_stats` takes.  t̄ is this project's batch time at the
    balance load (:func:`mean_batch_time`); the memory bounds are fluid: docs/memory.md.
    """
    blocks = integer(kv_blocks, "engine.kv_blocks", 2, what="vLLM's num_gpu_blocks: block 0 is reserved")
    size = integer(block_size, "engine.block_size", 1, what="tokens per KV block, e.g. 16")
    budget = integer(token_budget, "engine.token_budget", 1)
    if isinstance(lengths, Workload):
        rate = lengths.arrival_rate if arrival_rate is None else arrival_rate
        prompt, output = lengths_of(lengths)
    elif isinstance(lengths, Sequence) and len(lengths) == 2:
        rate, (prompt, output) = arrival_rate, lengths
    else:
        raise ConfigError("memory.lengths", lengths, "a Workload or a (prompt, output) pair")
    s = length_stats(prompt, output, weights=weights, block_size=size, kv_policy=kv_policy)
    m = s.mean_request_tokens
    _, cap, _, _ = capacity(batch_time, budget)
    token_bound = cap / m
    usable = blocks - 1
    memory = usable * size
    cap_tokens = memory * m / s.work_tokens if s.work_tokens > 0 else math.inf
    cap_blocks = usable * m / s.work_blocks if s.work_blocks > 0 else math.inf
    nec = rate_under_load_cap(batch_time, budget, cap_tokens, m)
    nec_b = rate_under_load_cap(batch_time, budget, cap_blocks, m)
    delta, suff, reason = _sufficient(kv_policy, s.max_request_tokens, memory, None, 1.0)
    delta_b, suff_b, _ = _sufficient(kv_policy, s.max_request_tokens, usable, size, 1.0)
    if suff is not None:
        suff = rate_under_load_cap(batch_time, budget, cap_tokens * (1 - delta), m)
    if suff_b is not None:
        suff_b = rate_under_load_cap(batch_time, budget, cap_blocks * (1 - delta_b), m)
    notes = []
    if s.max_request_tokens is not None and math.ceil(s.max_request_tokens / size) > usable:
        notes.append(f"the longest request ({s.max_request_tokens:g} tokens) does not fit in {usable} blocks of "
                     f"{size}: it can never finish, so no rate is stable if it arrives")
    if not s.exact:
        bound = f"{size / 8:g}" if kv_policy == RECOMPUTE else f"E[o]·{(size - 1) / size:.3g}"
        notes.append("block rounding: a length law's far tail (past its first 2**20 token counts, or a law this "
                     f"analysis does not know) is taken as evenly spread over residues mod {size}; E[w_B] is then "
                     f"within {bound} block-iterations of exact")
    if isinstance(batch_time, Table) and np.any(np.diff(batch_time.secs) < 0):
        notes.append("the batch-time table decreases somewhere: the fixed point assumes t_b non-decreasing")
    sources = dict(SOURCES)
    if kv_policy == RESERVE:
        sources["memory_necessary_rps"] = f"{SOURCES['memory_necessary_rps']}; {RESERVE_SOURCE}"
    t_bar = b_bar = rho = None
    if rate is not None:
        rate = number(rate, "workload.rate", at_least=0.0)
        t_bar, b_bar = mean_batch_time(batch_time, budget, rate, m)
        rho = rate * s.work_blocks * t_bar / usable
    binding = "memory" if nec_b < token_bound else "tokens"
    return MemoryAnalysis(
        kv_blocks=blocks, block_size=size, kv_policy=kv_policy, memory_tokens=memory, token_budget=budget,
        mean_request_tokens=m, work_tokens=s.work_tokens, work_blocks=s.work_blocks, token_bound_rps=token_bound,
        memory_load_cap_tokens=cap_tokens, memory_load_cap_blocks_tokens=cap_blocks,
        memory_necessary_rps=nec, memory_necessary_blocks_rps=nec_b, delta=delta, delta_blocks=delta_b,
        memory_sufficient_rps=suff, memory_sufficient_blocks_rps=suff_b, sufficient_reason=reason,
        binding=binding, max_stable_rate_rps=min(token_bound, nec_b), arrival_rate=rate, batch_time_s=t_bar,
        batch_tokens=b_bar, memory_rho=rho, exact=s.exact, sources=tuple(sources.items()), notes=tuple(notes))


__all__ = ["KV_POLICIES", "LengthStats", "MemoryAnalysis", "MemoryRate", "RECOMPUTE", "RESERVE", "block_iterations",
           "length_stats", "lengths_of", "mean_batch_time", "memory_analysis", "memory_rate", "rate_under_load_cap",
           "reserved_iterations", "token_iterations"]
