"""One engine advanced piecewise: admit, advance, read what finished, continue (paper §3.1).

A :class:`Stepper` is the engine core seen from a caller that decides as it goes (a router, a
load generator, a controller): it admits requests (arrival times non-decreasing), advances the
engine until a time or until the first batch that finishes a request, and says what finished.
The batches are those of one :func:`~llmqueue.core.simulator.simulate` run of the same arrivals,
however the advance is cut (tests/test_core.py checks random cuts against one run).  It runs on
the compiled core where :func:`llmqueue.core.fastcore.reason` allows (each advance is one call that
resumes with the requests still in the engine), else on the reference loop (:meth:`Engine.step`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmqueue.core import fastcore
from llmqueue.core.engine import Engine
from llmqueue.errors import ConfigError
from llmqueue.model.kv import check_content
from llmqueue.model.request import Request


@dataclass(frozen=True)
class Advanced:
    """What one :meth:`Stepper.advance` did: the engine's time after it, the requests that
    finished (ids, first-token and finish times, in id order), those rejected, and its batches."""

    now: float
    finished: np.ndarray
    first_token_time: np.ndarray
    finish_time: np.ndarray
    rejected: np.ndarray
    batch_end_time: np.ndarray
    batch_tokens: np.ndarray


class _Contents(dict):
    """Request id -> content, None for a request given none."""

    def __missing__(self, rid):
        return None


class Stepper:
    """``engine`` (fresh: no requests in it) advanced piecewise; ``method`` as for simulate()."""

    def __init__(self, engine: Engine, *, method: str = "fast") -> None:
        if method not in ("fast", "reference"):
            raise ConfigError("run.method", method, "one of fast, reference")
        if engine.num_in_engine or engine.rejected or engine.violations:
            raise ConfigError("engine", "an engine that already holds requests", "a fresh engine")
        self.engine = engine
        why = fastcore.reason(engine, piecewise=True) if method == "fast" else "selected"
        self.method = "fast" if why is None else f"reference ({why})"
        self.now = 0.0
        self._arrivals: list[np.ndarray] = []   # admitted by the caller, not yet seen by the engine
        self._prompts: list[np.ndarray] = []
        self._outputs: list[np.ndarray] = []
        self._rids: list[np.ndarray] = []
        self._computed: dict[int, int] = {}   # request id -> computed context tokens (admit(computed=...))
        self._next_rid = 0
        self._last_arrival = -np.inf
        self._carried: fastcore.Call | None = None
        self._requests: dict[int, Request] = {}   # reference: requests inside the engine, by id
        self._durations = np.asarray(engine.durations, dtype=np.float64)

    def admit(self, arrival_time, num_prompt_tokens, num_output_tokens, content=None, computed=None) -> np.ndarray:
        """Queue requests that arrive at these times (non-decreasing, none before an earlier
        one); a request arriving before the engine's time joins its next batch boundary.
        Returns their ids (0, 1, ... in admission order).  ``content`` (prefix caching,
        docs/prefix_caching.md): one content description per request (a tuple of spans, or None).
        ``computed`` (KV memory): per request, the tokens of its prompt whose KV is already on this
        engine (0 to prompt − 1; prefill/decode disaggregation, docs/cluster.md): they hold blocks from
        its admission, which waits until blocks for its whole sequence are free."""
        times = np.atleast_1d(np.asarray(arrival_time, dtype=np.float64))
        prompts = np.atleast_1d(np.asarray(num_prompt_tokens, dtype=np.int64))
        outputs = np.atleast_1d(np.asarray(num_output_tokens, dtype=np.int64))
        if not (len(times) == len(prompts) == len(outputs)):
            raise ConfigError("admit", (len(times), len(prompts), len(outputs)), "arrays of one length")
        if len(times) == 0:
            return np.zeros(0, np.int64)
        if not np.all(np.isfinite(times)) or np.any(np.diff(times) < 0) or times[0] < self._last_arrival:
            raise ConfigError("admit.arrival_time", times.tolist()[:5],
                              f"finite times in non-decreasing order, none before {self._last_arrival}")
        if np.any(prompts < 1) or np.any(outputs < 0):
            raise ConfigError("admit.num_prompt_tokens", prompts.tolist()[:5],
                              "prompts of at least 1 token and outputs of at least 0")
        rids = np.arange(self._next_rid, self._next_rid + len(times), dtype=np.int64)
        if computed is not None:
            computed = np.atleast_1d(np.asarray(computed))
            if len(computed) != len(times):
                raise ConfigError("admit.computed", len(computed), f"one count per request ({len(times)})")
            if computed.dtype.kind not in "iu" or np.any(computed < 0) or np.any(computed >= prompts):
                raise ConfigError("admit.computed", computed.tolist()[:5], "integers from 0 to the prompt's "
                                  "length − 1 (its last token is computed here)")
            if np.any(computed) and (self.engine.kv is None or getattr(self.engine, "pool", None) is not None):
                raise ConfigError("admit.computed", "given", "an engine with kv_blocks and without prefix "
                                  "caching (computed context matters only as KV blocks held)")
            self._computed.update((r, c) for r, c in zip(rids.tolist(), computed.tolist()) if c)
        if content is not None:
            if getattr(self.engine, "pool", None) is None:
                raise ConfigError("admit.content", "given", "an engine with prefix_caching = true (else "
                                  "nothing is shared and the content has no effect)")
            if len(content) != len(times):
                raise ConfigError("admit.content", len(content), f"one content per request ({len(times)})")
            if self.engine.contents is None:
                self.engine.contents = _Contents()
            for rid, c, prompt in zip(rids.tolist(), content, prompts.tolist()):
                if c is not None:
                    self.engine.contents[rid] = check_content(c, prompt, "admit.content")
        self._next_rid += len(times)
        self._last_arrival = float(times[-1])
        self._arrivals.append(times)
        self._prompts.append(prompts)
        self._outputs.append(outputs)
        self._rids.append(rids)
        return rids

    @property
    def num_in_engine(self) -> int:
        """Requests inside the engine (queued or running), not counting those still to arrive."""
        return self.engine.num_in_engine if self._carried is None else int(self._carried.in_engine)

    def in_engine(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, first-token times) of the requests inside the engine now, queued or running (NaN:
        no first token yet), ids ascending.  Finishes report their first tokens; a run cut at a
        horizon also needs those of the requests still running."""
        if self._carried is not None:
            order = np.argsort(self._carried.rid, kind="stable")
            return (np.asarray(self._carried.rid, np.int64)[order],
                    np.asarray(self._carried.first_token_time, np.float64)[order])
        held = sorted(self._requests.values(), key=lambda r: r.rid)
        return (np.array([r.rid for r in held], np.int64),
                np.array([np.nan if r.first_token_time is None else r.first_token_time for r in held], np.float64))

    def advance(self, until: float, *, stop_at_finish: bool = False) -> Advanced:
        """Run the batches that start before ``until`` (the engine stops at the first batch
        boundary at or after it, or idles); with ``stop_at_finish``, return after the first batch
        that finishes a request."""
        until = float(until)
        arrivals, prompts, outputs, rids = (np.concatenate(x) if x else np.zeros(0, t) for x, t in (
            (self._arrivals, np.float64), (self._prompts, np.int64), (self._outputs, np.int64), (self._rids, np.int64)))
        if self.method == "fast":
            return self._advance_compiled(arrivals, prompts, outputs, rids, until, stop_at_finish)
        return self._advance_reference(arrivals, prompts, outputs, rids, until, stop_at_finish)

    def _keep(self, arrivals, prompts, outputs, rids, admitted: int) -> None:
        """Keep the arrivals the engine has not reached yet."""
        self._arrivals, self._prompts = [arrivals[admitted:]], [prompts[admitted:]]
        self._outputs, self._rids = [outputs[admitted:]], [rids[admitted:]]

    def _advance_compiled(self, arrivals, prompts, outputs, rids, until, stop_at_finish) -> Advanced:
        stop = fastcore.UNTIL_FINISH if stop_at_finish else fastcore.UNTIL_HORIZON
        if self._carried is None:  # a first call starts at time 0 (the engine's clock)
            self._carried = fastcore.call(self.engine, np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64), 0.0,
                                          rids=np.zeros(0, np.int64), durations=self._durations)
        c = fastcore.call(self.engine, arrivals, prompts, outputs, until, rids=rids, carried=self._carried, stop=stop,
                          durations=self._durations)
        k = len(self._carried.rid)
        self._keep(arrivals, prompts, outputs, rids, c.admitted - k)
        done = np.flatnonzero(~np.isnan(c.finish_time))
        order = np.argsort(c.rid[done], kind="stable")
        self.engine.violations += c.violations
        self._carried = c.carried()
        self.now = c.now
        return Advanced(c.now, c.rid[done][order], c.first_token_time[done][order], c.finish_time[done][order],
                        c.rid[c.rejected], c.batch_end_time, c.batch_tokens)

    def _advance_reference(self, arrivals, prompts, outputs, rids, until, stop_at_finish) -> Advanced:
        engine = self.engine
        now, i, n = self.now, 0, len(arrivals)
        finished: list[Request] = []
        rejected: list[int] = []
        ends: list[float] = []
        tokens: list[int] = []
        computed = self._computed
        while True:  # the loop of loop.run_reference, resumable
            while i < n and arrivals[i] <= now:
                r = Request(int(rids[i]), float(arrivals[i]), int(prompts[i]), int(outputs[i]))
                if engine.admit(r, computed.pop(r.rid, 0) if computed else 0):
                    self._requests[r.rid] = r
                else:
                    rejected.append(r.rid)
                i += 1
            if not engine.has_work:
                if i >= n or arrivals[i] > until:
                    break
                now = float(arrivals[i])
                continue
            if now >= until:
                break
            s = engine.step(now)
            now = s.end_time
            ends.append(now)
            tokens.append(s.plan.num_tokens)
            finished.extend(s.finished)
            if stop_at_finish and s.finished and now < until:  # (at `until` the loop's top admits and stops)
                break
        self._keep(arrivals, prompts, outputs, rids, i)
        self.now = now
        for r in finished:
            del self._requests[r.rid]
        finished.sort(key=lambda r: r.rid)
        return Advanced(now, np.array([r.rid for r in finished], np.int64),
                        np.array([r.first_token_time for r in finished], np.float64),
                        np.array([r.finish_time for r in finished], np.float64), np.array(rejected, np.int64),
                        np.array(ends, np.float64), np.array(tokens, np.int64))
