"""Sarathi-Serve (PAPER.md §3, paper §4, Table 1): decode first, mixed, chunked prefill.

One decode token for every decoding request (FCFS), then fill the room left with prefill
chunks, oldest request first, as few requests as possible.  Work-conserving and K-FCFS.
"""

from llmqueue.batch import BatchPlan
from llmqueue.schedulers.base import EngineState, Scheduler


class Sarathi(Scheduler):
    name = "sarathi"
    summary = "decode first, mixed batches, chunked prefill"
    work_conserving = True

    def plan(self, state: EngineState) -> BatchPlan:
        batch = state.builder()
        batch.add_decodes(state.decoding)
        batch.add_prefills(state.prefilling, split=True)
        return batch.build()
