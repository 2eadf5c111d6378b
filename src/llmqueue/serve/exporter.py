"""Prometheus metrics of the server under vLLM's names (docs/serving.md, "Metrics").

The names, types, labels (``model_name``, ``engine``) and histogram buckets are those of vLLM's
``PrometheusStatLogger.__init__`` in ``vllm/v1/metrics/loggers.py``, so dashboards and load tools
written for vLLM read this server too.  prometheus-client appends ``_total`` to counters:
``vllm:num_preemptions`` is exposed as ``vllm:num_preemptions_total``.  Quantities vLLM has no
name for are under ``llmqueue:``.  Each server has its own registry (several servers may run in
one process, as in the tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# vllm/v1/metrics/loggers.py, PrometheusStatLogger.__init__
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_GAP_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                     40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def _buckets_1_2_5(largest: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``largest`` (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > largest:
                return out
            out.append(m * scale)
        scale *= 10


class Metrics:
    """The server's metrics; the engine thread updates them, ``/metrics`` renders them."""

    def __init__(self, model_name: str, max_model_len: int) -> None:
        self.registry = r = CollectorRegistry()
        names = ["model_name", "engine"]
        values = (model_name, "0")

        def one(cls, name, doc, **kw):
            return cls(name, doc, names, registry=r, **kw).labels(*values)

        self.running = one(Gauge, "vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = one(Gauge, "vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = one(Gauge, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.preemptions = one(Counter, "vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = one(Counter, "vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = one(Counter, "vllm:generation_tokens", "Number of generation tokens processed.")
        self.iteration_tokens = one(Histogram, "vllm:iteration_tokens_total",
                                    "Histogram of number of tokens per engine_step.", buckets=ITERATION_TOKEN_BUCKETS)
        self.ttft = one(Histogram, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                        buckets=TTFT_BUCKETS)
        self.itl = one(Histogram, "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                       buckets=TOKEN_GAP_BUCKETS)
        self.tpot = one(Histogram, "vllm:time_per_output_token_seconds",
                        "Histogram of time per output token in seconds.", buckets=TOKEN_GAP_BUCKETS)
        self.e2e = one(Histogram, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                       buckets=REQUEST_LATENCY_BUCKETS)
        length_buckets = _buckets_1_2_5(max_model_len)
        self.request_prompt = one(Histogram, "vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                  buckets=length_buckets)
        self.request_generation = one(Histogram, "vllm:request_generation_tokens",
                                      "Number of generation tokens processed.", buckets=length_buckets)
        self._success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                [*names, "finished_reason"], registry=r)
        self._success_values = values
        for reason in ("stop", "length", "abort"):   # every reason shown from the start, as vLLM does
            self._success.labels(*values, reason)
        self.batch_duration = Histogram("llmqueue:batch_duration_seconds", "Measured duration of each batch.",
                                        buckets=BATCH_BUCKETS, registry=r)
        self._refused = Counter("llmqueue:requests_refused", "Requests answered with an error before they ran, "
                                "by HTTP status.", ["status"], registry=r)

    def state(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)

    def batch(self, prefill_tokens: int, decode_tokens: int, preemptions: int, duration_s: float) -> None:
        self.prompt_tokens.inc(prefill_tokens)
        self.iteration_tokens.observe(prefill_tokens + decode_tokens)
        if preemptions:
            self.preemptions.inc(preemptions)
        self.batch_duration.observe(duration_s)

    def tokens(self, count: int) -> None:
        self.generation_tokens.inc(count)

    def first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def inter_token(self, gap_s: float, tokens: int) -> None:
        for _ in range(tokens):
            self.itl.observe(gap_s / tokens)

    def finished(self, gen) -> None:
        """A request ended (any reason; aborted ones count under finished_reason "abort")."""
        self._success.labels(*self._success_values, gen.finish_reason).inc()
        if gen.first_token_time is None:
            return
        self.request_prompt.observe(len(gen.prompt_ids))
        self.request_generation.observe(len(gen.tokens))
        self.e2e.observe(gen.last_token_time - gen.arrival_time)
        if len(gen.tokens) > 1:
            self.tpot.observe((gen.last_token_time - gen.first_token_time) / (len(gen.tokens) - 1))

    def refused(self, status: int) -> None:
        self._refused.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
