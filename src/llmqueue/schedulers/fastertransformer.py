"""FasterTransformer (arXiv 2504.07347 §4, Table 1): decode first, no mixed batches.

While any request is decoding, the batch holds only decode tokens (one per decoding
request, FCFS, up to the budget) and prefills wait; otherwise a prefill-only batch, FCFS.
Not work-conserving.
"""

from llmqueue.schedulers.base import SPLIT_OPTION, Scheduler
from llmqueue.schedulers.plan import Decodes, Plan, Prefills


class FasterTransformer(Scheduler):
    name = "fastertransformer"
    summary = "decode first, no mixed batches"
    work_conserving = False
    options = {"split_prompts": SPLIT_OPTION}

    def compose(self) -> Plan:
        return Plan((Decodes(exclusive=True), Prefills(split=self.settings["split_prompts"])))
