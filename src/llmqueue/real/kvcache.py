"""The KV-cache pool: preallocated K and V for a stated number of token slots (PAPER.md §7).

Every request reserves, when it is admitted, one contiguous run of ``v_p + v_d`` slots
(first fit), enough for its whole life, so no request is ever preempted; a request for which
no such run is free waits, in arrival order, outside the engine (the schedulers plan only
among admitted requests).  Contiguous runs let attention read a request's K/V as a view
without copying; the price is fragmentation, which the recorded use shows
(docs/real_engine.md).
"""

from __future__ import annotations

from bisect import insort

import torch

from llmqueue.checks import integer
from llmqueue.real.model import DTYPES, ModelConfig


class KVPool:
    """K and V tensors of shape [layer, kv_head, slot, head_dim] and a first-fit allocator."""

    def __init__(self, config: ModelConfig, capacity_tokens: int) -> None:
        self.capacity_tokens = integer(capacity_tokens, "real.kv_capacity_tokens", 1)
        shape = (config.num_layers, config.num_kv_heads, self.capacity_tokens, config.head_dim)
        dtype = DTYPES[config.dtype]
        # torch.zeros maps untouched pages lazily: a large pool costs memory only as it fills.
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.bytes = 2 * self.k.numel() * self.k.element_size()
        self._free: list[tuple[int, int]] = [(0, self.capacity_tokens)]   # sorted (start, end) runs
        self.reserved_tokens = 0

    @property
    def largest_free_run(self) -> int:
        return max((end - start for start, end in self._free), default=0)

    def reserve(self, num_tokens: int) -> int | None:
        """Start of a free run of ``num_tokens`` slots (first fit), or None if none is free."""
        for i, (start, end) in enumerate(self._free):
            if end - start >= num_tokens:
                if end - start == num_tokens:
                    del self._free[i]
                else:
                    self._free[i] = (start + num_tokens, end)
                self.reserved_tokens += num_tokens
                return start
        return None

    def release(self, start: int, num_tokens: int) -> None:
        """Return a run; neighbouring free runs merge."""
        insort(self._free, (start, start + num_tokens))
        merged: list[tuple[int, int]] = []
        for s, e in self._free:
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self._free = merged
        self.reserved_tokens -= num_tokens
