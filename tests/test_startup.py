"""Start-up: what importing the CLI and the core pulls in (issue 17; docs/performance.md, "Start-up").

scipy.stats alone takes most of a second to import, matplotlib about as much: the core and the CLI
import them where they are used, and ``llmqueue capacity fig1`` imports no scipy at all.  Measured
in fresh interpreters, so nothing this test process imported counts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmqueue import cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("scipy", "scipy.stats", "scipy.sparse", "matplotlib", "pandas", "pyarrow", "torch")


def loaded_after(code: str) -> set[str]:
    """The HEAVY modules in sys.modules after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_capacity_fig1_imports_no_scipy_nor_plotting():
    code = ("import contextlib, io\nfrom llmqueue import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    assert cli.main(['capacity', 'fig1']) == 0\n"
            "assert 'largest stable rate' in out.getvalue()")
    assert loaded_after(code) == set()


def test_capacity_of_a_config_file_imports_no_scipy_nor_the_network_package(tmp_path):
    # A file without [[engines]] is told apart from a network config without importing the network package.
    from llmqueue.scenarios import scenario_text

    (tmp_path / "run.toml").write_text(scenario_text("theorem2"))
    code = ("import contextlib, io, sys\nfrom llmqueue import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert cli.main(['capacity', {str(tmp_path / 'run.toml')!r}]) == 0\n"
            "assert 'llmqueue.network' not in sys.modules")
    assert loaded_after(code) == set()


@pytest.mark.parametrize("module", ["llmqueue", "llmqueue.cli", "llmqueue.config", "llmqueue.runner",
                                    "llmqueue.metrics", "llmqueue.core.simulator", "llmqueue.analysis",
                                    "llmqueue.scenarios", "llmqueue.cli.single", "llmqueue.cli.sweep"])
def test_the_core_imports_neither_scipy_stats_nor_matplotlib(module):
    assert not loaded_after(f"import {module}") & {"scipy.stats", "matplotlib", "pandas", "pyarrow", "torch"}


def test_a_run_and_its_verdict_still_work_and_then_load_scipy_stats():
    # The lazy imports are where the work is: a simulated run's verdict needs scipy.stats.
    code = ("from llmqueue.runner import run_config\nfrom llmqueue.cli.common import config_from\n"
            "run = run_config(config_from('fig1', []))\nassert run.summary['verdict'] == 'stable'")
    assert "scipy.stats" in loaded_after(code)


def registered(group: str) -> tuple[str, ...]:
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(f"llmqueue.cli.{group}").register(sub)
    return tuple(sub.choices)


@pytest.mark.parametrize("group", list(cli.COMMAND_GROUPS))
def test_the_command_table_names_what_each_group_registers(group):
    # Every listed command is its group's (a command missing from the table still works: the
    # parser then registers every group, as for --help; only the start-up shortcut is lost).
    assert set(cli.COMMAND_GROUPS[group]) <= set(registered(group))


@pytest.mark.parametrize("group", ["single", "network", "sweep"])
def test_the_heavy_and_common_groups_are_listed_whole(group):
    assert set(cli.COMMAND_GROUPS[group]) == set(registered(group))


def test_a_command_registers_only_its_group_and_help_lists_them_all():
    only = cli.build_parser(["capacity", "fig1"])._subparsers._group_actions[0].choices
    assert tuple(only) == cli.COMMAND_GROUPS["single"]
    every = cli.build_parser(["--help"])._subparsers._group_actions[0].choices
    assert tuple(every) == tuple(c for group in cli.COMMAND_GROUPS for c in registered(group))
    assert tuple(cli.build_parser(["no-such-command"])._subparsers._group_actions[0].choices) == tuple(every)


def test_an_unknown_command_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 2 and "network" in capsys.readouterr().err


def test_bench_startup_runs_and_reports_a_ratio(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_startup.py"), "--repeat", "1",
                          "--max-ratio", "1000", "--json", str(tmp_path / "t.json")],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert "llmqueue capacity fig1" in out.stdout
    data = json.loads((tmp_path / "t.json").read_text())
    assert set(data["ratios"]) == {"import numpy", "llmqueue capacity fig1"} and data["ratios"]["import numpy"] == 1.0
