"""Batch plans and the one place where budget arithmetic happens (arXiv 2504.07347 §3.1).

A scheduler builds a :class:`BatchPlan` with a :class:`BatchBuilder`, which enforces the
token budget (6d) and the optional request cap k_max (§6); prefill-before-decode (6a) and
one decode token per request (6c) hold because a request is either in the engine's
prefilling queue or in its decoding list, never both, and each is added at most once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llmqueue.model.request import Request


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """An immutable plan for one iteration: prefill chunks and decode tokens."""

    prefill: tuple[tuple[Request, int], ...]
    decode: Sequence[Request]
    num_prefill_tokens: int
    #: KV memory (model/kv.py): running requests preempted while planning, in order, and whether
    #: memory refused anything (the batch may then hold fewer tokens than work conservation asks)
    preempted: tuple[Request, ...] = ()
    memory_limited: bool = False

    @property
    def num_decode_tokens(self) -> int:
        return len(self.decode)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + len(self.decode)

    @property
    def num_requests(self) -> int:
        return len(self.prefill) + len(self.decode)

    def describe(self) -> list[str]:
        """Fig. 8 notation: ``"3d"`` a decode token of request 3, ``"3p2"`` 2 prefill tokens."""
        return [f"{r.rid}d" for r in self.decode] + [f"{r.rid}p{n}" for r, n in self.prefill]


class BatchBuilder:
    """Accumulates one batch under ``token_budget`` and ``max_requests`` (None = no cap)."""

    __slots__ = ("room", "slots", "_prefill", "_decode", "_prefill_tokens")

    def __init__(self, token_budget: int, max_requests: int | None = None) -> None:
        self.room = token_budget
        # perf: "no cap" is a large int so the hot checks stay plain comparisons.
        self.slots = max_requests if max_requests is not None else 1 << 62
        self._prefill: list[tuple[Request, int]] = []
        self._decode: list[Request] = []
        self._prefill_tokens = 0

    @property
    def full(self) -> bool:
        return self.room == 0 or self.slots == 0

    def add_decodes(self, decoding: Sequence[Request], limit: int | None = None) -> int:
        """Give one decode token to the leading requests of ``decoding``; return how many."""
        n = min(len(decoding), self.room, self.slots)
        if limit is not None:
            n = min(n, limit)
        if n <= 0:
            return 0
        # perf: one C-level slice instead of a Python loop over decoding requests.
        self._decode.extend(decoding[:n] if n < len(decoding) else decoding)
        self.room -= n
        self.slots -= n
        return n

    def add_decode(self, request: Request) -> bool:
        """Give one decode token to ``request`` if room and a request slot are left."""
        if self.room == 0 or self.slots == 0:
            return False
        self._decode.append(request)
        self.room -= 1
        self.slots -= 1
        return True

    def add_prefill(self, request: Request, split: bool, max_chunk: int | None = None) -> int:
        """Add a prefill chunk of ``request``; return its size (0 if it did not fit).

        ``split=False`` admits only the whole remaining prompt; ``split=True`` takes as
        much as the room (and ``max_chunk``) allows.
        """
        if self.room == 0 or self.slots == 0:
            return 0
        want = request.prefill_left
        if max_chunk is not None and max_chunk < want:
            want = max_chunk
        chunk = want if want <= self.room else self.room
        if chunk < request.prefill_left and not split:
            return 0
        self._prefill.append((request, chunk))
        self._prefill_tokens += chunk
        self.room -= chunk
        self.slots -= 1
        return chunk

    def add_chunk(self, request: Request, chunk: int) -> None:
        """Add a prefill chunk of ``chunk`` tokens, already cut to the room (1 <= chunk <= room)."""
        self._prefill.append((request, chunk))
        self._prefill_tokens += chunk
        self.room -= chunk
        self.slots -= 1

    def add_prefills(self, prefilling: Iterable[Request], split: bool) -> None:
        """FCFS: prefill the requests in order until the batch is full or one does not fit."""
        for request in prefilling:
            if self.room == 0 or self.slots == 0:
                return
            if self.add_prefill(request, split) < request.prefill_left:
                return

    def build(self, preempted: tuple[Request, ...] = (), memory_limited: bool = False) -> BatchPlan:
        return BatchPlan(tuple(self._prefill), self._decode, self._prefill_tokens, preempted, memory_limited)
