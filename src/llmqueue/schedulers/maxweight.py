"""Max-weight batch shapes: a scheduler for the 2-D region under a request cap (paper §6; beyond it).

Under a cap k_max the stability region is 2-D (arXiv 2504.07347 §6, Theorem 10, ``llmqueue.analysis.region``):
its corners are batch *types*; for the paper's staircase and k_max = 100, vertex C is 29 prefill
+ 99 decode tokens in a 128-token batch (46.75 ms).  Sarathi with b_max = 1024 fills each batch
to the budget, so next to 99 decoders it runs a whole 290-token prompt (389 tokens, 153 ms) and
serves decodes three times slower than C; the paper leaves open which policy reaches the region.

``maxweight`` is decode first, like Sarathi, but chooses each batch's *shape*: the token load
b <= b_max, and, when decoders fill the cap, whether one decode slot goes to a prefill chunk,
maximising the backlog-weighted token rate of the batch

    score = (P·x + D·y) / t_b

with P the engine's remaining prefill tokens, D the remaining decode tokens of its decoding
requests, x and y the batch's prefill and decode tokens.  This is the max-weight rule
(Tassiulas–Ephremides) over the region's batch types, per unit of time since types last
different times: a large decode backlog picks short batches that keep k_max - 1 decoders
moving (vertex C), a large prefill backlog picks full ones (the prefill corner), and whichever
backlog grows gets the weight.  Requests are served FCFS within each queue.

Search: for a given number of decodes the score is linear in (b/t_b, 1/t_b).  When t_b never
decreases, a load inside a plateau of t is beaten by the plateau's end (or by the range's end),
and over the plateau ends the points form a polyline, so the maximum lies at a range end, at
the plateau ends next to them or at a break of that polyline; a t_b that decreases somewhere
(a measured table) uses the polyline over every load.  Every model of the project is piecewise
linear in b, so the search is exact (a property test checks it against every load) and looks
at a handful of loads per batch.

As a plan: the load rule :class:`MaxWeightLoad` chooses the batch's load b and its number of
decodes y, then the steps (decodes FCFS, at most y; prefill chunks FCFS, split) fill it.
Not work-conserving (Eq. 8): it leaves budget unused on purpose.  The load rule needs the
engine's batch-time model; :class:`~llmqueue.core.engine.Engine` binds it at construction.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import islice
from operator import attrgetter

import numpy as np

from llmqueue.errors import InternalError
from llmqueue.schedulers.base import EngineState, Scheduler
from llmqueue.schedulers.plan import MAX_WEIGHT_LOAD, Decodes, LoadRule, Plan, Prefills

_TOLERANCE = 1e-9
_DECODE_LEFT = attrgetter("decode_left")


def _breaks(u: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Mask of the points of the polyline (u, s) where it turns, both ends included."""
    keep = np.ones(len(u), dtype=bool)
    if len(u) > 2:
        ax, ay, bx, by = u[1:-1] - u[:-2], s[1:-1] - s[:-2], u[2:] - u[:-2], s[2:] - s[:-2]
        keep[1:-1] = np.abs(ax * by - ay * bx) > _TOLERANCE * np.hypot(ax, ay) * np.hypot(bx, by)
    return keep


class MaxWeightLoad(LoadRule):
    """The max-weight load rule, bound to an engine's batch time (see the module doc)."""

    code = MAX_WEIGHT_LOAD

    def __init__(self, batch_time, token_budget: int) -> None:
        """Learn t_b for b = 1..token_budget and the candidate loads (see the module doc)."""
        t = np.asarray(batch_time.table(token_budget)[1:])
        b = np.arange(1, token_budget + 1)
        if np.all(np.diff(t) >= 0):
            # A load is useful when every larger load takes strictly longer (the plateau ends of
            # a staircase); any other load is beaten by a larger one that is as fast.
            useful = b[np.append(t[:-1] < t[1:], True)]
        else:
            # t decreases somewhere (a measured table): which larger load is as fast depends on the
            # range, so keep every load; t is still piecewise linear, so the breaks stay few.
            useful = b
        self.seconds = [0.0, *t.tolist()]
        self.useful = useful.tolist() if len(useful) < len(b) else None   # None: every load is useful
        self.breaks = useful[_breaks(useful / t[useful - 1], 1.0 / t[useful - 1])].tolist()
        self.budget = token_budget

    def _loads(self, lo: int, hi: int) -> set[int]:
        """Candidate loads in [lo, hi]: both ends, the useful loads next to them, the breaks."""
        useful, breaks = self.useful, self.breaks
        out = {lo, hi}
        out.update(breaks[bisect_left(breaks, lo):bisect_right(breaks, hi)])
        if useful is None:   # every load is useful
            return out
        i = bisect_left(useful, lo)
        if i < len(useful) and useful[i] <= hi:
            out.add(useful[i])
        j = bisect_right(useful, hi) - 1
        if j >= 0 and useful[j] >= lo:
            out.add(useful[j])
        return out

    def choose(self, state: EngineState) -> tuple[int, int]:
        """(token load, decode tokens) of the max-weight batch shape for ``state``."""
        if self.budget != state.token_budget:
            raise InternalError("maxweight's load rule is bound to another token budget")
        seconds = self.seconds
        budget = state.token_budget
        k = state.max_batch_requests or budget   # no cap: a batch never holds more than b_max requests
        decoding, prefilling = state.decoding, state.prefilling
        prefill_left = state.total_prefill_left
        # perf: D is only needed to weigh decodes against prefill; map(attrgetter) halves the cost
        # of a generator (the sum was a quarter of a Fig. 1 run's time).
        decode_left = sum(map(_DECODE_LEFT, decoding)) if prefill_left and decoding else 0
        y_all = min(len(decoding), k, budget)
        shapes = [y_all]
        if prefill_left and y_all == k:   # the cap is full of decoders: one slot may go to a prefill chunk
            shapes.append(k - 1)
        best = (-1.0, 0, 0)
        for y in shapes:
            slots, room = k - y, budget - y
            x_cap = 0
            if prefill_left and slots and room:
                if slots >= room:   # every prompt takes >= 1 token: the slots never bind
                    x_cap = min(room, prefill_left)
                else:
                    for request in islice(prefilling, slots):
                        x_cap += request.prefill_left
                        if x_cap >= room:
                            break
                    x_cap = min(x_cap, room)
            lo, hi = max(y, 1), y + x_cap
            if hi < lo:
                continue
            for b in self._loads(lo, hi):
                score = (prefill_left * (b - y) + decode_left * y) / seconds[b]
                if score > best[0] or (score == best[0] and b > best[1]):
                    best = (score, b, y)
        _, load, y = best
        return load, y


class MaxWeight(Scheduler):
    name = "maxweight"
    summary = "decode first; batch load chosen by max-weight over the cap's 2-D region (paper §6)"
    work_conserving = False

    def compose(self) -> Plan:
        return Plan((Decodes(), Prefills(split=True)), load=MaxWeightLoad)
