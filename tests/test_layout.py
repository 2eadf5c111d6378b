"""The architecture's one-way dependencies (docs/model.md, Layout): the core imports no
plotting and no command line; the request/batch layer knows nothing of what uses it."""

from __future__ import annotations

import ast
from pathlib import Path

import llmqueue

PACKAGE = Path(llmqueue.__file__).parent
CORE = ["model", "schedulers", "core", "analysis", "metrics", "limits", "config", "runner", "sweep", "network", "cluster",
        "checks", "errors"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def _files(name: str) -> list[Path]:
    target = PACKAGE / name
    return sorted(target.glob("*.py")) if target.is_dir() else [target.with_suffix(".py")]


def test_core_imports_no_plotting_or_cli():
    for name in CORE:
        for path in _files(name):
            bad = {m for m in _imports(path) if m.split(".")[0] == "matplotlib" or m in ("llmqueue.cli", "llmqueue.plots")}
            assert not bad, (path.name, bad)


def test_lower_layers_do_not_import_upper_ones():
    # cluster below network: a network's engine can be a pool of replicas (its schema and routers are the cluster's)
    order = ["errors", "checks", "model", "schedulers", "core", "analysis", "metrics", "limits", "config", "runner", "sweep",
             "cluster", "network", "real"]
    allowed: set[tuple[str, str]] = set()   # (file, module): none
    for i, name in enumerate(order):
        upper = tuple(f"llmqueue.{u}" for u in order[i + 1:])
        for path in _files(name):
            here = path.relative_to(PACKAGE).as_posix()
            bad = {m for m in _imports(path) if m.startswith(upper) and m.split(".")[:2] != ["llmqueue", name]
                   and (here, m) not in allowed}
            assert not bad, (path, bad)
