"""The KV-cache pools of the real engine: preallocated K and V (docs/real_engine.md).

:class:`KVPool` (without ``engine.kv_blocks``): every request reserves, when it is admitted, one contiguous run of ``v_p + v_d`` slots
(first fit), enough for its whole life, so no request is ever preempted; a request for which
no such run is free waits, in arrival order, outside the engine (the schedulers plan only
among admitted requests).  Contiguous runs let attention read a request's K/V as a view
without copying; the price is fragmentation, which the recorded use shows
(docs/real_engine.md).

:class:`PagedKVPool` (with ``engine.kv_blocks``): exactly that many blocks of ``block_size``
slots, block 0 reserved; each request has a block table, and the engine's memory model
(:class:`~llmqueue.model.kv.KVCache`) decides admission, allocation and preemption, which the
executor mirrors block for block (``real/serve.py``, ``PagedExecutor``).
"""

from __future__ import annotations

from bisect import insort
from collections import deque

import torch

from llmqueue.checks import integer
from llmqueue.errors import InternalError
from llmqueue.model.kv import KVCache
from llmqueue.real.model import DTYPES, ModelConfig


class KVPool:
    """K and V tensors of shape [layer, kv_head, slot, head_dim] and a first-fit allocator."""

    paged = False

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


class PagedKVPool:
    """A paged pool: ``kv.blocks`` blocks of ``kv.block_size`` token slots, as the engine's
    :class:`~llmqueue.model.kv.KVCache` counts them (block 0 reserved, never handed out).

    K and V have the contiguous pool's layout, [layer, kv_head, slot, head_dim], with slot
    ``block * block_size + offset``; a request's block table maps its positions to slots.
    Free blocks are handed out from the front of a queue and returned to its back (vLLM's free
    block queue, without prefix caching).
    """

    paged = True

    def __init__(self, config: ModelConfig, kv: KVCache) -> None:
        self.kv = kv
        self.block_size = kv.block_size
        self.capacity_tokens = kv.tokens              # usable slots (blocks 1 .. kv_blocks - 1)
        shape = (config.num_layers, config.num_kv_heads, kv.blocks * kv.block_size, config.head_dim)
        dtype = DTYPES[config.dtype]
        self.k = torch.zeros(shape, dtype=dtype)       # lazily mapped pages, as in KVPool
        self.v = torch.zeros(shape, dtype=dtype)
        self.bytes = 2 * self.k.numel() * self.k.element_size()
        self._free: deque[int] = deque(range(1, kv.blocks))
        self._offsets = torch.arange(kv.block_size)

    @property
    def used(self) -> int:
        """Blocks held by requests."""
        return self.kv.usable - len(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    def grow(self, table: list[int], tokens: int) -> None:
        """Extend ``table`` to the ceil(tokens / block_size) blocks that hold ``tokens`` tokens."""
        need = -(-tokens // self.block_size) - len(table)
        if need > len(self._free):
            raise InternalError(f"KV pool: {need} more blocks wanted, {len(self._free)} free "
                                "(the engine's memory model allowed the batch)")
        for _ in range(need):
            table.append(self._free.popleft())

    def release(self, table: list[int]) -> None:
        """Return every block of ``table`` (emptied)."""
        self._free.extend(table)
        table.clear()

    def slots(self, table: list[int], tokens: int) -> torch.Tensor | int:
        """The pool slots of positions 0 .. tokens-1: an int start when the blocks are
        consecutive (attention then reads a view, as in the contiguous pool), else an index."""
        blocks = -(-tokens // self.block_size)
        if consecutive(table[:blocks]):
            return table[0] * self.block_size
        return self.index(table[:blocks])[:tokens]

    def index(self, table: list[int]) -> torch.Tensor:
        """The slot of every position the blocks of ``table`` hold (block_size per block)."""
        return (torch.tensor(table).unsqueeze(1) * self.block_size + self._offsets).flatten()


def consecutive(table: list[int]) -> bool:
    """Whether the blocks follow one another (one contiguous run of slots)."""
    first = table[0]
    return table[-1] - first == len(table) - 1 and all(table[j] == first + j for j in range(1, len(table) - 1))
