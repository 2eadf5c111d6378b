"""Closed-form analysis of one engine: Theorem 2 (arXiv 2504.07347 §3.2).

* capacity      b_max / t_{b_max} tokens/s: every work-conserving scheduler is stable
                below it (Theorem 2b) and every scheduler unstable above it (2a, under
                Assumption 1);
* offered load  λ (m_p + m_d) tokens/s, utilisation ρ = offered / capacity;
* λ*            capacity / (m_p + m_d), the largest stable arrival rate;
* fluid growth  max(0, offered − capacity): the backlog's growth rate above capacity.

Without Assumption 1 (e.g. b0 not dividing b_max) a smaller batch can serve more tokens
per second than a full one; ``peak_tokens_per_s`` = max_b b/t_b is then the bound of
Theorem 2a while the work-conserving boundary stays ``capacity_tokens_per_s``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from llmqueue.model.batch_time import BatchTime


@dataclass(frozen=True)
class Analysis:
    token_budget: int
    batch_time_s: float                 # t_{b_max}
    capacity_tokens_per_s: float        # b_max / t_{b_max}
    peak_tokens_per_s: float            # max over b <= b_max of b / t_b
    peak_batch_tokens: int              # the b that attains it
    arrival_rate: float                 # λ, requests/s
    mean_prompt_len: float              # m_p
    mean_output_len: float              # m_d
    offered_tokens_per_s: float         # λ (m_p + m_d)
    rho: float                          # offered / capacity
    max_stable_rate_rps: float          # λ* = capacity / (m_p + m_d)
    fluid_growth_tokens_per_s: float    # max(0, offered − capacity)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


def capacity(batch_time: BatchTime, token_budget: int) -> tuple[float, float, float, int]:
    """(t_{b_max}, b_max / t_{b_max}, max_b b / t_b, argmax b) for one engine."""
    b = np.arange(1, token_budget + 1)
    rates = b / batch_time.seconds(b)
    peak = int(np.argmax(rates))
    t_full = float(batch_time.seconds(np.asarray([token_budget]))[0])
    return t_full, token_budget / t_full, float(rates[peak]), int(b[peak])


def analyze(batch_time: BatchTime, token_budget: int, arrival_rate: float, mean_prompt_len: float,
            mean_output_len: float, max_batch_requests: int | None = None) -> Analysis:
    """Theorem 2's numbers for an engine and a workload."""
    t_full, cap, peak, peak_b = capacity(batch_time, token_budget)
    per_request = mean_prompt_len + mean_output_len
    offered = arrival_rate * per_request
    notes = list(batch_time.assumption_warnings(token_budget))
    if peak > cap * (1 + 1e-12):
        notes.append(f"batches of {peak_b} tokens serve {peak:.1f} tokens/s, more than full batches "
                     f"({cap:.1f}); a scheduler could exceed the work-conserving capacity")
    if max_batch_requests is not None:
        notes.append("with max_batch_requests set, stability is a 2-D region (paper §6); "
                     "Theorem 2's capacity is only an upper bound")
    return Analysis(
        token_budget=token_budget,
        batch_time_s=t_full,
        capacity_tokens_per_s=cap,
        peak_tokens_per_s=peak,
        peak_batch_tokens=peak_b,
        arrival_rate=arrival_rate,
        mean_prompt_len=mean_prompt_len,
        mean_output_len=mean_output_len,
        offered_tokens_per_s=offered,
        rho=offered / cap,
        max_stable_rate_rps=cap / per_request,
        fluid_growth_tokens_per_s=max(0.0, offered - cap),
        notes=tuple(notes),
    )
