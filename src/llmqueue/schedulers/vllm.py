"""Vanilla vLLM, v0 (PAPER.md §3, paper §4, Table 1): prefill first, no mixed batches.

While any request has prefill left, the batch holds only prefill tokens (FCFS, as many
as fit) and decodes wait; otherwise a decode-only batch, one token per decoding request.
Not work-conserving.
"""

from llmqueue.batch import BatchPlan
from llmqueue.schedulers.base import SPLIT_OPTION, EngineState, Scheduler


class VanillaVLLM(Scheduler):
    name = "vllm"
    summary = "vanilla vLLM v0: prefill first, no mixed batches"
    work_conserving = False
    options = {"split_prompts": SPLIT_OPTION}

    def plan(self, state: EngineState) -> BatchPlan:
        batch = state.builder()
        if state.prefilling:
            batch.add_prefills(state.prefilling, self.settings["split_prompts"])
        else:
            batch.add_decodes(state.decoding)
        return batch.build()
