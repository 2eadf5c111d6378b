"""TOML configuration of one run: schema, validation, dotted overrides (docs/config.md).

A config has three tables (all keys optional, defaults are the paper's Fig. 1 setting):

* ``[engine]``  scheduler (a name, or ``path/to/policy.py:Class``: docs/policies.md),
  token_budget (b_max), max_batch_requests (k_max), the chosen scheduler's options, and
  ``[engine.batch_time]`` (model and its parameters in ms);
* ``[workload]`` arrival (poisson | deterministic | gamma | trace), rate (requests/s) or
  load (a fraction of Theorem 2's λ*), cv (gamma), trace options, and the
  ``[workload.prompt]`` / ``[workload.output]`` length distributions;
* ``[run]``     horizon_s or requests, seed, drain, record_batches, verdict_tolerance, reject_tolerance, method
  (``fast``: the compiled core where it can run, or ``reference``: one engine step per batch).

Every error names the dotted field, the value and what is allowed.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmqueue.model.batch_time import PAPER_STAIRCASE, make_batch_time
from llmqueue.model.kv import make_kv
from llmqueue.model.workload import make_shared_prefix
from llmqueue.checks import boolean, check_input_file, file_size, integer, number
from llmqueue.errors import ConfigError
from llmqueue.limits import check_token_budget
from llmqueue.schedulers import SCHEDULERS, custom, scheduler_class
from llmqueue.core.simulator import METHODS

DEFAULTS: dict[str, dict[str, Any]] = {
    "engine": {"scheduler": "sarathi", "token_budget": 512, "batch_time": dict(PAPER_STAIRCASE)},
    "workload": {
        "arrival": "poisson",
        "load": 0.9,
        "prompt": {"dist": "poisson", "mean": 129},
        "output": {"dist": "poisson", "mean": 112},
    },
    "run": {"horizon_s": 1200.0, "seed": 0},
}

ENGINE_KEYS = {"scheduler", "token_budget", "max_batch_requests", "batch_time", "kv_blocks", "block_size", "kv_policy",
               "prefix_caching"}
WORKLOAD_KEYS = {"arrival", "rate", "load", "cv", "trace", "format", "time_scale", "loop", "max_tokens",
                 "cap_mode", "on_bad_row", "prompt", "output", "shared_prefix"}
RUN_KEYS = {"horizon_s", "requests", "seed", "drain", "record_batches", "verdict_tolerance", "reject_tolerance",
            "method"}
ARRIVALS = ("poisson", "deterministic", "gamma", "trace")
TRACE_KEYS = {"trace", "format", "time_scale", "loop", "max_tokens", "cap_mode", "on_bad_row"}


@dataclass(frozen=True)
class RunConfig:
    horizon_s: float | None
    requests: int | None
    seed: int
    drain: bool
    record_batches: bool
    verdict_tolerance: float
    method: str = "fast"          # simulator loop: "fast" or "reference" (identical results)
    reject_tolerance: float = 0.001   # share of arrivals rejected above which the verdict is "rejects"


@dataclass(frozen=True)
class Config:
    """A validated config; ``data`` is the resolved TOML (defaults filled in)."""

    data: dict[str, Any]
    base_dir: Path
    run: RunConfig

    @property
    def engine(self) -> dict[str, Any]:
        return self.data["engine"]

    @property
    def workload(self) -> dict[str, Any]:
        return self.data["workload"]

    @property
    def scheduler_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.engine.items() if k not in ENGINE_KEYS}

    def resolve(self, path: str) -> Path:
        """A file named in the config: relative paths are relative to the config file."""
        p = Path(path)
        return p if p.is_absolute() else self.base_dir / p

    def portable(self) -> dict[str, Any]:
        """The resolved config with absolute file paths, valid from any folder."""
        data = copy.deepcopy(self.data)
        tables = [data["workload"], *(data["workload"].get(k) for k in ("prompt", "output"))]
        for table in tables:
            if isinstance(table, dict) and isinstance(table.get("trace"), str):
                table["trace"] = str(self.resolve(table["trace"]))
        return data


# ---- loading ---------------------------------------------------------------------------

#: Largest config file read (bytes): a config is a few kB; anything bigger is not one (docs/config.md).
MAX_CONFIG_BYTES = 10 * 2**20
#: Deepest nesting of tables and arrays a config may have (docs/config.md).
MAX_TOML_DEPTH = 100


def read_toml(path: Path, missing: str = "an existing TOML file") -> dict[str, Any]:
    """A TOML file's tables; unreadable, malformed, non-regular or oversized (MAX_CONFIG_BYTES) files
    raise a ConfigError naming the file."""
    check_input_file(path, "config", "TOML file", MAX_CONFIG_BYTES)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)   # bounded even if the file grows meanwhile
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError("config", str(path), missing) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("config", str(path), f"a readable UTF-8 TOML file ({exc.__class__.__name__})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError("config", str(path), f"a TOML file of at most {file_size(MAX_CONFIG_BYTES)}")
    return parse_toml(text, str(path))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (None: the defaults), apply ``key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        p = Path(path)
        data = read_toml(p)
        base_dir = p.resolve().parent
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return parse_config(data, base_dir)


# Keys that replace each other: setting one (e.g. by --set) removes the other.
EXCLUSIVE = {"run.requests": "run.horizon_s", "run.horizon_s": "run.requests",
             "workload.rate": "workload.load", "workload.load": "workload.rate"}


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """TOML text as tables; malformed or too deeply nested text (MAX_TOML_DEPTH) raises a ConfigError."""
    too_deep = f"TOML nested at most {MAX_TOML_DEPTH} levels deep (tables and arrays)"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", source, f"valid TOML ({exc})") from None
    except RecursionError:   # tomllib recurses once per nested array or inline table
        raise ConfigError("config", source, too_deep) from None
    if _depth(data) > MAX_TOML_DEPTH:
        raise ConfigError("config", source, too_deep)
    return data


def _depth(value: Any) -> int:
    """Nesting depth of tables and arrays (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, level + 1)
        if level + 1 > MAX_TOML_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def parse_override(item: str) -> tuple[str, Any]:
    """``engine.token_budget=1024`` -> ("engine.token_budget", 1024); bare words are strings."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", item, "key=value with a dotted key, e.g. engine.token_budget=1024")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except RecursionError:
        raise ConfigError("--set", item, f"a value nested at most {MAX_TOML_DEPTH} levels deep") from None
    if _depth(value) > MAX_TOML_DEPTH - key.count(".") - 1:
        raise ConfigError("--set", item, f"a value nested at most {MAX_TOML_DEPTH} levels deep")
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c = value`` in nested tables, dropping a key it replaces (EXCLUSIVE)."""
    if key in EXCLUSIVE:
        section, _, other = EXCLUSIVE[key].partition(".")
        if isinstance(data.get(section), dict):
            data[section].pop(other, None)
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), child, "a table, since --set addresses a key inside it")
        node = child
    node[parts[-1]] = value


