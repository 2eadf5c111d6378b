"""Orca (arXiv 2504.07347 §4, Table 1): prefill first, mixed batches.

Fill the budget with prefill tokens (FCFS, chunking the last prompt so the batch is
full), then give one decode token per decoding request in the room left (FCFS).
Work-conserving: the chunking is what makes every batch hold min(b_max, demand) tokens.
"""

from llmqueue.schedulers.base import Scheduler
from llmqueue.schedulers.plan import Decodes, Plan, Prefills


class Orca(Scheduler):
    name = "orca"
    summary = "prefill first, mixed batches"
    work_conserving = True

    def compose(self) -> Plan:
        return Plan((Prefills(split=True), Decodes()))
