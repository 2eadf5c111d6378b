"""Sarathi-Serve (arXiv 2504.07347 §4, Table 1): decode first, mixed, chunked prefill.

One decode token for every decoding request (FCFS), then fill the room left with prefill
chunks, oldest request first, as few requests as possible.  Work-conserving and K-FCFS.
"""

from llmqueue.schedulers.base import Scheduler
from llmqueue.schedulers.plan import Decodes, Plan, Prefills


class Sarathi(Scheduler):
    name = "sarathi"
    summary = "decode first, mixed batches, chunked prefill"
    work_conserving = True

    def compose(self) -> Plan:
        return Plan((Decodes(), Prefills(split=True)))
