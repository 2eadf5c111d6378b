"""Request state and the one function that advances it (arXiv 2504.07347 §3.1).

A request ``i`` brings ``num_prompt_tokens`` (v_p) prefill tokens and ``num_output_tokens``
(v_d) decode tokens.  Its state is the remaining prefill ``prefill_left`` (p_i) and the
remaining decode ``decode_left`` (d_i).  Timing convention (documented in docs/model.md):
the batch that finishes a request's prefill emits its first output token, so
``first_token_time`` is that batch's end; ``finish_time`` is the end of the batch that
gives its last decode token (or of its last prefill chunk when v_d = 0).
"""

from __future__ import annotations

from collections.abc import Sequence


class Request:
    """One request inside an engine.  ``None`` means "not yet" for the time fields."""

    # perf: __slots__ halves attribute access time and memory (millions of requests).
    __slots__ = (
        "rid",
        "arrival_time",
        "num_prompt_tokens",
        "num_output_tokens",
        "prefill_left",
        "decode_left",
        "first_token_time",
        "finish_time",
        "stamp",
        "preemptions",
        "peak",
        "recomputed",
        "content",
        "blocks",
        "ncached",
        "hit",
    )

    def __init__(self, rid: int, arrival_time: float, num_prompt_tokens: int, num_output_tokens: int) -> None:
        self.rid = rid
        self.arrival_time = arrival_time
        self.num_prompt_tokens = num_prompt_tokens
        self.num_output_tokens = num_output_tokens
        self.prefill_left = num_prompt_tokens
        self.decode_left = num_output_tokens
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        # KV memory (model/kv.py): admission order among running requests, times preempted, most
        # tokens of its sequence held before a preemption, tokens computed again since
        self.stamp = rid
        self.preemptions = 0
        self.peak = 0
        self.recomputed = 0
        # prefix caching (model/kv.py, docs/prefix_caching.md): the spans its prompt starts with
        # (None: all its tokens are its own), its blocks and how many are cached, tokens found cached
        self.content = None
        self.blocks = None
        self.ncached = 0
        self.hit = 0

    def __repr__(self) -> str:
        return (
            f"Request(rid={self.rid}, prefill_left={self.prefill_left}/{self.num_prompt_tokens}, "
            f"decode_left={self.decode_left}/{self.num_output_tokens})"
        )


def apply_batch(prefill: Sequence[tuple[Request, int]], decode: Sequence[Request], end_time: float) -> list[Request]:
    """Apply one finished batch to its requests; return the requests it finished.

    The only place where request state changes.  ``prefill`` holds (request, chunk)
    pairs, ``decode`` the requests that get one decode token; a request is never in
    both (constraint 6a), and appears at most once in ``decode`` (constraint 6c).
    """
    finished = []
    for request, chunk in prefill:
        left = request.prefill_left - chunk
        request.prefill_left = left
        if left == 0:
            if request.first_token_time is None:   # a recompute after preemption keeps its first token
                request.first_token_time = end_time
            if request.decode_left == 0:
                request.finish_time = end_time
                finished.append(request)
    # perf: the decode loop runs once per decode token of the whole run (the
    # simulator's hottest line); it is kept inline rather than calling a helper.
    for request in decode:
        left = request.decode_left - 1
        request.decode_left = left
        if left == 0:
            request.finish_time = end_time
            finished.append(request)
    return finished
