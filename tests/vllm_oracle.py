"""An independent transcription of vLLM v1's scheduling + KV-block rules (a test oracle).

Executable specification of what ``vllm.v1.core.sched.scheduler.Scheduler`` does with paged KV
blocks in one restricted setting, for differential tests of our engine model.  Pure Python, no
dependencies.  Setting (everything else of vLLM is absent or inert here):

* FCFS policy, prefix caching OFF (:class:`VllmPrefixOracle` turns it on: rules P1-P6 in its
  docstring), synchronous scheduling (no async placeholders), no speculative
  decoding, no encoder / LoRA / KV connector / mamba / pipeline parallelism, one full-attention KV
  cache group, no sliding window, watermark 0, no pause, no streaming input;
* ``scheduler_reserve_full_isl = True`` (the vLLM default; ``False`` is supported too);
* ``enable_chunked_prefill`` (default True), ``long_prefill_token_threshold`` (0 = off; not applied
  to a request alone in the scheduler unless ``threshold_when_alone``: D11),
  ``max_num_batched_tokens``, ``max_num_seqs``, ``num_gpu_blocks``, ``block_size``;
* every request has a fixed output length (``ignore_eos``): it finishes exactly when it holds
  ``max_tokens`` output tokens; ``max_model_len`` is assumed >= prompt_len + max_tokens, so it never
  binds (see "not modelled" below).

Sources read (with the ``read_file`` tool, repository ``vllm-project/vllm``)
---------------------------------------------------------------------------
The index holds each file at one stored commit, not all at the same one:

* ``vllm/v1/core/sched/scheduler.py`` @ 003df2961dd8830c317a61f9745ccd557da9fa06 -- the main
  source: ``Scheduler.schedule``, ``_preempt_request``, ``_update_after_schedule``,
  ``update_from_output``, ``_update_request_with_output``, ``_free_request`` / ``_free_blocks`` /
  ``_free_request_blocks``, ``_select_waiting_queue_for_scheduling``, ``get_num_unfinished_requests``.
  Also compared with the older stored snapshots 00024d314514900f361ad072af6931e403b7f589 and
  b4622cf924bc72504aed99e486062d6633fde39e (see difference D1).
* ``vllm/v1/core/kv_cache_manager.py`` @ 003df2961dd8830c317a61f9745ccd557da9fa06 --
  ``KVCacheManager.allocate_slots`` (``full_sequence_must_fit``, ``reserved_blocks``,
  ``has_scheduled_reqs``, watermark), ``free``.
* ``vllm/v1/core/kv_cache_coordinator.py`` @ 00b08dc44519a82cbdd9061d92d1226985094622 --
  ``KVCacheCoordinator.get_num_blocks_to_allocate`` (sum over the groups' managers).
* ``vllm/v1/core/single_type_kv_cache_manager.py``: stored for vllm-project/vllm only @
  002f34915134cfd1a7d6ed777edd67dcc2289466 (old: ``cdiv(num_tokens, block_size) - len(computed) -
  len(req_blocks)``); the current ``SingleTypeKVCacheManager.get_num_blocks_to_allocate`` (with
  ``apply_admission_cap``, the running fast path ``max(cdiv(num_tokens, bs) - len(req_blocks), 0)``
  and ``get_num_skipped_tokens`` = 0 for full attention) was read in a recent copy of that file
  found with ``find_string`` (index file id 70180355427; the index does not name its repository).
  Both give the same count in this setting.
* ``vllm/v1/core/block_pool.py`` @ 002f34915134cfd1a7d6ed777edd67dcc2289466 --
  ``BlockPool.__init__`` (``self.null_block = self.free_block_queue.popleft()``: block 0 is never
  free) and ``get_num_free_blocks``; newer copies found with ``find_string`` agree.
* for prefix caching: ``vllm/v1/core/block_pool.py`` @ c59cb7941357443da7c5eef75cfa8697d683d228
  (``BlockHashToBlockMap``, ``BlockPool.get_cached_block``, ``cache_full_blocks``,
  ``get_new_blocks``, ``_maybe_evict_cached_block``, ``touch``, ``free_blocks``), compared with
  002f3491 (D10); ``kv_cache_manager.py`` @ 003df296 (``get_computed_blocks``,
  ``allocate_slots`` with ``new_computed_blocks``, ``record_prefix_cache_stats``);
  ``single_type_kv_cache_manager.py`` @ 002f3491 and the recent copy above
  (``get_num_blocks_to_allocate`` with evictable hit blocks, ``save_new_computed_blocks`` /
  ``add_local_computed_blocks``, ``cache_blocks``, ``free``, ``FullAttentionManager.
  find_longest_cache_hit``); ``kv_cache_utils.py`` (``hash_block_tokens``,
  ``get_request_block_hasher``, copies found with ``find_string``); ``vllm/v1/metrics/stats.py``
  (``PrefixCacheStats.record``, copies found with ``find_string``); the waiting loop of
  ``scheduler.py`` @ 003df296 (``if request.num_computed_tokens == 0: ... get_computed_blocks``).
* ``vllm/v1/request.py`` @ 000a0d5f815c83fce16461cd5ea4a3a6944260b1 -- ``num_tokens`` =
  len(_all_token_ids) = prompt + outputs, ``num_tokens_with_spec`` = num_tokens + len(spec_token_ids)
  (= num_tokens here), ``append_output_token_ids``.
* ``vllm/v1/core/sched/request_queue.py`` @ 0097c7ed191ad98928976a47ae63ab625a5d112f --
  ``FCFSRequestQueue`` (a deque: ``add_request`` = append, ``prepend_request`` = appendleft).
* ``vllm/v1/core/sched/utils.py`` @ 018d5dc78efa9af8a03457451b6f27d56bf3b9c2 -- ``check_stop``.
* ``vllm/v1/worker/gpu_model_runner.py`` (copies found with ``find_string``) -- the sampled token of
  a request with ``num_computed_tokens + num_scheduled_tokens < num_tokens`` is discarded
  ("Ignore the sampled token for partial prefills").

Where the source differs from (or adds to) the summary we were given
--------------------------------------------------------------------
D1. ``scheduler_reserve_full_isl`` exists only in recent vLLM (003df296: ``Scheduler.__init__``
    reads ``scheduler_config.scheduler_reserve_full_isl``, passed as ``full_sequence_must_fit`` to
    the waiting loop's ``allocate_slots``).  The older stored snapshots (00024d31, b4622cf9) have no
    such gate: there a waiting request is admitted when its *first chunk's* blocks fit.  A
    differential test must know which vLLM the engine mirrors (``reserve_full_isl=False`` here gives
    the old rule).
D2. The waiting loop's seat check is ``len(self.running) + self.num_waiting_for_streaming_input >=
    self.max_num_running_reqs`` (not ``==``); equivalent here (no streaming sessions).
D3. In the running loop the chunk is also capped by ``max_model_len - num_computed_tokens - 1``, and
    ``check_stop`` also stops at ``num_tokens >= max_model_len`` (and not before ``min_tokens``).
    Not modelled: assumed never binding (max_model_len >= prompt_len + max_tokens, min_tokens = 0).
D4. The "sampled token appended when computed tokens reach num_tokens" rule lives in the model
    runner (discard when ``seq_len < num_tokens``), not in ``update_from_output``, which appends
    whatever token the runner returns and calls ``check_stop``.
D5. The full-sequence gate in ``allocate_slots`` runs first and compares
    ``cdiv(min(num_tokens, max_model_len), bs) - held + watermark_blocks`` with the free blocks
    (without ``reserved_blocks``); then the chunk check compares
    ``cdiv(computed + n + lookahead, bs) - held + watermark_blocks`` with ``free - reserved_blocks``.
    Here watermark, lookahead and reserved blocks are 0, so the gate is ``cdiv(num_tokens, bs) <=
    free`` and the second check is implied by it (computed = 0 on admission).  For a RUNNING request
    the watermark never applies (only WAITING/PREEMPTED statuses get it).
D6. The running loop runs only ``while req_index < len(self.running) and token_budget > 0``: once
    the budget is spent, later running requests are neither scheduled nor checked for memory (they
    keep their blocks, and cannot trigger preemption in that step).
D7. Several preemptions in one step prepend the victims one by one (``prepend_request``), tail
    first, so the waiting queue starts with the victims in their old running order and the *last*
    victim at its head.  A preempted request keeps its output tokens; only its computed tokens are
    dropped (``num_computed_tokens = 0``), so it recomputes ``num_tokens`` = prompt + outputs, as a
    prompt (chunked, threshold-capped), and the last chunk of the recompute yields its next token.
D8. A consequence, not a difference: with ``reserve_full_isl=True`` and no prefix caching, the rule
    "no waiting admission in a step with a preemption" can never change the outcome.  The head of
    waiting is then the last victim v, and the blocks free after the preemptions are
    ``free_before + held(victims) - need < held(v) <= cdiv(num_tokens(v), bs)``, so the gate would
    refuse v anyway and the scan would stop there.  The rule becomes observable with
    ``reserve_full_isl=False`` (v's first chunk may fit); the tests show both.
D10. (Prefix caching.) ``BlockPool.free_blocks`` differs between the stored snapshots: 002f3491
    appends every freed block at the back of the free queue (fresh and cached ones interleaved,
    so a cached block can be evicted while fresh blocks wait behind it); c59cb794 prepends the
    freed blocks without a hash and appends the cached ones, so fresh blocks are always used
    before any cached block is evicted.  :class:`VllmPrefixOracle` follows c59cb794.  Recent vLLM
    also has partial-block hits with copy-on-write (``supports_fine_grained_hash_lookup``, seen
    only in a copy found with ``find_string``); not modelled (full blocks only, as in 003df296's
    ``get_computed_blocks`` docstring: "the computed blocks must be full").
D11. ``long_prefill_token_threshold`` and a lone request.  Every stored snapshot of scheduler.py
    (00024d31, b4622cf9, 003df296) applies the threshold unconditionally, in the running loop
    (``if 0 < self.scheduler_config.long_prefill_token_threshold < num_new_tokens``) and in the
    waiting loop (``threshold = ...; if 0 < threshold < num_new_tokens``).  vLLM PR #57951 (merged
    2026-09, in vLLM >= 0.32; read in its description, the index holds no snapshot after it) computes
    an effective threshold once per ``schedule()`` call, 0 when ``running + waiting + skipped_waiting
    <= 1``, and uses it in both loops.  The default here is that rule; ``threshold_when_alone=True``
    is the older one.
D9. An FCFS ``skipped_waiting`` queue (requests blocked on remote KV, grammar, streaming) is served
    before ``waiting``; it stays empty in this setting.

Accounting extras (not vLLM state): per request ``num_preemptions`` (vLLM's own counter),
``recomputed_tokens`` (computed tokens dropped by preemptions, all of which are computed again: the
last residence recomputes positions 0 .. prompt+max_tokens-2), ``num_scheduled_tokens_total``
(= prompt_len + max_tokens - 1 + recomputed_tokens once finished), and under :func:`run` the
``arrival_step`` / ``finish_step``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

__all__ = ["KVCacheBlock", "OracleRequest", "StepRecord", "Trace", "VllmOracle", "VllmPrefixOracle", "cdiv", "run"]

WAITING = "WAITING"  # RequestStatus.WAITING: never scheduled yet
RUNNING = "RUNNING"
PREEMPTED = "PREEMPTED"  # back in waiting after _preempt_request
FINISHED = "FINISHED"  # RequestStatus.FINISHED_LENGTH_CAPPED (check_stop: max_tokens reached)

MAX_STEPS = 10**6


def cdiv(a: int, b: int) -> int:
    """vllm.utils.math_utils.cdiv: ceil(a / b) for positive b."""
    return -(-a // b)


@dataclass
class OracleRequest:
    rid: int
    prompt_len: int
    max_tokens: int
    # --- vLLM Request state (vllm/v1/request.py) ---
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    num_preemptions: int = 0
    status: str = WAITING
    # len(SingleTypeKVCacheManager.req_to_blocks[rid]) for the one KV cache group
    num_blocks: int = 0
    # --- accounting extras ---
    recomputed_tokens: int = 0
    num_scheduled_tokens_total: int = 0
    arrival_step: int | None = None
    finish_step: int | None = None

    @property
    def num_tokens(self) -> int:
        """Request.num_tokens = len(_all_token_ids) = prompt + output tokens so far
        (= num_tokens_with_spec: no spec tokens here)."""
        return self.prompt_len + self.num_output_tokens


@dataclass
class StepRecord:
    scheduled: list[tuple[int, int]]  # (rid, num_scheduled_tokens), running loop first, then waiting
    preempted: list[int]  # rids in preemption order
    free_blocks: int  # BlockPool.get_num_free_blocks() right after schedule()
    running: list[int]  # self.running after schedule()
    waiting: list[int]  # self.waiting after schedule()
    # Extras (defaults keep the five-field constructor): set by run().
    step: int = -1  # run()'s step index of this schedule() call
    finished: list[int] = field(default_factory=list)  # update_from_output's answer for this step


class Trace(list):
    """run()'s answer: a ``list[StepRecord]`` with the oracle attached as ``.oracle``
    (per-request results: ``trace.oracle.requests[rid]``)."""

    oracle: VllmOracle


class VllmOracle:
    """vLLM v1 ``Scheduler`` + ``KVCacheManager`` restricted to the setting of the module docstring.

    Call ``schedule()`` then ``update_from_output(step)`` once per engine step, as
    ``EngineCore.step`` does (synchronous scheduling)."""

    def __init__(
        self,
        num_gpu_blocks: int,
        block_size: int,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        long_prefill_token_threshold: int = 0,
        threshold_when_alone: bool = False,
        enable_chunked_prefill: bool = True,
        reserve_full_isl: bool = True,
    ) -> None:
        if num_gpu_blocks < 1 or block_size < 1 or max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("num_gpu_blocks, block_size, max_num_batched_tokens, max_num_seqs must be >= 1")
        if long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0")
        self.num_gpu_blocks = num_gpu_blocks
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens  # Scheduler.max_num_scheduled_tokens
        self.max_num_seqs = max_num_seqs  # Scheduler.max_num_running_reqs
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.threshold_when_alone = threshold_when_alone  # D11
        self._threshold = long_prefill_token_threshold   # this step's effective threshold (D11)
        self.enable_chunked_prefill = enable_chunked_prefill
        self.reserve_full_isl = reserve_full_isl  # SchedulerConfig.scheduler_reserve_full_isl
        # block_pool.py BlockPool.__init__: all num_gpu_blocks blocks start in the free queue, then
        # ``self.null_block = self.free_block_queue.popleft()`` takes block 0 for good (the null
        # block is never freed), so get_num_free_blocks() starts at num_gpu_blocks - 1.
        self._num_free_blocks = num_gpu_blocks - 1
        self.requests: dict[int, OracleRequest] = {}
        self.running: list[OracleRequest] = []  # Scheduler.running (a list)
        self.waiting: deque[OracleRequest] = deque()  # Scheduler.waiting (FCFSRequestQueue: a deque)
        self._pending: StepRecord | None = None

    # ------------------------------------------------------------------ requests
    def add_request(self, rid: int, prompt_len: int, max_tokens: int) -> None:
        """Scheduler.add_request -> _enqueue_waiting_request -> FCFSRequestQueue.add_request
        (append at the tail of waiting)."""
        if rid in self.requests:
            raise ValueError(f"duplicate request id {rid}")
        if prompt_len < 1 or max_tokens < 1:
            raise ValueError("prompt_len and max_tokens must be >= 1")
        req = OracleRequest(rid, prompt_len, max_tokens)
        self.requests[rid] = req
        self.waiting.append(req)

    def free_blocks(self) -> int:
        """BlockPool.get_num_free_blocks()."""
        return self._num_free_blocks

    def has_unfinished(self) -> bool:
        """Scheduler.get_num_unfinished_requests() > 0 (len(waiting) + len(running))."""
        return bool(self.running or self.waiting)

    # ------------------------------------------------------------------ KV blocks
    def _num_blocks_to_allocate(self, req: OracleRequest, num_tokens: int) -> int:
        """KVCacheCoordinator.get_num_blocks_to_allocate -> SingleTypeKVCacheManager.
        get_num_blocks_to_allocate for one full-attention group without prefix hits:
        max(cdiv(num_tokens, block_size) - len(req_to_blocks[rid]), 0).  (No admission cap for full
        attention: _max_admission_blocks_per_request is None; get_num_skipped_tokens = 0.)"""
        return max(cdiv(num_tokens, self.block_size) - req.num_blocks, 0)

    def _get_computed_blocks(self, req: OracleRequest) -> tuple[list, int]:
        """KVCacheManager.get_computed_blocks with prefix caching off: (empty blocks, 0)."""
        return [], 0

    def _record_prefix_cache_stats(self, req: OracleRequest, num_hits: int) -> None:
        """KVCacheManager.record_prefix_cache_stats: nothing without prefix caching."""

    def _on_output_token(self, req: OracleRequest) -> None:
        """Request.append_output_token_ids: nothing to hash without prefix caching."""

    def _allocate_slots(self, req: OracleRequest, num_new_tokens: int, full_sequence_must_fit: bool,
                        num_new_computed_tokens: int = 0, new_computed_blocks: list | None = None) -> bool:
        """KVCacheManager.allocate_slots (kv_cache_manager.py); returns False where it returns None.

        Watermark 0, no lookahead, no reserved_blocks, no prefix/external hits (total computed =
        request.num_computed_tokens)."""
        assert num_new_tokens > 0  # allocate_slots raises ValueError on 0 new (and 0 external) tokens
        assert not new_computed_blocks and num_new_computed_tokens == 0
        if full_sequence_must_fit:
            # "First check and fail if the full request sequence won't fit":
            # get_num_blocks_to_allocate(num_tokens=min(request.num_tokens, max_model_len)) + watermark
            # > get_num_free_blocks() -> None.
            if self._num_blocks_to_allocate(req, req.num_tokens) > self._num_free_blocks:
                return False
        # num_tokens_need_slot = total_computed_tokens + num_new_tokens (+ lookahead, capped at
        # max_model_len); required = blocks to allocate (+ watermark) vs free - reserved_blocks.
        need = self._num_blocks_to_allocate(req, req.num_computed_tokens + num_new_tokens)
        if need > self._num_free_blocks:
            return False
        # coordinator.allocate_new_blocks -> SingleTypeKVCacheManager.allocate_new_blocks:
        # block_pool.get_new_blocks(cdiv(num_tokens, bs) - len(req_blocks)).  Nothing is reserved
        # ahead: a request holds exactly cdiv(computed after this step, bs) blocks.
        self._num_free_blocks -= need
        req.num_blocks += need
        return True

    def _free(self, req: OracleRequest) -> None:
        """KVCacheManager.free -> coordinator.free -> SingleTypeKVCacheManager.free: all the
        request's blocks go back to the free queue (immediately: defer_block_free is only set with
        a KV-consumer connector and overlapping batches)."""
        self._num_free_blocks += req.num_blocks
        req.num_blocks = 0

    def _preempt(self, req: OracleRequest) -> None:
        """Scheduler._preempt_request (the caller has already removed ``req`` from running)."""
        assert req.status == RUNNING, "Only running requests can be preempted"
        self._free(req)  # _free_request_blocks -> kv_cache_manager.free(request)
        req.status = PREEMPTED
        req.recomputed_tokens += req.num_computed_tokens  # (accounting: these will be computed again)
        req.num_computed_tokens = 0  # output tokens are kept: num_tokens is unchanged
        req.num_preemptions += 1
        self.waiting.appendleft(req)  # self.waiting.prepend_request(request)

    def _chunk(self, num_new_tokens: int, token_budget: int) -> int:
        """The running loop's chunk (Scheduler.schedule): the long_prefill_token_threshold cap, then
        the budget cap.  (The waiting loop inlines the same two caps around its chunked-prefill check.)"""
        if 0 < self._threshold < num_new_tokens:
            num_new_tokens = self._threshold
        return min(num_new_tokens, token_budget)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> StepRecord:
        """One Scheduler.schedule() call (including _update_after_schedule)."""
        if self._pending is not None:
            raise RuntimeError("update_from_output() of the previous step has not been called")
        scheduled: list[tuple[OracleRequest, int]] = []  # num_scheduled_tokens (a dict: insertion order)
        preempted: list[OracleRequest] = []  # preempted_reqs
        token_budget = self.max_num_batched_tokens
        # D11: once per step, before either loop (skipped_waiting is empty here: D9).
        alone = len(self.running) + len(self.waiting) <= 1
        self._threshold = 0 if alone and not self.threshold_when_alone else self.long_prefill_token_threshold

        # First, schedule the RUNNING requests, in self.running order.
        req_index = 0
        while req_index < len(self.running) and token_budget > 0:
            request = self.running[req_index]
            # num_new_tokens = num_tokens_with_spec + num_output_placeholders - num_computed_tokens,
            # capped by the threshold and the budget -- fixed before memory is looked at.
            # (The cap max_model_len - num_computed_tokens - 1 is not modelled: D3.)
            num_new_tokens = self._chunk(request.num_tokens - request.num_computed_tokens, token_budget)
            # Never 0 here (synchronous: every running request has num_tokens > num_computed_tokens),
            # so the `num_new_tokens == 0: continue` branch of the source is unreachable.
            assert num_new_tokens > 0
            while True:
                if self._allocate_slots(request, num_new_tokens, full_sequence_must_fit=False):
                    can_schedule = True
                    break
                # FCFS: preempted_req = self.running.pop() -- the tail, repeatedly.
                preempted_req = self.running.pop()
                self._preempt(preempted_req)
                preempted.append(preempted_req)
                if preempted_req is request:
                    # "No more request to preempt. Cannot schedule this request."
                    can_schedule = False
                    break
            if not can_schedule:
                break  # the running loop ends
            scheduled.append((request, num_new_tokens))
            token_budget -= num_new_tokens
            req_index += 1

        # Next, schedule the WAITING requests -- only in a step without preemption.
        if not preempted:
            while self.waiting and token_budget > 0:
                if len(self.running) >= self.max_num_seqs:  # + num_waiting_for_streaming_input (0)
                    break
                request = self.waiting[0]  # peek_request (skipped_waiting is empty: D9)
                # "if request.num_computed_tokens == 0": true for new and preempted requests alike;
                # get_computed_blocks -> (empty, 0) with prefix caching off (VllmPrefixOracle: P3).
                assert request.num_computed_tokens == 0
                new_computed_blocks, num_computed_tokens = self._get_computed_blocks(request)
                # "We use request.num_tokens instead of request.num_prompt_tokens to consider the
                # resumed requests, which have output tokens."
                num_new_tokens = request.num_tokens - num_computed_tokens
                if 0 < self._threshold < num_new_tokens:
                    num_new_tokens = self._threshold
                if not self.enable_chunked_prefill and num_new_tokens > token_budget:
                    break  # "If chunked_prefill is disabled, we can stop the scheduling here."
                num_new_tokens = min(num_new_tokens, token_budget)
                assert num_new_tokens > 0
                fits = self._allocate_slots(request, num_new_tokens, full_sequence_must_fit=self.reserve_full_isl,
                                            num_new_computed_tokens=num_computed_tokens,
                                            new_computed_blocks=new_computed_blocks)
                if not fits:
                    break  # "The request cannot be scheduled." -- head-of-line: the scan ends
                # "Record at admission so unscheduled lookups are not counted."
                self._record_prefix_cache_stats(request, num_computed_tokens)
                self.waiting.popleft()  # request_queue.pop_request()
                self.running.append(request)
                scheduled.append((request, num_new_tokens))
                token_budget -= num_new_tokens
                request.status = RUNNING
                request.num_computed_tokens = num_computed_tokens

        assert sum(n for _, n in scheduled) <= self.max_num_batched_tokens
        assert token_budget >= 0
        assert len(self.running) <= self.max_num_seqs

        # _update_after_schedule: advance num_computed_tokens of every scheduled request now.
        for request, n in scheduled:
            request.num_computed_tokens += n
            request.num_scheduled_tokens_total += n

        record = StepRecord(
            scheduled=[(r.rid, n) for r, n in scheduled],
            preempted=[r.rid for r in preempted],
            free_blocks=self.free_blocks(),
            running=[r.rid for r in self.running],
            waiting=[r.rid for r in self.waiting],
        )
        self._pending = record
        return record

    def update_from_output(self, step: StepRecord) -> list[int]:
        """Scheduler.update_from_output for the executed ``step``; returns the rids that finished,
        in the order vLLM processes them (the order of num_scheduled_tokens)."""
        if step is not self._pending:
            raise RuntimeError("update_from_output() must get the record of the last schedule()")
        self._pending = None
        finished: list[int] = []
        for rid, _n in step.scheduled:
            request = self.requests[rid]
            assert request.status == RUNNING
            # gpu_model_runner: the sampled token is discarded when
            # seq_len = num_computed_tokens (before) + num_scheduled_tokens < num_tokens (a partial
            # prefill / partial recompute).  num_computed_tokens here is already advanced.
            if request.num_computed_tokens < request.num_tokens:
                continue  # no new token: no output, no stop check
            assert request.num_computed_tokens == request.num_tokens
            # _update_request_with_output: append_output_token_ids, then check_stop:
            # num_output_tokens >= max_tokens -> FINISHED_LENGTH_CAPPED (ignore_eos; D3).
            request.num_output_tokens += 1
            self._on_output_token(request)
            if request.num_output_tokens >= request.max_tokens:
                request.status = FINISHED
                self._free(request)  # _free_request -> _free_blocks -> _free_request_blocks
                finished.append(rid)
        if finished:
            # self.running = remove_all(self.running, stopped_running_reqs): order kept.
            self.running = [r for r in self.running if r.status != FINISHED]
        return finished

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Block conservation: free + sum(cdiv(computed, bs)) over unfinished == num_gpu_blocks - 1,
        and each request holds exactly cdiv(computed, bs) blocks (nothing reserved ahead)."""
        held = 0
        for req in (*self.running, *self.waiting):
            assert req.num_blocks == cdiv(req.num_computed_tokens, self.block_size), req
            assert 0 <= req.num_computed_tokens <= req.num_tokens, req
            assert req.num_output_tokens < req.max_tokens, req
            held += req.num_blocks
        assert self._num_free_blocks >= 0
        assert self._num_free_blocks + held == self.num_gpu_blocks - 1
        assert all(r.status == RUNNING for r in self.running)
        assert all(r.status in (WAITING, PREEMPTED) and r.num_blocks == 0 for r in self.waiting)


