"""Vanilla vLLM, v0 (arXiv 2504.07347 §4, Table 1): prefill first, no mixed batches.

While any request has prefill left, the batch holds only prefill tokens (FCFS, as many
as fit) and decodes wait; otherwise a decode-only batch, one token per decoding request.
Not work-conserving.
"""

from llmqueue.schedulers.base import SPLIT_OPTION, Scheduler
from llmqueue.schedulers.plan import Decodes, Plan, Prefills


class VanillaVLLM(Scheduler):
    name = "vllm"
    summary = "vanilla vLLM v0: prefill first, no mixed batches"
    work_conserving = False
    options = {"split_prompts": SPLIT_OPTION}

    def compose(self) -> Plan:
        return Plan((Prefills(split=self.settings["split_prompts"], exclusive=True), Decodes()))
