"""User-defined schedulers (docs/policies.md): a policy in one file, used from configs, the
command line and Python; clear one-line errors for malformed ones; plan.validate's rules."""

from __future__ import annotations

import json
import textwrap
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest

from llmqueue.core import fastcore
from llmqueue.cli import main
from llmqueue.config import load_config, parse_config
from llmqueue.errors import ConfigError
from llmqueue.runner import build_engine, compare, run_config
from llmqueue.schedulers import (
    BUILTIN,
    SCHEDULERS,
    Option,
    Scheduler,
    make_scheduler,
    register,
    scheduler_class,
    unregister,
)
from llmqueue.schedulers.maxweight import MaxWeightLoad
from llmqueue.schedulers.plan import Decodes, LoadRule, Plan, Prefills, Running, Step, Waiting, validate

DOCS = Path(__file__).resolve().parents[1] / "docs" / "policies"
COMPOSED = DOCS / "decode_first_no_chunking.py"
PYPLAN = DOCS / "python_plan.py"
COMPOSED_REF = f"{COMPOSED}:DecodeFirstNoChunking"
PYPLAN_REF = f"{PYPLAN}:ShortestPromptFirst"
FAST = fastcore.unavailable() is None
SMALL = {"workload": {"rate": 5.0}, "run": {"horizon_s": 60.0, "seed": 3}, "engine": {"token_budget": 256}}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def config(tmp_path: Path, scheduler: str, name: str = "run.toml", **engine) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["[engine]", f"scheduler = {json.dumps(scheduler)}", "token_budget = 256",
             *(f"{k} = {json.dumps(v)}" for k, v in engine.items()),
             "[workload]", "rate = 5.0", "[run]", "horizon_s = 60.0", "seed = 3"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which schedulers were already said to plan in Python (fastcore says it once)."""
    monkeypatch.setattr(fastcore, "_said", set())


def same_run(a, b) -> None:
    for key in ("first_token_time", "finish_time", "rejected", "batch_end_time", "batch_tokens"):
        assert np.array_equal(getattr(a, key), getattr(b, key), equal_nan=True), key
    assert a.violations == b.violations


# ---- the worked examples ---------------------------------------------------------------

def test_shipped_example_config_runs_from_the_cli(capsys):
    code, out, err = run_cli(capsys, "simulate", DOCS / "example.toml", "--set", "run.horizon_s=60", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["scheduler"] == "decode-first-no-chunking" and summary["arrived"] > 500
    assert "warning" not in err


def test_composed_policy_runs_compiled_and_matches_the_reference():
    data = {**SMALL, "engine": {**SMALL["engine"], "scheduler": COMPOSED_REF}}
    fast = run_config(parse_config(data))
    ref = run_config(parse_config({**data, "run": {**data["run"], "method": "reference"}}))
    if FAST:
        assert fast.result.meta["method"] == "fast" and fast.result.meta["core"] == "compiled"
    assert ref.result.meta["method"] == "reference (selected)"
    same_run(fast.result, ref.result)
    assert fast.summary["scheduler"] == "decode-first-no-chunking"
    assert fast.summary["work_conserving_violations"] > 0   # whole prompts leave room: it claims no more


def test_composed_policy_option_gives_fastertransformer():
    """mixed = false is FasterTransformer's plan (decode-only batches, prompts not split)."""
    base = {**SMALL, "run": {**SMALL["run"], "record_batches": True}}
    mine = run_config(parse_config({**base, "engine": {**base["engine"], "scheduler": COMPOSED_REF, "mixed": False}}))
    ft = run_config(parse_config({**base, "engine": {**base["engine"], "scheduler": "fastertransformer"}}))
    same_run(mine.result, ft.result)
    with pytest.raises(ConfigError, match="engine.mixed"):
        parse_config({**base, "engine": {**base["engine"], "scheduler": COMPOSED_REF, "mixed": "no"}})


def test_python_plan_runs_on_the_reference_and_warns_once(fresh_warnings):
    data = {**SMALL, "engine": {**SMALL["engine"], "scheduler": PYPLAN_REF}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = run_config(parse_config(data))
        second = run_config(parse_config(data))
    said = [w for w in caught if "plans in Python" in str(w.message)]
    assert len(said) == 1 and issubclass(said[0].category, RuntimeWarning)
    assert "shortest-prompt-first" in str(said[0].message)
    for run in (first, second):
        assert run.result.meta["method"].startswith("reference (scheduler 'shortest-prompt-first' plans in Python")
        assert run.result.meta["core"] == "reference"
    same_run(first.result, second.result)
    assert first.summary["work_conserving_violations"] == 0 and first.summary["completed"] > 200


def test_python_plan_orders_prompts_shortest_first():
    from llmqueue.model.batch_time import make_batch_time
    from llmqueue.core.engine import Engine
    from llmqueue.model.request import Request

    engine = Engine(make_scheduler(PYPLAN_REF), 10, make_batch_time({"model": "constant", "duration_ms": 1.0}))
    for rid, prompt in enumerate((8, 3, 5)):
        engine.admit(Request(rid, 0.0, prompt, 1))
    plan = engine.scheduler.plan(engine.state)
    assert [(r.rid, n) for r, n in plan.prefill] == [(1, 3), (2, 5), (0, 2)]


def test_python_plan_from_the_cli_warns_on_one_line(capsys, tmp_path, fresh_warnings):
    code, out, err = run_cli(capsys, "simulate", config(tmp_path, PYPLAN_REF), "--json")
    assert code == 0, err
    assert json.loads(out)["scheduler"] == "shortest-prompt-first"
    lines = [line for line in err.splitlines() if "plans in Python" in line]
    assert len(lines) == 1 and lines[0].startswith("llmqueue: warning:")


def test_relative_path_is_relative_to_the_config_and_out_config_is_portable(capsys, tmp_path, monkeypatch):
    (tmp_path / "pol").mkdir()
    (tmp_path / "pol" / "mine.py").write_text(COMPOSED.read_text())
    cfg = config(tmp_path, "../pol/mine.py:DecodeFirstNoChunking", name="cfg/run.toml", mixed=False)
    monkeypatch.chdir(tmp_path / "pol")   # not the config's folder
    out_dir = tmp_path / "out"
    code, first, err = run_cli(capsys, "simulate", cfg, "--json", "--out", out_dir)
    assert code == 0, err
    written = tomllib.loads((out_dir / "config.toml").read_text())["engine"]
    assert written["scheduler"] == f"{(tmp_path / 'pol' / 'mine.py').resolve()}:DecodeFirstNoChunking"
    assert written["mixed"] is False
    monkeypatch.chdir(tmp_path)
    code, again, err = run_cli(capsys, "simulate", out_dir / "config.toml", "--json")
    assert code == 0, err
    assert json.loads(again)["completed"] == json.loads(first)["completed"]


def test_compare_takes_policy_files(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(DOCS.parent.parent)   # the repository root: paths relative to the working folder
    cfg = config(tmp_path, "sarathi")
    code, out, err = run_cli(capsys, "compare", "--config", cfg, "--out", tmp_path / "c", "--no-plot", "--schedulers",
                             "sarathi,docs/policies/decode_first_no_chunking.py:DecodeFirstNoChunking")
    assert code == 0, err
    runs = json.loads((tmp_path / "c" / "summary.json").read_text())["runs"]
    assert [r["scheduler"] for r in runs] == ["sarathi", "decode-first-no-chunking"]
    assert runs[0]["arrived"] == runs[1]["arrived"]
    code, _, err = run_cli(capsys, "compare", "--config", cfg, "--out", tmp_path / "c", "--no-plot",
                           "--schedulers", "sarathi,docs/policies/nope.py:X")
    assert code == 2 and "--schedulers" in err and "not found" in err and len(err.strip().splitlines()) == 1


def test_compare_keeps_the_configs_options_for_its_own_policy_file(tmp_path):
    cfg = load_config(config(tmp_path, COMPOSED_REF, mixed=False))
    assert build_engine(cfg, COMPOSED_REF).scheduler.settings == {"mixed": False}
    runs = compare(cfg, ["fastertransformer", cfg.engine["scheduler"]])
    same_run(runs[0].result, runs[1].result)


def test_policies_command_describes_files(capsys):
    code, out, err = run_cli(capsys, "policies", COMPOSED_REF, PYPLAN_REF)
    assert code == 0, err
    assert "decode-first-no-chunking" in out and "plan Decodes(), Prefills(split=False)" in out
    assert "option mixed (bool, default true)" in out
    assert "shortest-prompt-first" in out and "plans in Python" in out
    code, out, _ = run_cli(capsys, "policies")
    assert "plan Running(), Waiting(max_running=256)" in out
    code, _, err = run_cli(capsys, "policies", "nope.py:X")
    assert code == 2 and err.startswith("llmqueue: error: policies") and "not found" in err


def test_make_scheduler_resolves_files_against_base_dir():
    s = make_scheduler("decode_first_no_chunking.py:DecodeFirstNoChunking", base_dir=DOCS, mixed=False)
    assert s.name == "decode-first-no-chunking" and s.program == Plan((Decodes(exclusive=True), Prefills(split=False)))
    assert scheduler_class(COMPOSED_REF) is type(s)   # one import per file version
    assert COMPOSED_REF not in SCHEDULERS and "decode-first-no-chunking" not in SCHEDULERS
    import sys
    assert str(DOCS) not in sys.path


# ---- malformed policy files: one clear line each ---------------------------------------

HEAD = "from llmqueue.schedulers import Option, Scheduler\nfrom llmqueue.schedulers.plan import *\n"
GOOD_ATTRS = "    name = 'p'\n    summary = 's'\n    work_conserving = True\n"
COMPOSE = "    def compose(self):\n        return Plan((Decodes(), Prefills()))\n"

BAD_POLICIES = [
    # (file text or None for no file, the reference, words the one line must hold)
    (None, "p.py:P", ["engine.scheduler", "not found"]),
    ("x = 1\n", "p.txt:P", ["not a .py file"]),
    ("x = 1\n", "p.py", ["':ClassName' is missing"]),
    ("x = 1\n", "p.py:", ["':ClassName' is missing"]),
    ("x = 1\n", "p.py:not-a-name", ["not a Python name"]),
    ("x = 1\n\ndef broken(:\n    pass\n", "p.py:P", ["SyntaxError", "p.py:3"]),
    ("import os\nraise RuntimeError('boom')\n", "p.py:P", ["RuntimeError: boom", "p.py:2"]),
    ("import no_such_module_here\n", "p.py:P", ["ModuleNotFoundError", "no_such_module_here", "p.py:1"]),
    (HEAD + "class A(Scheduler):\n" + GOOD_ATTRS + COMPOSE + "class B(A):\n    name = 'b'\n", "p.py:P",
     ["class 'P'", "Scheduler subclasses A, B"]),
    ("x = 1\n", "p.py:P", ["class 'P'", "defines no Scheduler subclass"]),
    ("class P:\n    name = 'p'\n", "p.py:P", ["subclass of llmqueue.schedulers.Scheduler", "the class P does not derive"]),
    ("P = 3\n", "p.py:P", ["subclass of llmqueue.schedulers.Scheduler", "object of type int"]),
    (HEAD + "class P(Scheduler):\n    summary = 's'\n    work_conserving = True\n" + COMPOSE, "p.py:P",
     ["P.name is missing"]),
    (HEAD + "class P(Scheduler):\n    name = 'p'\n    work_conserving = True\n" + COMPOSE, "p.py:P",
     ["P.summary is missing"]),
    (HEAD + "class P(Scheduler):\n    name = 'p'\n    summary = 's'\n" + COMPOSE, "p.py:P",
     ["P.work_conserving is missing"]),
    (HEAD + "class P(Scheduler):\n    name = 'p'\n    summary = 's'\n    work_conserving = 'yes'\n" + COMPOSE, "p.py:P",
     ["P.work_conserving", "a bool"]),
    (HEAD + "class P(Scheduler):\n    name = 'a:b'\n    summary = 's'\n    work_conserving = True\n" + COMPOSE,
     "p.py:P", ["P.name", "plain name"]),
    (HEAD + "class P(Scheduler):\n    name = 'sarathi'\n    summary = 's'\n    work_conserving = True\n" + COMPOSE,
     "p.py:P", ["P.name", "built-in"]),
    (HEAD + "class P(Scheduler):\n" + GOOD_ATTRS, "p.py:P", ["P.compose() is missing", "plan(state)", "neither"]),
    (HEAD + "class P(Scheduler):\n" + GOOD_ATTRS + "    def compose(self):\n        return (Decodes(), Prefills())\n",
     "p.py:P", ["P.compose()", "a Plan"]),
    (HEAD + "class P(Scheduler):\n" + GOOD_ATTRS + "    def compose(self):\n        return Plan((Prefills(),))\n",
     "p.py:P", ["P.compose()", "plan.steps", "a Decodes or Running step"]),
    (HEAD + "class P(Scheduler):\n" + GOOD_ATTRS + "    def compose(self):\n        return Plan((Decodes(), Prefills(split=False, max_chunk=8)))\n",
     "p.py:P", ["P.compose()", "plan.Prefills.max_chunk", "split=False"]),
    (HEAD + "class P(Scheduler):\n" + GOOD_ATTRS + "    def compose(self):\n        return Plan((Decodes(), Prefills(max_chunk=self.settings['cap'])))\n",
     "p.py:P", ["building P", "KeyError", "'cap'", "p.py:8"]),
    (HEAD + "class P(Scheduler):\n" + GOOD_ATTRS + "    options = {'cap': 3}\n" + COMPOSE, "p.py:P",
     ["P.options", "Option(type, default, help)"]),
    (HEAD + "class P(Scheduler):\n" + GOOD_ATTRS + "    options = {'token_budget': Option(int, 1, 'x')}\n" + COMPOSE,
     "p.py:P", ["P.options", "'token_budget'", "[engine] keys"]),
]


def _bad_case(tmp_path: Path, text: str | None, ref: str) -> Path:
    if text is not None:
        file = ref.partition(":")[0]
        (tmp_path / file).write_text(textwrap.dedent(text))
    return config(tmp_path, ref)


@pytest.mark.parametrize("text,ref,words", BAD_POLICIES)
def test_malformed_policy_is_one_line_on_the_cli(capsys, tmp_path, text, ref, words):
    code, out, err = run_cli(capsys, "simulate", _bad_case(tmp_path, text, ref), "--json")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmqueue: error: engine.scheduler"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("text,ref,words", BAD_POLICIES[:8])
def test_malformed_policy_is_a_config_error_in_python(tmp_path, text, ref, words):
    with pytest.raises(ConfigError) as info:
        load_config(_bad_case(tmp_path, text, ref))
    assert info.value.field.startswith("engine.scheduler")
    for word in words[1:]:
        assert word in str(info.value)


def test_unknown_name_mentions_policy_files(capsys, tmp_path):
    code, _, err = run_cli(capsys, "simulate", config(tmp_path, "fifo"))
    assert code == 2 and "engine.scheduler = 'fifo'" in err and "path/to/policy.py:ClassName" in err
    path = tmp_path / "n.toml"
    path.write_text("[engine]\nscheduler = 3\n")
    code, _, err = run_cli(capsys, "simulate", path)
    assert code == 2 and "engine.scheduler = 3" in err
    code, _, err = run_cli(capsys, "compare", "--schedulers", "sarathi,fifo", "--no-plot")
    assert code == 2 and "--schedulers: 'fifo'" in err and "policy.py:ClassName" in err


def test_an_edited_policy_file_is_imported_again(tmp_path):
    file = tmp_path / "p.py"
    file.write_text(HEAD + "class P(Scheduler):\n" + GOOD_ATTRS + COMPOSE)
    first = scheduler_class("p.py:P", tmp_path)
    file.write_text(HEAD + "class P(Scheduler):\n" + GOOD_ATTRS + "    # edited\n" + COMPOSE)
    assert scheduler_class("p.py:P", tmp_path) is not first


def test_a_policy_file_may_use_dataclasses_with_postponed_annotations(tmp_path):
    (tmp_path / "p.py").write_text("from __future__ import annotations\nfrom dataclasses import dataclass\n" + HEAD
                                   + "@dataclass\nclass Knob:\n    x: int = 1\n\nclass P(Scheduler):\n" + GOOD_ATTRS + COMPOSE)
    assert make_scheduler("p.py:P", base_dir=tmp_path).program == Plan((Decodes(), Prefills()))


# ---- register() ------------------------------------------------------------------------

class Mine(Scheduler):
    name = "mine-test"
    summary = "orca's plan under another name"
    work_conserving = True
    options = {"whole": Option(bool, False, "prompts never split")}

    def compose(self) -> Plan:
        return Plan((Prefills(split=not self.settings["whole"]), Decodes()))


@pytest.fixture
def registered():
    yield register(Mine)
    unregister(Mine.name)


def test_register_adds_a_scheduler_everywhere(registered, capsys):
    assert registered is Mine and SCHEDULERS["mine-test"] is Mine and "mine-test" not in BUILTIN
    assert make_scheduler("mine-test", whole=True).program == Plan((Prefills(split=False), Decodes()))
    cfg = parse_config({**SMALL, "engine": {**SMALL["engine"], "scheduler": "mine-test"}})
    mine, orca = compare(cfg, ["mine-test", "orca"])
    same_run(mine.result, orca.result)
    if FAST:
        assert mine.result.meta["method"] == "fast"
    code, out, _ = run_cli(capsys, "policies")
    assert code == 0 and "mine-test" in out and "option whole" in out
    with pytest.raises(ConfigError, match="engine.whole"):
        make_scheduler("mine-test", whole="yes")


def test_register_refuses_builtin_names_and_non_schedulers():
    class Clash(Mine):
        name = "sarathi"

    with pytest.raises(ConfigError, match="built-in scheduler"):
        register(Clash)
    with pytest.raises(ConfigError, match="subclass of llmqueue.schedulers.Scheduler"):
        register(dict)

    class Nameless(Scheduler):
        summary = "s"
        work_conserving = True

        def compose(self) -> Plan:
            return Plan((Decodes(), Prefills()))

    with pytest.raises(ConfigError, match="Nameless.name is missing"):
        register(Nameless)

    class BadPlan(Mine):
        name = "bad-plan-test"

        def compose(self) -> Plan:
            return Plan((Running(), Waiting(), Decodes()))

    with pytest.raises(ConfigError, match="Running .* without Decodes or Prefills"):
        register(BadPlan)
    assert SCHEDULERS.keys() == BUILTIN.keys()
    register(BUILTIN["sarathi"])   # a built-in itself is fine (no-op)
    assert SCHEDULERS["sarathi"] is BUILTIN["sarathi"]
    with pytest.raises(ConfigError, match="not a built-in"):
        unregister("sarathi")


def test_register_as_decorator_with_a_python_plan(fresh_warnings):
    try:
        @register
        class Decoy(Scheduler):
            name = "decoy-test"
            summary = "sarathi's batches, planned in Python"
            work_conserving = True

            def plan(self, state):
                b = state.builder()
                b.add_decodes(state.decoding)
                b.add_prefills(state.prefilling, split=True)
                return b.build()

        cfg = parse_config({**SMALL, "engine": {**SMALL["engine"], "scheduler": "decoy-test"}})
        with pytest.warns(RuntimeWarning, match="decoy-test.*plans in Python"):
            decoy, sarathi = compare(cfg, ["decoy-test", "sarathi"])
        assert decoy.result.meta["core"] == "reference"
        same_run(decoy.result, sarathi.result)
    finally:
        unregister("decoy-test")


# ---- plan.validate ---------------------------------------------------------------------

class Other(LoadRule):
    code = 1   # maxweight's code, taken


class Tweaked(MaxWeightLoad):
    def choose(self, state):
        return state.token_budget, 0


class Uncoded(LoadRule):
    def choose(self, state):
        return state.token_budget, 0


BAD_PLANS = [
    (lambda: Plan(()), "plan.steps", "non-empty tuple"),
    (lambda: Plan("Decodes"), "plan.steps", "non-empty tuple"),
    (lambda: Plan((Decodes(), "Prefills")), "plan.steps", "a Decodes, Prefills, Running or Waiting step"),
    (lambda: Plan((Decodes(), Step())), "plan.steps", "a Decodes, Prefills, Running or Waiting step"),
    (lambda: Plan((Decodes(), Decodes(), Prefills())), "plan.steps", "at most one Decodes step"),
    (lambda: Plan((Decodes(), Prefills(), Prefills(split=False))), "plan.steps", "at most one Prefills step"),
    (lambda: Plan((Running(), Waiting(), Running())), "plan.steps", "at most one Running step"),
    (lambda: Plan((Running(), Decodes(), Waiting())), "plan.steps", "Running (started prompts and decoders) without"),
    (lambda: Plan((Running(), Prefills(), Waiting())), "plan.steps", "Running (started prompts and decoders) without"),
    (lambda: Plan((Decodes(), Prefills(), Waiting())), "plan.steps", "Waiting or Prefills, not both"),
    (lambda: Plan((Waiting(), Running())), "plan.steps", "Waiting after Running"),
    (lambda: Plan((Decodes(), Prefills(split=False, max_chunk=4))), "plan.Prefills.max_chunk", "split=False"),
    (lambda: Plan((Decodes(), Prefills(max_chunk=0))), "plan.Prefills.max_chunk", "integer >= 1"),
    (lambda: Plan((Decodes(), Prefills(max_chunk=-3))), "plan.Prefills.max_chunk", "integer >= 1"),
    (lambda: Plan((Decodes(), Prefills(max_chunk=2.5))), "plan.Prefills.max_chunk", "integer >= 1"),
    (lambda: Plan((Decodes(), Prefills(max_chunk=True))), "plan.Prefills.max_chunk", "integer >= 1"),
    (lambda: Plan((Running(max_chunk="8"), Waiting())), "plan.Running.max_chunk", "integer >= 1"),
    (lambda: Plan((Running(), Waiting(max_running=0))), "plan.Waiting.max_running", "integer >= 1"),
    (lambda: Plan((Decodes(exclusive=1), Prefills())), "plan.Decodes.exclusive", "true or false"),
    (lambda: Plan((Decodes(), Prefills(split="no"))), "plan.Prefills.split", "true or false"),
    (lambda: Plan((Decodes(), Prefills(split=False)), load=Other), "plan.steps", "with a load rule"),
    (lambda: Plan((Prefills(), Decodes()), load=Other), "plan.steps", "with a load rule"),
    (lambda: Plan((Decodes(), Prefills()), load=LoadRule), "plan.load", "a LoadRule class"),
    (lambda: Plan((Decodes(), Prefills()), load=Other()), "plan.load", "a LoadRule class"),
    (lambda: Plan((Decodes(), Prefills()), load=Other), "plan.load", "the compiled core implements (MaxWeightLoad)"),
    (lambda: Plan((Decodes(), Prefills()), load=Tweaked), "plan.load", "override plan(state)"),
    (lambda: Plan((Decodes(), Prefills()), load=Uncoded), "plan.load", "the compiled core implements"),
    # a plan that can never serve some queue
    (lambda: Plan((Prefills(),)), "plan.steps", "decoding requests never get a token"),
    (lambda: Plan((Decodes(),)), "plan.steps", "new prompts never start"),
    (lambda: Plan((Decodes(exclusive=True),)), "plan.steps", "new prompts never start"),
    (lambda: Plan((Running(),)), "plan.steps", "new prompts never start: Running serves only started"),
    (lambda: Plan((Waiting(),)), "plan.steps", "a Decodes or Running step"),
    (lambda: Plan((Decodes(), Waiting())), "plan.steps", "a Running step before Waiting"),
]


@pytest.mark.parametrize("make,field,words", BAD_PLANS)
def test_validate_refuses(make, field, words):
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.field == field and words in str(info.value), str(info.value)


GOOD_PLANS = [
    (Decodes(), Prefills()), (Prefills(), Decodes()), (Decodes(exclusive=True), Prefills(split=False)),
    (Prefills(split=False, exclusive=True), Decodes()), (Decodes(), Prefills(max_chunk=64)),
    (Running(), Waiting()), (Running(max_chunk=16), Waiting(max_chunk=16, max_running=4)),
]


@pytest.mark.parametrize("steps", GOOD_PLANS)
def test_validate_accepts(steps):
    plan = Plan(steps)
    validate(plan)
    assert Plan(list(steps)) == plan   # a list of steps is taken as the tuple


def test_every_builtin_is_a_valid_plan():
    for cls in BUILTIN.values():
        validate(cls().program)


# ---- a plan in Python that fails at run time ------------------------------------------

RUNTIME_BAD = [
    ("        return None\n", ["P.plan(state) = 'returned None'", "a BatchPlan", "state.builder()"]),
    ("        return {}['x']\n", ["P.plan(state)", "KeyError: 'x'", "raised at", "p.py:9"]),
    ("        from llmqueue.model.batch import BatchPlan\n        return BatchPlan(((state.prefilling[0], 999),), [], 999)\n",
     ["P.plan(state) = '999 tokens'", "at most the token budget 256"]),
]


@pytest.mark.parametrize("body,words", RUNTIME_BAD)
def test_python_plan_failing_at_run_time_is_one_line(capsys, tmp_path, body, words, fresh_warnings):
    (tmp_path / "p.py").write_text(HEAD + "class P(Scheduler):\n" + GOOD_ATTRS
                                   + "    def plan(self, state):\n        batch = state.builder()\n" + body)
    code, out, err = run_cli(capsys, "simulate", config(tmp_path, "p.py:P"), "--json")
    assert code == 2 and out == "" and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("llmqueue: error:")]
    assert len(errors) == 1 and "scheduler 'p'" in errors[0], err
    for word in words:
        assert word in errors[0], (word, errors[0])


def test_a_policy_file_in_a_network_config(tmp_path):
    # [[engines]] scheduler = "file.py:Class" resolves relative to the network config, as in a
    # single-engine config; the composed policy runs on the compiled network core.
    import shutil

    from llmqueue.core import fastcore
    from llmqueue.network import load_network, simulate_network
    from llmqueue.network.scenarios import NETWORK_SCENARIOS

    shutil.copy(COMPOSED, tmp_path / "policy.py")
    text = NETWORK_SCENARIOS["tandem"][1].replace('scheduler = "sarathi"', 'scheduler = "policy.py:DecodeFirstNoChunking"', 1)
    assert "policy.py:DecodeFirstNoChunking" in text
    (tmp_path / "net.toml").write_text(text)
    net = load_network(str(tmp_path / "net.toml"), ["run.horizon_s=30"])
    assert f"{(tmp_path / 'policy.py').resolve()}:DecodeFirstNoChunking" in [e.scheduler for e in net.engines]
    fast, ref = (simulate_network(net, method=m) for m in ("fast", "reference"))
    assert fast.meta["method"] == ("fast" if fastcore.unavailable() is None else fast.meta["method"])
    assert np.array_equal(fast.finish_time, ref.finish_time, equal_nan=True)
    (tmp_path / "bad.toml").write_text(text.replace("policy.py:DecodeFirstNoChunking", "missing.py:X"))
    with pytest.raises(ConfigError, match=r"engines\[\d\]\.scheduler.*missing\.py"):
        load_network(str(tmp_path / "bad.toml"))
