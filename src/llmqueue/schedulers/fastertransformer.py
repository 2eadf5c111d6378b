"""FasterTransformer (PAPER.md §3, paper §4, Table 1): decode first, no mixed batches.

While any request is decoding, the batch holds only decode tokens (one per decoding
request, FCFS, up to the budget) and prefills wait; otherwise a prefill-only batch, FCFS.
Not work-conserving.
"""

from llmqueue.batch import BatchPlan
from llmqueue.schedulers.base import SPLIT_OPTION, EngineState, Scheduler


class FasterTransformer(Scheduler):
    name = "fastertransformer"
    summary = "decode first, no mixed batches"
    work_conserving = False
    options = {"split_prompts": SPLIT_OPTION}

    def plan(self, state: EngineState) -> BatchPlan:
        batch = state.builder()
        if state.decoding:
            batch.add_decodes(state.decoding)
        else:
            batch.add_prefills(state.prefilling, self.settings["split_prompts"])
        return batch.build()