def _deadlock_message(oracle: VllmOracle, step: int) -> str:
    head = oracle.waiting[0] if oracle.waiting else None
    msg = (
        f"step {step}: schedule() scheduled nothing while {len(oracle.waiting)} request(s) wait and "
        f"{len(oracle.running)} run; nothing running means nothing can free blocks, so this never changes"
    )
    if head is not None:
        need = cdiv(head.num_tokens, oracle.block_size)
        msg += (
            f". Head of waiting: request {head.rid} with {head.num_tokens} tokens "
            f"({head.prompt_len} prompt + {head.num_output_tokens} output) needs {need} blocks "
            f"of {oracle.block_size} for its whole sequence; {oracle.free_blocks()} are free of "
            f"{oracle.num_gpu_blocks - 1} usable (block 0 is the null block)"
        )
        if not oracle.enable_chunked_prefill:
            msg += (
                f"; with chunked prefill disabled its chunk must also fit max_num_batched_tokens="
                f"{oracle.max_num_batched_tokens}"
            )
    return msg


def run(jobs: list[tuple[int, int, int, int]], **engine_kwargs) -> Trace:
    """Run ``jobs`` = [(rid, arrival_step, prompt_len, max_tokens), ...] (sorted by arrival_step)
    to completion on a fresh :class:`VllmOracle` (``engine_kwargs`` go to its constructor).

    Before step s every job with arrival_step <= s not yet added is added, in list order; then one
    schedule() + update_from_output().  When nothing is in the system the clock jumps to the next
    arrival (no record for the idle steps).  Returns a :class:`Trace` (a list of StepRecord, one per
    schedule() call, with ``.step`` and ``.finished`` filled in) whose ``.oracle`` holds the
    per-request results.

    Raises RuntimeError: for a request that can never finish -- it must at some point hold
    cdiv(prompt_len + max_tokens - 1, block_size) blocks at once, more than the num_gpu_blocks - 1
    usable ones --; for a step that schedules nothing while requests are unfinished (then nothing
    runs, so no block is ever freed and the head of waiting is refused forever: the engine would
    loop forever, whatever arrives later); and after 10**6 steps."""
    oracle = VllmOracle(**engine_kwargs)
    trace = Trace()
    trace.oracle = oracle
    seen: set[int] = set()
    for rid, arrival, prompt_len, max_tokens in jobs:
        if rid in seen:
            raise ValueError(f"duplicate request id {rid}")
        seen.add(rid)
        peak = cdiv(prompt_len + max_tokens - 1, oracle.block_size)
        if peak > oracle.num_gpu_blocks - 1:
            raise RuntimeError(
                f"request {rid} ({prompt_len} prompt + {max_tokens} output tokens) can never finish: "
                f"its last step computes {prompt_len + max_tokens - 1} tokens, {peak} blocks of "
                f"{oracle.block_size}, but only {oracle.num_gpu_blocks - 1} of the {oracle.num_gpu_blocks} "
                "blocks are usable (block 0 is the null block); vLLM would preempt it forever"
            )
    if any(jobs[i][1] > jobs[i + 1][1] for i in range(len(jobs) - 1)):
        raise ValueError("jobs must be sorted by arrival_step")

    step = jobs[0][1] if jobs else 0
    i = 0
    while True:
        while i < len(jobs) and jobs[i][1] <= step:
            rid, arrival, prompt_len, max_tokens = jobs[i]
            oracle.add_request(rid, prompt_len, max_tokens)
            oracle.requests[rid].arrival_step = arrival
            i += 1
        if not oracle.has_unfinished():
            if i == len(jobs):
                break
            step = jobs[i][1]  # empty system: advance to the next arrival
            continue
        if len(trace) >= MAX_STEPS:
            raise RuntimeError(f"no completion after {MAX_STEPS} steps")
        record = oracle.schedule()
        record.step = step
        if not record.scheduled:
            raise RuntimeError(_deadlock_message(oracle, step))
        record.finished = oracle.update_from_output(record)
        for rid in record.finished:
            oracle.requests[rid].finish_step = step
        trace.append(record)
        step += 1
    return trace


