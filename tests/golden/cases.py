"""The golden cases: their one definition, used by make_golden.py (to write the golden files)
and by tests/test_golden.py (to rebuild and check them).  See README.md in this folder.

Every case is built only with the library's public entry points:

* single engine: the scenario's TOML (``llmqueue.scenarios.scenario_data``), ``--set``-style
  overrides (``llmqueue.config.parse_override`` / ``set_dotted``), ``llmqueue.config.parse_config``,
  then ``llmqueue.runner.build_workload``, ``generate``, ``build_engine`` and ``execute``
  (which calls ``llmqueue.core.simulator.simulate`` and ``llmqueue.metrics.summarize``);
* streaming: ``llmqueue.core.stream.request_chunks`` and ``llmqueue.core.stream.simulate_stream`` on an
  engine from ``build_engine``;
* networks: ``llmqueue.network.load_network`` (built-in scenario + overrides) and
  ``llmqueue.network.simulate_network``, summarised by ``llmqueue.network.summarize_network``.

What is recorded (:func:`single_record`, :func:`stream_record`, :func:`network_record`) also lives
here, so that the generator and the test cannot drift apart.  Names of scenarios, schedulers and
engines are written out (not read from the library) so that the case list cannot change under
the test; make_golden.py checks at generation time that they cover the library's lists.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).resolve().parent
COMMIT = "f56e29d"
SEP = "::"  # key = case id + SEP + quantity, in the .npz files

SINGLE_FILE = GOLDEN_DIR / "single.npz"
STREAM_FILE = GOLDEN_DIR / "stream.npz"
NETWORK_FILE = GOLDEN_DIR / "network.npz"

# The library's lists at f56e29d (make_golden.py asserts these equal them).
SCHEDULER_NAMES = ("fastertransformer", "vllm", "orca", "sarathi", "vllm-v1", "maxweight")
SINGLE_SCENARIOS = ("fig1", "theorem2", "bursty", "point-c")
NETWORK_ENGINES = {
    "rybko-stolyar": ("S1", "S2"),
    "rybko-stolyar-reverse": ("S1", "S2"),
    "fork-join": ("P", "W"),
    "dag": ("plan", "search", "code", "merge"),
    "agent-loop": ("llm",),
    "tandem": ("E1", "E2", "E3"),
}

#: Network scenarios added after the goldens were recorded, with why they have none: the goldens
#: pin what the cores computed then, and these run on code (pools of replicas) that did not exist.
NETWORK_NOT_GOLDEN = {"agent-pool": "a pool node (docs/network.md, 'Pools as engines'): the reference loop only"}

# Shortened horizons (seconds): a few thousand requests / batches per case.
SINGLE_HORIZON = {"fig1": 200.0, "theorem2": 100.0, "bursty": 120.0, "point-c": 120.0}
NETWORK_HORIZON = {"rybko-stolyar": 250.0, "rybko-stolyar-reverse": 250.0, "fork-join": 30.0, "dag": 25.0,
                   "agent-loop": 40.0, "tandem": 30.0}


# ---- single engine -------------------------------------------------------------------------

# Settings that keep a case's figures as recorded at f56e29d where a default changed since; applied
# after a case's overrides, and not part of them (not recorded in the golden files).  vllm-v1's
# long_prefill_token_threshold: since vLLM >= 0.32's rule became the default (a lone request is not
# capped), the cases with a threshold pin the rule they were recorded with (docs/policies.md).
OLD_THRESHOLD_RULE = ("engine.long_prefill_threshold_when_alone=true",)


@dataclass(frozen=True)
class SingleCase:
    id: str
    scenario: str
    overrides: tuple[str, ...]   # --set style, applied to the scenario's TOML in order
    pins: tuple[str, ...] = ()   # applied after them (OLD_THRESHOLD_RULE)

    @property
    def records(self) -> bool:
        """Whether the run keeps per-batch records (as configured, or set here)."""
        return self.config("reference").run.record_batches

    def config(self, method: str, record_batches: bool | None = None):
        from llmqueue.config import parse_config, parse_override, set_dotted
        from llmqueue.scenarios import scenario_data

        data = scenario_data(self.scenario)
        extra = [f"run.method={method}"]
        if record_batches is not None:
            extra.append(f"run.record_batches={'true' if record_batches else 'false'}")
        for item in (*self.overrides, *self.pins, *extra):
            set_dotted(data, *parse_override(item))
        return parse_config(data)

    def run(self, method: str, record_batches: bool | None = None):
        """(Run, engine) of the case with simulator method ``method``."""
        from llmqueue.runner import build_engine, build_workload, execute, generate

        config = self.config(method, record_batches)
        workload = build_workload(config)
        requests = generate(config, workload)
        engine = build_engine(config)
        return execute(config, engine, workload, requests), engine


def _single_cases() -> list[SingleCase]:
    out = []

    def add(name: str, scenario: str, *overrides: str, horizon: bool = True) -> None:
        h = (f"run.horizon_s={SINGLE_HORIZON[scenario]!r}",) if horizon else ()
        pins = OLD_THRESHOLD_RULE if any(o.startswith("engine.long_prefill_token_threshold=") for o in overrides) else ()
        out.append(SingleCase(name, scenario, (*h, *overrides), pins))

    for scenario in SINGLE_SCENARIOS:
        for s in SCHEDULER_NAMES:
            # fig1 keeps its full per-batch record (the batch compositions are pinned)
            rec = ("run.record_batches=true",) if scenario == "fig1" else ()
            add(f"{scenario}-{s}", scenario, f"engine.scheduler={s}", *rec)
        for s in ("vllm", "fastertransformer"):
            if scenario != "theorem2":  # fixed 100-token prompts: splitting changes nothing there
                add(f"{scenario}-{s}-split", scenario, f"engine.scheduler={s}", "engine.split_prompts=true")
    for scenario in ("fig1", "bursty"):
        add(f"{scenario}-vllm-v1-seqs8-chunk64", scenario, "engine.scheduler=vllm-v1", "engine.max_num_seqs=8",
            "engine.long_prefill_token_threshold=64")
    for s in SCHEDULER_NAMES:  # a request cap on the Fig. 1 workload
        add(f"fig1-{s}-cap16", "fig1", f"engine.scheduler={s}", "engine.max_batch_requests=16")
    add("fig1-vllm-split-cap16", "fig1", "engine.scheduler=vllm", "engine.split_prompts=true",
        "engine.max_batch_requests=16")
    add("fig1-sarathi-drain", "fig1", "engine.scheduler=sarathi", "run.drain=true")
    add("theorem2-vllm-drain", "theorem2", "engine.scheduler=vllm", "run.drain=true")
    add("point-c-sarathi-budget1024", "point-c", "engine.scheduler=sarathi", "engine.token_budget=1024")
    # no horizon: a request count, the run ends at the last arrival
    add("fig1-vllm-v1-requests2000", "fig1", "engine.scheduler=vllm-v1", "run.requests=2000", horizon=False)
    return out


SINGLE_CASES: tuple[SingleCase, ...] = tuple(_single_cases())

#: Summary keys of llmqueue.metrics.summarize that are recorded (everything but wall_s).
SINGLE_SUMMARY_SKIP = {"wall_s"}
SINGLE_ARRAYS = ("finish_time", "first_token_time", "rejected", "batch_end_time", "batch_tokens")
#: Per-batch record columns (llmqueue.core.simulator.BATCH_COLUMNS, "end_time" is batch_end_time)
BATCH_RECORD_COLUMNS = ("start_time", "num_prefill_tokens", "num_decode_tokens", "num_requests", "demand", "bound")


def single_record(run, engine) -> Record:
    """What is pinned of one single-engine run (Python scalars and numpy arrays by name)."""
    r, s = run.result, run.summary
    out: Record = {}
    out["end_time"] = float(r.end_time)
    out["num_requests"] = len(r.arrival_time)
    out["num_batches"] = int(r.num_batches)
    out["violations"] = int(r.violations)
    # the workload (not the core): sums only, to tell a workload change from a core change
    out["input.arrival_time_sum"] = float(np.sum(r.arrival_time))
    out["input.prompt_tokens_sum"] = int(np.sum(r.num_prompt_tokens))
    out["input.output_tokens_sum"] = int(np.sum(r.num_output_tokens))
    # the engine's state at the end (as reference stepping leaves it)
    out["engine.num_in_engine"] = int(engine.num_in_engine)
    out["engine.num_prefilling"] = len(engine.state.prefilling)
    out["engine.num_decoding"] = len(engine.state.decoding)
    out["engine.total_prefill_left"] = int(engine.state.total_prefill_left)
    out["engine.num_rejected"] = len(engine.rejected)
    # derived here (the project has no such metric): every batch's tokens over the horizon
    out["derived.all_batch_tokens_per_s"] = float(r.batch_tokens.sum() / r.end_time) if r.end_time > 0 else 0.0
    for key, value in flatten(s, "summary").items():
        if key.split(".")[1] not in SINGLE_SUMMARY_SKIP:
            out[key] = value
    for name in SINGLE_ARRAYS:
        out[name] = np.asarray(getattr(r, name))
    if r.batches is not None:
        for name in BATCH_RECORD_COLUMNS:
            out[f"batches.{name}"] = np.asarray(r.batches[name])
    return out


# ---- streaming -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamCase:
    id: str
    scheduler: str
    chunk: int
    num_requests: int | None = None
    horizon_s: float | None = None
    drain: bool = False
    scenario: str = "fig1"

    def run(self, compiled: bool | None) -> dict:
        """simulate_stream's summary (``compiled`` None: the function's default)."""
        from llmqueue.config import parse_config, parse_override, set_dotted
        from llmqueue.runner import build_engine, build_workload
        from llmqueue.scenarios import scenario_data
        from llmqueue.core.stream import request_chunks, simulate_stream

        data = scenario_data(self.scenario)
        set_dotted(data, *parse_override(f"engine.scheduler={self.scheduler}"))
        config = parse_config(data)
        workload = build_workload(config)
        chunks = request_chunks(workload, config.run.seed, num_requests=self.num_requests, horizon_s=self.horizon_s,
                                chunk=self.chunk)
        kwargs = {} if compiled is None else {"compiled": compiled}
        return simulate_stream(build_engine(config), chunks, horizon_s=self.horizon_s, drain=self.drain, **kwargs)


STREAM_CASES: tuple[StreamCase, ...] = (
    StreamCase("fig1-sarathi-30k", "sarathi", chunk=4096, num_requests=30000),
    StreamCase("fig1-vllm-30k", "vllm", chunk=4096, num_requests=30000),
    StreamCase("fig1-fastertransformer-20k", "fastertransformer", chunk=3000, num_requests=20000),
    StreamCase("fig1-sarathi-horizon1500", "sarathi", chunk=5000, horizon_s=1500.0),
    StreamCase("fig1-vllm-v1-horizon1500-drain", "vllm-v1", chunk=5000, horizon_s=1500.0, drain=True),
    StreamCase("fig1-orca-30k", "orca", chunk=4096, num_requests=30000),
)
STREAM_SKIP = {"wall_s"}


def stream_record(summary: dict) -> Record:
    return {k: v for k, v in flatten(summary, "summary").items() if k.split(".")[1] not in STREAM_SKIP}


# ---- networks ------------------------------------------------------------------------------

@dataclass(frozen=True)
class NetworkCase:
    id: str
    scenario: str
    overrides: tuple[str, ...]

    def network(self):
        from llmqueue.network import load_network

        return load_network(self.scenario, list(self.overrides))

    def run(self, method: str = "fast"):
        from llmqueue.network import simulate_network

        return simulate_network(self.network(), method=method)


def _network_cases() -> list[NetworkCase]:
    out = []
    for scenario, engines in NETWORK_ENGINES.items():
        h = f"run.horizon_s={NETWORK_HORIZON[scenario]!r}"
        out.append(NetworkCase(f"{scenario}-config", scenario, (h,)))
        out.append(NetworkCase(f"{scenario}-max-pressure", scenario,
                               (h, *(f"engines.{e}.policy=max-pressure" for e in engines))))
        for s in SCHEDULER_NAMES:
            out.append(NetworkCase(f"{scenario}-{s}", scenario, (h, *(f"engines.{e}.scheduler={s}" for e in engines))))
    return out


NETWORK_CASES: tuple[NetworkCase, ...] = tuple(_network_cases())
NETWORK_SUB_ARRAYS = ("sub_engine", "sub_class", "sub_hop", "sub_job", "arrival_time", "num_prompt_tokens",
                      "num_output_tokens", "first_token_time", "finish_time", "rejected")
NETWORK_JOB_ARRAYS = ("job_class", "job_exit_time", "job_tokens", "job_rejected")
NETWORK_BATCH_COLUMNS = ("start_time", "end_time", "num_prefill_tokens", "num_decode_tokens", "num_requests",
                         "demand", "bound")
NETWORK_SUMMARY_SKIP = {"wall_s"}


def network_record(result) -> Record:
    from llmqueue.network import summarize_network

    out: Record = {"end_time": float(result.end_time), "num_engines": len(result.engines)}
    for j, engine in enumerate(result.engines):
        b = result.batches[j]
        out[f"engine{j}.batches"] = len(b["end_time"])
        out[f"engine{j}.tokens"] = int((b["num_prefill_tokens"] + b["num_decode_tokens"]).sum())
        out[f"engine{j}.violations"] = int(engine.violations)
        out[f"engine{j}.num_rejected"] = len(engine.rejected)
        out[f"engine{j}.num_in_engine"] = int(engine.num_in_engine)
        for name in NETWORK_BATCH_COLUMNS:
            out[f"engine{j}.batch.{name}"] = np.asarray(b[name])
    for name in (*NETWORK_SUB_ARRAYS, *NETWORK_JOB_ARRAYS):
        out[name] = np.asarray(getattr(result, name))
    out["input.job_entry_time_sum"] = float(result.job_entry_time.sum())
    summary = summarize_network(result)
    for key, value in flatten(summary, "summary").items():
        if key.split(".")[1] not in NETWORK_SUMMARY_SKIP:
            out[key] = value
    return out


# ---- helpers -------------------------------------------------------------------------------

Record = dict  # quantity -> a Python scalar (kept in the case's JSON) or a numpy array (an .npz entry)


def flatten(value, prefix: str) -> Record:
    """A JSON-like summary as flat ``prefix.a.b.0`` keys of Python scalars (None kept as None)."""
    out: Record = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}"))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}.{i}"))
    elif value is None or isinstance(value, str):
        out[prefix] = value
    elif isinstance(value, (bool, np.bool_)):
        out[prefix] = bool(value)
    elif isinstance(value, (int, np.integer)):
        out[prefix] = int(value)
    elif isinstance(value, (float, np.floating)):
        out[prefix] = float(value)
    elif isinstance(value, np.ndarray) and value.ndim == 0:
        out.update(flatten(value.item(), prefix))
    else:
        raise TypeError(f"{prefix}: cannot record a {type(value).__name__}")
    return out


def pack(case_id: str, record: Record) -> dict[str, np.ndarray]:
    """The .npz entries of one case: each array as ``id::name``, the scalars as one JSON text
    ``id::scalars`` (floats written by repr, so they read back bit for bit; NaN as NaN)."""
    arrays = {f"{case_id}{SEP}{k}": v for k, v in record.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in record.items() if not isinstance(v, np.ndarray)}
    arrays[f"{case_id}{SEP}scalars"] = np.str_(json.dumps(scalars, sort_keys=True))
    return arrays


def unpack(npz, case_id: str) -> Record:
    """A case's record from an open .npz (following ``same_as``: a case whose record equalled an
    earlier one's is stored as a reference to it)."""
    head = f"{case_id}{SEP}"
    keys = [k for k in npz.files if k.startswith(head)]
    if f"{head}scalars" not in keys:
        raise KeyError(case_id)
    out: Record = json.loads(str(npz[f"{head}scalars"]))
    for k in keys:
        name = k[len(head):]
        if name != "scalars":
            out[name] = npz[k]
    if "same_as" in out:
        own = {k: out[k] for k in ("same_as", "meta.overrides")}
        out = unpack(npz, out["same_as"])
        out.update(own)
    return out


def case_ids(npz) -> set[str]:
    return {k.split(SEP, 1)[0] for k in npz.files} - {"_meta"}


def same_record(a: Record, b: Record, ignore: tuple[str, ...] = ("meta.",)) -> bool:
    """Exact equality (bit for bit, NaN equal to NaN) of two records, ``ignore`` prefixes aside."""
    ka = {k for k in a if not k.startswith(ignore)}
    kb = {k for k in b if not k.startswith(ignore)}
    if ka != kb:
        return False
    for k in ka:
        x, y = a[k], b[k]
        if isinstance(x, np.ndarray) != isinstance(y, np.ndarray):
            return False
        if isinstance(x, np.ndarray):
            if x.dtype != y.dtype or x.shape != y.shape:
                return False
            if not (np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f" else np.array_equal(x, y)):
                return False
        elif type(x) is not type(y) or not (x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))):
            return False
    return True
