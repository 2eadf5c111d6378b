"""A policy in one file, composed of plan steps: decode first, prompts never split.

Each batch gives one decode token to every decoding request (oldest first), then adds whole
prompts, oldest first, while they fit; the first prompt that does not fit waits for the next
batch, and everyone behind it too.  It is Sarathi-Serve (paper §4, Table 1) without chunked
prefill, so it can leave budget unused: not work-conserving.  A prompt longer than the whole
token budget could never run, so the engine rejects it on arrival (``rejected`` in the summary).

Use it from a config (the path is relative to the config file):

    [engine]
    scheduler = "decode_first_no_chunking.py:DecodeFirstNoChunking"
    mixed = false        # its option: decode-only batches while anyone decodes

Being a composition of steps, it runs on the compiled core (``meta["method"] == "fast"``).
See docs/policies.md.
"""

from llmqueue.schedulers import Option, Scheduler
from llmqueue.schedulers.plan import Decodes, Plan, Prefills


class DecodeFirstNoChunking(Scheduler):
    name = "decode-first-no-chunking"
    summary = "decode first, whole prompts only (Sarathi without chunked prefill)"
    work_conserving = False
    options = {
        "mixed": Option(bool, True, "mix prompts into batches with decodes (false: decode-only batches "
                                    "while any request decodes, i.e. FasterTransformer)"),
    }

    def compose(self) -> Plan:
        return Plan((Decodes(exclusive=not self.settings["mixed"]), Prefills(split=False)))