# ============================================================================ prefix caching
NONE_HASH = b"\x00" * 32  # kv_cache_utils.NONE_HASH: the parent "hash" of a request's first block


def hash_block_tokens(parent_block_hash: bytes | None, curr_block_token_ids, extra_keys=None) -> bytes:
    """kv_cache_utils.hash_block_tokens with the sha256 hash function: the hash of (parent block hash
    or NONE_HASH, the block's token ids, extra keys).  (vLLM hashes a pickle; here the repr of the
    same tuple, which is as collision-free for int token ids.)"""
    if not parent_block_hash:
        parent_block_hash = NONE_HASH
    return hashlib.sha256(repr((parent_block_hash, tuple(curr_block_token_ids), extra_keys)).encode()).digest()


@dataclass(eq=False)
class KVCacheBlock:
    """kv_cache_utils.KVCacheBlock: block_id, ref_cnt, block_hash (None until cached)."""

    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


class VllmPrefixOracle(VllmOracle):
    """:class:`VllmOracle` with automatic prefix caching on (``enable_prefix_caching=True``).

    Requests carry real token ids: ``add_request(rid, prompt_token_ids, max_tokens)``; the i-th
    output token of request ``rid`` is ``output_token(rid, i)`` (distinct from every prompt token and
    every other request's output: sampled tokens are the request's own).  Rules, from the source
    (see also the module docstring's list of files):

    P1. ``vllm/v1/request.py`` + ``kv_cache_utils.get_request_block_hasher``: ``request.block_hashes``
        holds the chained hash of every *full* block of ``all_token_ids`` (prompt + outputs),
        extended as output tokens are appended; block i's hash is
        ``hash_block_tokens(block_hashes[i-1], tokens[i*bs:(i+1)*bs])``.
    P2. ``block_pool.py`` @ c59cb7941357443da7c5eef75cfa8697d683d228 (``BlockPool``):
        ``free_block_queue`` (FreeKVCacheBlockQueue) holds every free block, eviction candidates
        included; ``get_num_free_blocks`` is its length.  ``get_new_blocks(n)``: ``popleft_n(n)``,
        and for each ``_maybe_evict_cached_block`` (drop its hash from
        ``cached_block_hash_to_block`` if it has one), ``ref_cnt += 1``.  ``touch``: a hit block with
        ``ref_cnt == 0`` leaves the free queue; ``ref_cnt += 1``.  ``free_blocks(ordered)``: every
        ``ref_cnt -= 1``; of those at 0, blocks with no hash are ``prepend_n``-ed (used first), cached
        ones ``append_n``-ed (kept longest).  ``cache_full_blocks``: blocks already hashed (prefix
        hits) are skipped, the others get ``request.block_hashes[i]`` and are inserted in
        ``BlockHashToBlockMap`` (no de-duplication: identical blocks may be cached twice;
        ``get_one_block`` returns the first inserted).  The older snapshot 002f3491 appended every
        freed block at the back (D10).
    P3. ``kv_cache_manager.py`` @ 003df296 ``get_computed_blocks``: ``max_cache_hit_length =
        request.num_tokens - 1`` ("we must recompute the last token to obtain logits"), then
        ``FullAttentionManager.find_longest_cache_hit`` (single_type_kv_cache_manager.py):
        ``block_hashes[i]`` for ``i < max_length // block_size`` while ``get_cached_block`` finds
        them; the hit is ``len(blocks) * block_size`` tokens.
    P4. ``allocate_slots``: ``num_local_computed_tokens = num_computed_tokens +
        num_new_computed_tokens``; ``get_num_blocks_to_allocate`` = ``cdiv(num_tokens, bs) -
        len(new_computed_blocks) - len(req_blocks)`` plus the hit blocks with ``ref_cnt == 0``
        ("an eviction candidate ... will be removed from the free queue when touched ..., so we must
        count it in the free-capacity check"); the full-sequence gate with ``num_tokens =
        request.num_tokens``, then the check for ``num_local_computed_tokens + num_new_tokens``; then
        touch + append the hit blocks, ``allocate_new_blocks``, and ``cache_blocks(request,
        min(num_local_computed_tokens + num_new_tokens, request.num_tokens))`` -- blocks are cached
        when *scheduled*, so a request admitted later in the same step can hit them.
    P5. ``KVCacheManager.free`` / ``SingleTypeKVCacheManager.free``: ``reversed(req_blocks)`` ("so
        that the tail blocks are evicted first").  Preemption (``_preempt_request``) and finishing
        (``_free_request``) both free; a preempted request later looks up its own blocks like any
        waiting request (``num_computed_tokens == 0``).
    P6. ``scheduler.py`` @ 003df296 waiting loop: ``num_new_tokens = request.num_tokens -
        num_computed_tokens`` (after the hit), threshold and budget caps, ``allocate_slots(request,
        num_new_tokens, num_new_computed_tokens=..., new_computed_blocks=...)``;
        ``record_prefix_cache_stats`` at admission only (``PrefixCacheStats.record``: queries +=
        num_tokens, hits += the hit, split by ``num_preemptions > 0``); ``request.num_computed_tokens``
        = the hit.  The running loop never looks up (``new_computed_blocks`` empty).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.blocks = [KVCacheBlock(i) for i in range(self.num_gpu_blocks)]
        # FreeKVCacheBlockQueue as an ordered dict block_id -> block (front = next popped)
        self.free_block_queue: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        _, self.null_block = self.free_block_queue.popitem(last=False)   # block 0
        self.cached_block_hash_to_block: dict[bytes, dict[int, KVCacheBlock]] = {}
        self.req_to_blocks: dict[int, list[KVCacheBlock]] = {}
        self.num_cached_block: dict[int, int] = {}
        self.token_ids: dict[int, list] = {}
        self.block_hashes: dict[int, list[bytes]] = {}
        self.evictions = 0
        self.stats = {"requests": 0, "queries": 0, "hits": 0,
                      "preempted_requests": 0, "preempted_queries": 0, "preempted_hits": 0}
        self.hits_per_request: dict[int, list[int]] = {}   # rid -> the hit of each admission

    # ------------------------------------------------------------------ tokens and hashes (P1)
    @staticmethod
    def output_token(rid: int, i: int) -> int:
        return -(rid * 10_000_000 + i + 1)

    def add_request(self, rid: int, prompt_token_ids, max_tokens: int) -> None:  # type: ignore[override]
        super().add_request(rid, len(prompt_token_ids), max_tokens)
        self.token_ids[rid] = list(prompt_token_ids)
        self.block_hashes[rid] = []
        self.hits_per_request[rid] = []
        self._hash_new_blocks(rid)

    def _hash_new_blocks(self, rid: int) -> None:
        tokens, hashes, bs = self.token_ids[rid], self.block_hashes[rid], self.block_size
        start = len(hashes) * bs
        while start + bs <= len(tokens):
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens[start:start + bs]))
            start += bs

    def _on_output_token(self, req: OracleRequest) -> None:
        self.token_ids[req.rid].append(self.output_token(req.rid, req.num_output_tokens - 1))
        self._hash_new_blocks(req.rid)

    # ------------------------------------------------------------------ block pool (P2)
    def free_blocks(self) -> int:  # type: ignore[override]
        return len(self.free_block_queue)

    def cached_free_blocks(self) -> int:
        return sum(1 for b in self.free_block_queue.values() if b.block_hash is not None)

    def _get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        if n > len(self.free_block_queue):
            raise ValueError(f"Cannot get {n} free blocks from the pool")
        ret = [self.free_block_queue.popitem(last=False)[1] for _ in range(n)]
        for block in ret:
            self._maybe_evict_cached_block(block)
            assert block.ref_cnt == 0
            block.ref_cnt += 1
        return ret

    def _maybe_evict_cached_block(self, block: KVCacheBlock) -> bool:
        if block.block_hash is None:
            return False
        same = self.cached_block_hash_to_block.get(block.block_hash)
        if not same or same.pop(block.block_id, None) is None:
            return False
        if not same:
            del self.cached_block_hash_to_block[block.block_hash]
        block.block_hash = None
        self.evictions += 1
        return True

    def _touch(self, blocks: list[KVCacheBlock]) -> None:
        for block in blocks:
            if block.ref_cnt == 0 and block is not self.null_block:
                del self.free_block_queue[block.block_id]
            block.ref_cnt += 1

    def _free_block_list(self, ordered_blocks) -> None:
        blocks_list = list(ordered_blocks)
        for block in blocks_list:
            block.ref_cnt -= 1
        freeable = [b for b in blocks_list if b.ref_cnt == 0 and b is not self.null_block]
        fresh = [b for b in freeable if b.block_hash is None]
        cached = [b for b in freeable if b.block_hash is not None]
        for block in reversed(fresh):   # prepend_n: the list, in order, at the front
            self.free_block_queue[block.block_id] = block
            self.free_block_queue.move_to_end(block.block_id, last=False)
        for block in cached:            # append_n
            self.free_block_queue[block.block_id] = block

    def _get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        same = self.cached_block_hash_to_block.get(block_hash)
        return next(iter(same.values())) if same else None

    def _cache_full_blocks(self, rid: int, num_cached_blocks: int, num_full_blocks: int) -> None:
        if num_cached_blocks >= num_full_blocks:
            return
        blocks, hashes = self.req_to_blocks[rid], self.block_hashes[rid]
        assert len(hashes) >= num_full_blocks
        for i in range(num_cached_blocks, num_full_blocks):
            blk = blocks[i]
            if blk.block_hash is not None:
                assert blk.block_hash == hashes[i], "Cached block has wrong hash"
                continue
            blk.block_hash = hashes[i]
            self.cached_block_hash_to_block.setdefault(hashes[i], {})[blk.block_id] = blk

    # ------------------------------------------------------------------ KV cache manager (P3-P5)
    def _get_computed_blocks(self, req: OracleRequest) -> tuple[list, int]:
        max_cache_hit_length = req.num_tokens - 1
        hashes = self.block_hashes[req.rid]
        computed: list[KVCacheBlock] = []
        for i in range(max_cache_hit_length // self.block_size):
            cached = self._get_cached_block(hashes[i])
            if cached is None:
                break
            computed.append(cached)
        return computed, len(computed) * self.block_size

    def _num_blocks_to_allocate(self, req: OracleRequest, num_tokens: int,  # type: ignore[override]
                                new_computed_blocks: list | None = None) -> int:
        new_computed_blocks = new_computed_blocks or []
        held = len(self.req_to_blocks.get(req.rid, ()))
        num_new_blocks = max(cdiv(num_tokens, self.block_size) - len(new_computed_blocks) - held, 0)
        evictable = sum(1 for b in new_computed_blocks if b.ref_cnt == 0 and b is not self.null_block)
        return num_new_blocks + evictable

    def _allocate_slots(self, req: OracleRequest, num_new_tokens: int, full_sequence_must_fit: bool,
                        num_new_computed_tokens: int = 0, new_computed_blocks: list | None = None) -> bool:
        assert num_new_tokens > 0
        new_computed_blocks = new_computed_blocks or []
        num_local_computed_tokens = req.num_computed_tokens + num_new_computed_tokens
        free = len(self.free_block_queue)
        if full_sequence_must_fit:
            if self._num_blocks_to_allocate(req, req.num_tokens, new_computed_blocks) > free:
                return False
        need_slot = num_local_computed_tokens + num_new_tokens
        if self._num_blocks_to_allocate(req, need_slot, new_computed_blocks) > free:
            return False
        req_blocks = self.req_to_blocks.setdefault(req.rid, [])
        if req.rid not in self.num_cached_block:   # a new (or resumed) request: save its hit blocks
            assert not req_blocks
            self._touch(new_computed_blocks)
            req_blocks.extend(new_computed_blocks)
            self.num_cached_block[req.rid] = len(new_computed_blocks)
        else:
            assert not new_computed_blocks
        n = cdiv(need_slot, self.block_size) - len(req_blocks)
        if n > 0:
            req_blocks.extend(self._get_new_blocks(n))
        num_tokens_to_cache = min(num_local_computed_tokens + num_new_tokens, req.num_tokens)
        num_full = num_tokens_to_cache // self.block_size
        self._cache_full_blocks(req.rid, self.num_cached_block[req.rid], num_full)
        self.num_cached_block[req.rid] = max(num_full, self.num_cached_block[req.rid])
        req.num_blocks = len(req_blocks)
        return True

    def _free(self, req: OracleRequest) -> None:
        blocks = self.req_to_blocks.pop(req.rid, [])
        self._free_block_list(reversed(blocks))
        self.num_cached_block.pop(req.rid, None)
        req.num_blocks = 0

    def _record_prefix_cache_stats(self, req: OracleRequest, num_hits: int) -> None:
        self.hits_per_request[req.rid].append(num_hits)
        key = "preempted_" if req.num_preemptions > 0 else ""
        self.stats[key + "requests"] += 1
        self.stats[key + "queries"] += req.num_tokens
        self.stats[key + "hits"] += num_hits

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Each unfinished request holds cdiv(computed, bs) blocks; ref counts = holders; every block
        but the null block is free (in the queue, ref 0) or held; cached blocks are in the map."""
        refs: dict[int, int] = {}
        for req in (*self.running, *self.waiting):
            blocks = self.req_to_blocks.get(req.rid, [])
            assert len(blocks) == cdiv(req.num_computed_tokens, self.block_size), req
            for b in blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        for bid, n in refs.items():
            assert self.blocks[bid].ref_cnt == n
            assert bid not in self.free_block_queue
        for bid, b in self.free_block_queue.items():
            assert b.ref_cnt == 0
        assert len(refs) + len(self.free_block_queue) == self.num_gpu_blocks - 1
        for h, same in self.cached_block_hash_to_block.items():
            for bid, b in same.items():
                assert b.block_hash == h and b.block_id == bid
