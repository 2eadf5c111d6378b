"""A policy in one file that plans in Python: decode first, then shortest prompt first.

The plan vocabulary serves prompts oldest first; a policy that orders them otherwise overrides
``plan(state)`` and builds the batch itself with ``state.builder()`` (a BatchBuilder, which keeps
the token budget and the request cap).  Such a policy runs on the reference interpreter only:
the run's ``meta["method"]`` says "reference (scheduler ... plans in Python ...)", and a
warning says so once per scheduler name.

Each batch: one decode token for every decoding request, oldest first; then the next chunk of
any prompt already started (so it finishes), then new prompts shortest first, the last one cut
to the room left.  Like Sarathi it fills every batch to min(b_max, demand) without a request
cap: work-conserving.  See docs/policies.md.

    [engine]
    scheduler = "python_plan.py:ShortestPromptFirst"
"""

from llmqueue.model.batch import BatchPlan
from llmqueue.schedulers import EngineState, Scheduler


class ShortestPromptFirst(Scheduler):
    name = "shortest-prompt-first"
    summary = "decode first, then prompts shortest first, chunked (plans in Python)"
    work_conserving = True

    def plan(self, state: EngineState) -> BatchPlan:
        batch = state.builder()
        batch.add_decodes(state.decoding)
        started = [r for r in state.prefilling if r.prefill_left < r.num_prompt_tokens]
        fresh = sorted((r for r in state.prefilling if r.prefill_left == r.num_prompt_tokens),
                       key=lambda r: (r.num_prompt_tokens, r.rid))
        for request in started + fresh:
            if batch.full:
                break
            batch.add_prefill(request, split=True)
        return batch.build()
