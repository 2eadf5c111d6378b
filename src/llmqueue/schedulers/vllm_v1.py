"""Today's vLLM (v1 engine) scheduler loop (arXiv 2504.07347 §4 names the four policies it studies;
this one is beyond them).

vLLM v1 has no prefill/decode phases: every step it walks the *running* requests in
admission order, giving each what it still needs (one decode token, or the rest of its
prompt as a chunk) from one token budget, then admits *waiting* requests FCFS while the
number of running requests stays below ``max_num_seqs``, chunking the last prompt to the
room left.  ``long_prefill_token_threshold`` (0 = off) caps any one prefill chunk, as
vLLM's option of the same name does, except when the request is alone in the engine (one
request running or waiting at the step's start): vLLM >= 0.32 (its PR #57951) lifts the cap
then, and so does this policy unless ``long_prefill_threshold_when_alone`` is true (the rule
of earlier vLLM).  Source: vllm/v1/core/sched/scheduler.py, ``Scheduler.schedule``
(docs/policies.md).  Without a cap or threshold this is work-conserving (every batch is filled
while demand remains); with them it is not, and it does not claim to be.
"""

from llmqueue.schedulers.base import Option, Scheduler
from llmqueue.schedulers.plan import Plan, Running, Waiting


class VLLMv1(Scheduler):
    name = "vllm-v1"
    summary = "vLLM v1: running requests first (decodes and prefill chunks), then waiting, one budget"
    work_conserving = False
    options = {
        "max_num_seqs": Option(int, 256, "most requests running at once (vLLM's max_num_seqs)", minimum=1),
        "long_prefill_token_threshold": Option(int, 0, "largest prefill chunk per step, 0 = no limit; a request "
                                               "alone in the engine is not capped (vLLM >= 0.32)", minimum=0),
        "long_prefill_threshold_when_alone": Option(bool, False, "cap a lone request's chunks too (vLLM < 0.32, "
                                                    "before its PR #57951)"),
    }

    def compose(self) -> Plan:
        max_chunk = self.settings["long_prefill_token_threshold"] or None
        alone = self.settings["long_prefill_threshold_when_alone"]
        return Plan((Running(max_chunk=max_chunk, cap_alone=alone),
                     Waiting(max_chunk=max_chunk, max_running=self.settings["max_num_seqs"], cap_alone=alone)))
