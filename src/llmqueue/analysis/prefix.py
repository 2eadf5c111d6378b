"""The capacity effect of automatic prefix caching, in closed form (docs/prefix_caching.md).

Theorem 2 (arXiv 2504.07347, §3.2) puts the largest stable arrival rate of one engine at
λ* = (b_max / t_{b_max}) / (m_p + m_d): the capacity in tokens per second over the tokens each
request makes the engine compute.  With prefix caching a request's first h tokens can be found in
the cache; they are in no batch, so a request costs m_p + m_d − E[h] tokens and

    λ*_prefix = (b_max / t_{b_max}) / (m_p + m_d − E[h]).

For the ``shared_prefix = {tokens = N, groups = G}`` workload (model/workload.py) a request with a
prompt of l tokens hits, once its group's system prompt is cached, the full blocks of that prompt
short of its last token (vLLM computes at least the last prompt token: ``max_cache_hit_length =
num_tokens - 1``): ⌊min(N, l − 1) / B⌋ · B tokens, B the block size.  So

    E[h] = B · Σ_{j=1}^{⌊N/B⌋} P(l ≥ jB + 1)

exactly in steady state.  Cold misses lower it in a finite run: the first request of each group
finds nothing (G of them in expectation G(1 − (1 − 1/G)^n) among n requests), and a request that
arrives while the first of its group is still prefilling finds only what that one has scheduled so
far.  Eviction under memory pressure can lower it further; it is not in these formulas (the engine
keeps a group's blocks while any request of the group holds them, and freed ones in LRU order).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from llmqueue.analysis.capacity import capacity
from llmqueue.checks import integer
from llmqueue.model.batch_time import BatchTime
from llmqueue.model.workload import LengthDist


def _clipped_cdf(law: LengthDist, k: int) -> float:
    """P(X <= k) for what ``law.sample`` draws (clipped to [minimum, maximum])."""
    if k < law.minimum:
        return 0.0
    if law.maximum is not None and k >= law.maximum:
        return 1.0
    return float(law._cdf(k))


def hit_tokens(prompt_len: int, tokens: int, block_size: int) -> int:
    """Tokens a request with a ``prompt_len``-token prompt finds cached once its group's system prompt
    of ``tokens`` tokens is: ⌊min(N, l − 1) / B⌋ · B."""
    return (min(tokens, prompt_len - 1) // block_size) * block_size


def expected_hit(prompt: LengthDist | np.ndarray, tokens: int, block_size: int) -> float:
    """E[h] in steady state for prompt lengths of law ``prompt`` (exact), or the mean over the given
    prompt lengths (a trace)."""
    tokens = integer(tokens, "shared_prefix.tokens", 1)
    block_size = integer(block_size, "engine.block_size", 1)
    if isinstance(prompt, LengthDist):
        return float(block_size * sum(1.0 - _clipped_cdf(prompt, j * block_size)
                                      for j in range(1, tokens // block_size + 1)))
    lengths = np.asarray(prompt, dtype=np.int64)
    return float(((np.minimum(tokens, lengths - 1) // block_size) * block_size).mean()) if len(lengths) else 0.0


def first_of_group(groups: int, n: int) -> float:
    """Expected number of groups that occur among ``n`` requests drawn uniformly: the cold misses."""
    return groups * (1.0 - (1.0 - 1.0 / groups) ** n)


@dataclass(frozen=True)
class PrefixCapacity:
    """Theorem 2's λ* without and with the tokens found in the cache."""

    capacity_tokens_per_s: float     # b_max / t_{b_max}
    tokens_per_request: float        # m_p + m_d
    mean_hit: float                  # E[h]
    computed_per_request: float      # m_p + m_d − E[h]
    max_stable_rate_rps: float       # λ* without prefix caching
    max_stable_rate_prefix_rps: float  # λ* with it
    gain: float                      # their ratio (m_p + m_d) / (m_p + m_d − E[h])
    saved_share: float               # E[h] / (m_p + m_d): the share of the work the cache does

    def to_dict(self) -> dict:
        return asdict(self)


def prefix_capacity(batch_time: BatchTime, token_budget: int, mean_prompt_len: float, mean_output_len: float,
                    mean_hit: float) -> PrefixCapacity:
    """λ* = (b_max / t_{b_max}) / (m_p + m_d − E[h])."""
    per_request = mean_prompt_len + mean_output_len
    if not 0 <= mean_hit < per_request:
        raise ValueError(f"mean hit {mean_hit} must be in [0, m_p + m_d = {per_request})")
    _, cap, _, _ = capacity(batch_time, token_budget)
    computed = per_request - mean_hit
    return PrefixCapacity(cap, per_request, mean_hit, computed, cap / per_request, cap / computed,
                          per_request / computed, mean_hit / per_request)


__all__ = ["PrefixCapacity", "expected_hit", "first_of_group", "hit_tokens", "prefix_capacity"]