# ---- validation ------------------------------------------------------------------------

def _table(data: Mapping[str, Any], key: str, field: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(field, value, "a table")
    return dict(value)


def _check_keys(table: Mapping[str, Any], allowed: set[str], field: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{field}.{key}", table[key], f"a known key: {', '.join(sorted(allowed))}")


def parse_config(data: Mapping[str, Any], base_dir: Path | None = None) -> Config:
    """Validate a config mapping (merging defaults) into a :class:`Config`."""
    base_dir = base_dir or Path.cwd()
    # [real] holds the real CPU engine's settings (docs/real_engine.md); `llmqueue engine` reads
    # it, and the simulator ignores it, so one file drives both.
    _check_keys(data, {"engine", "workload", "run", "real"}, "config")
    engine = {**DEFAULTS["engine"], **_table(data, "engine", "engine")}
    workload = _workload_table(_table(data, "workload", "workload"))
    given_run = _table(data, "run", "run")
    run = {**DEFAULTS["run"], **given_run}
    if "horizon_s" not in given_run and ("requests" in given_run or workload["arrival"] == "trace"):
        del run["horizon_s"]  # the default horizon gives way to a count, or to a whole trace

    name = engine["scheduler"]
    cls = scheduler_class(name, base_dir)   # a registered name, or a policy file (relative to the config)
    if name not in SCHEDULERS:   # a file reference: kept with its absolute path (portable, --out's config.toml)
        engine["scheduler"] = custom.resolve(name, base_dir)
    options = set(cls.options)
    _check_keys(engine, ENGINE_KEYS | options, "engine")
    budget = engine["token_budget"] = integer(engine["token_budget"], "engine.token_budget", 1,
                                              what="a batch must fit at least one decode token")
    if engine.get("max_batch_requests") is not None:
        engine["max_batch_requests"] = integer(engine["max_batch_requests"], "engine.max_batch_requests", 1)
    batch_time = engine["batch_time"]
    if not isinstance(batch_time, dict):
        raise ConfigError("engine.batch_time", batch_time, "a table with a model and its parameters")
    check_token_budget(budget)   # before the table it sizes (docs/config.md, limits)
    make_batch_time(batch_time).table(budget)  # validates parameters and positivity
    kv = make_kv(engine)   # KV memory (docs/memory.md): kv_blocks, block_size, kv_policy
    if kv is not None:
        engine.update(kv_blocks=kv.blocks, block_size=kv.block_size, kv_policy=kv.policy)
        if kv.prefix_caching:   # docs/prefix_caching.md
            engine["prefix_caching"] = True
    custom.build(cls, {k: v for k, v in engine.items() if k in options})  # validates options (and the plan)

    _check_keys(run, RUN_KEYS, "run")
    if "horizon_s" in run and "requests" in run:
        raise ConfigError("run.requests", run["requests"], "omitted when run.horizon_s is given (choose one horizon)")
    horizon = number(run["horizon_s"], "run.horizon_s", above=0) if "horizon_s" in run else None
    requests = integer(run["requests"], "run.requests", 1) if "requests" in run else None
    rc = RunConfig(
        horizon_s=horizon,
        requests=requests,
        seed=integer(run["seed"], "run.seed", 0),
        drain=boolean(run.get("drain", False), "run.drain"),
        record_batches=boolean(run.get("record_batches", False), "run.record_batches"),
        verdict_tolerance=number(run.get("verdict_tolerance", 0.01), "run.verdict_tolerance", above=0),
        method=_method(run.get("method", "fast")),
        reject_tolerance=number(run.get("reject_tolerance", 0.001), "run.reject_tolerance", at_least=0, at_most=1),
    )
    resolved = {"engine": engine, "workload": workload, "run": run}
    return Config(resolved, base_dir, rc)


def trace_shortfall(cfg: Config, generated: int) -> str | None:
    """A warning when ``run.requests`` asks more requests than a trace (with its loops) holds
    (``generated``): the run replays all of them and stops, shorter than asked (docs/config.md)."""
    wanted = cfg.run.requests
    if wanted is None or cfg.workload.get("arrival") != "trace" or generated >= wanted:
        return None
    loops = int(cfg.workload.get("loop", 1))
    per_copy = max(generated // loops, 1)
    need = -(-wanted // per_copy)
    return (f"run.requests = {wanted} is more than the trace {cfg.workload['trace']} holds ({generated} requests"
            f"{f' in {loops} loops' if loops > 1 else ''}): the run has only {generated}; set workload.loop = {need} "
            f"to replay the trace, or lower run.requests")


def _method(value: Any) -> str:
    if value not in METHODS:
        raise ConfigError("run.method", value, f"one of {', '.join(METHODS)} (all give identical results)")
    return value


def _workload_table(given: dict[str, Any]) -> dict[str, Any]:
    arrival = given.get("arrival", "trace" if "trace" in given else DEFAULTS["workload"]["arrival"])
    if arrival not in ARRIVALS:
        raise ConfigError("workload.arrival", arrival, f"one of {', '.join(ARRIVALS)}")
    _check_keys(given, WORKLOAD_KEYS, "workload")
    make_shared_prefix(given.get("shared_prefix"))   # prefix caching (docs/prefix_caching.md)
    if arrival == "trace":
        if "trace" not in given:
            raise ConfigError("workload.trace", None, "a trace file path (required when arrival = \"trace\")")
        for key in ("rate", "load", "cv"):
            if key in given:
                raise ConfigError(f"workload.{key}", given[key], "omitted for a trace (use time_scale)")
        if "loop" in given:   # replays of the trace back to back (load_trace also caps the replayed count)
            given["loop"] = integer(given["loop"], "workload.loop", 1,
                                    what="the number of times the trace is replayed")
        return {"arrival": arrival, **given}
    extra = sorted(TRACE_KEYS & set(given))
    if extra:
        raise ConfigError(f"workload.{extra[0]}", given[extra[0]], 'only allowed with arrival = "trace"')
    table = {"arrival": arrival, **{k: v for k, v in given.items() if k != "arrival"}}
    if "rate" in table and "load" in table:
        raise ConfigError("workload.load", table["load"], "omitted when workload.rate is given (choose one)")
    if "rate" not in table and "load" not in table:
        table["load"] = DEFAULTS["workload"]["load"]
    key = "rate" if "rate" in table else "load"
    number(table[key], f"workload.{key}", above=0)
    for key in ("prompt", "output"):
        table.setdefault(key, dict(DEFAULTS["workload"][key]))
        if not isinstance(table[key], dict):
            raise ConfigError(f"workload.{key}", table[key], "a table with dist and its parameters")
    return table


# ---- writing TOML ----------------------------------------------------------------------

def dumps(data: Mapping[str, Any]) -> str:
    """Write a nested mapping of scalars and lists as TOML (enough for configs)."""
    lines: list[str] = []
    _dump_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _dump_table(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping) and v is not None}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if path and (scalars or not tables):
        lines.append(f"\n[{'.'.join(path)}]")
    for key, value in scalars.items():
        lines.append(f"{key} = {_value(value)}")
    for key, value in tables.items():
        _dump_table(value, [*path, key], lines)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
