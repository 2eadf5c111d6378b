"""The model of one engine (paper §3.1): requests and the one function that advances them
(:mod:`~llmqueue.model.request`), batch plans and budget arithmetic (:mod:`~llmqueue.model.batch`),
batch-time models (:mod:`~llmqueue.model.batch_time`, Assumption 1, Eq. 4) and workloads
(:mod:`~llmqueue.model.workload`: arrival processes, length laws, traces)."""
