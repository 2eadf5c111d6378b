"""User-defined schedulers: a policy in one Python file (docs/policies.md).

``[engine] scheduler = "path/to/my_policy.py:MyPolicy"`` names a :class:`Scheduler` subclass in
a file (a relative path is relative to the config file's folder; ``--schedulers`` on the command
line resolves it from the working folder).  :func:`load` imports the file once under a module
name of its own (``sys.path`` untouched) and :func:`check_class` checks the class; every
mistake is a :class:`~llmqueue.errors.ConfigError` naming the field, the value and what is
wrong (the file and line of a syntax error or of an exception raised while importing).
:func:`register` adds a class to the registry for Python users.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from llmqueue.errors import ConfigError
from llmqueue.schedulers.base import Option, Scheduler, _file_of, where

#: Names no scheduler option may take: the other keys of ``[engine]`` (config.ENGINE_KEYS) and
#: make_scheduler's ``base_dir`` (an option of such a name could never be set).
RESERVED_OPTIONS = frozenset({"scheduler", "token_budget", "max_batch_requests", "batch_time", "kv_blocks", "block_size",
                              "kv_policy", "base_dir"})
HOW = "path/to/policy.py:ClassName (docs/policies.md)"

_modules: dict[tuple[str, int, int], ModuleType] = {}


def is_reference(name: object) -> bool:
    """Whether a scheduler name is a file reference (``file.py:Class``) rather than a registered name."""
    return isinstance(name, str) and (":" in name or "/" in name or "\\" in name or name.endswith(".py"))


def split_reference(ref: str, field: str) -> tuple[str, str]:
    """``"dir/p.py:Cls"`` -> ("dir/p.py", "Cls"), or a ConfigError saying what is missing."""
    path, sep, cls = ref.rpartition(":")
    if not sep or not cls or ref.endswith(".py"):
        raise ConfigError(field, ref, f"a policy file and the class in it: {HOW} (the ':ClassName' is missing)")
    cls = cls.strip()
    if not path.endswith(".py"):
        raise ConfigError(field, ref, f"a Python file ending in .py, then the class: {HOW} ({path!r} is not a .py file)")
    if not cls.isidentifier():
        raise ConfigError(field, ref, f"a class name after the colon: {HOW} ({cls!r} is not a Python name)")
    return path, cls


def resolve(ref: str, base_dir: str | Path | None = None, field: str = "engine.scheduler") -> str:
    """The reference with an absolute file path (relative paths are relative to ``base_dir``,
    default the working folder); the file itself is not read."""
    path, cls = split_reference(ref, field)
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(base_dir if base_dir is not None else Path.cwd()) / p
    return f"{p.resolve()}:{cls}"


def load(ref: str, base_dir: str | Path | None = None, field: str = "engine.scheduler") -> type[Scheduler]:
    """The checked :class:`Scheduler` subclass a file reference names."""
    path, cls_name = split_reference(resolve(ref, base_dir, field), field)
    module = _import(Path(path), ref, field)
    cls = module.__dict__.get(cls_name)
    if cls is None:
        defined = [n for n, v in vars(module).items() if _is_scheduler(v) and v.__module__ == module.__name__]
        found = (f"it defines the Scheduler subclass{'es' if len(defined) > 1 else ''} {', '.join(defined)}"
                 if defined else "it defines no Scheduler subclass")
        raise ConfigError(field, ref, f"a class {cls_name!r} in {path} ({found})")
    check_class(cls, f"{field} {ref!r}")
    return cls


def _is_scheduler(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, Scheduler) and value is not Scheduler


def _import(path: Path, ref: str, field: str) -> ModuleType:
    """Import a policy file once per version of it (cached on path, size and mtime)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ConfigError(field, ref, f"an existing policy file: {HOW} ({path} not found)") from None
    except OSError as exc:
        raise ConfigError(field, ref, f"a readable policy file ({path}: {exc.strerror or exc})") from None
    if not path.is_file():
        raise ConfigError(field, ref, f"a policy file: {HOW} ({path} is not a file)")
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _modules:
        return _modules[key]
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    name = f"llmqueue_policy_{stem}_{digest}"   # unique per file, never on sys.path
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(field, ref, f"a Python source file ({path} cannot be imported)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses and pickling look a class's module up here
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        at = f"{exc.filename or path}:{exc.lineno}" if exc.lineno else str(path)
        raise ConfigError(field, ref, f"a policy file that imports: {at}: SyntaxError: {exc.msg}") from None
    except (Exception, SystemExit) as exc:  # any failure of the user's code is reported, never a traceback
        sys.modules.pop(name, None)
        at, error = where(exc, path)
        raise ConfigError(field, ref, f"a policy file that imports: {at}: {error}") from None
    _modules[key] = module
    return module


def check_class(cls: object, field: str) -> None:
    """Raise ConfigError unless ``cls`` is a usable Scheduler subclass: ``name``, ``summary``,
    ``work_conserving``, ``options`` of :class:`Option`, and ``compose()`` returning a valid
    Plan (built with the options' defaults) or an own ``plan(state)``."""
    if not _is_scheduler(cls):
        what = (f"the class {cls.__name__} does not derive from it" if isinstance(cls, type)
                else f"this is an object of type {type(cls).__name__}, not a class")
        raise ConfigError(field, getattr(cls, "__name__", cls), f"a subclass of llmqueue.schedulers.Scheduler ({what})")
    label = cls.__name__
    for attr, kind, example in (("name", str, 'name = "my-policy"'), ("summary", str, 'summary = "one line"'),
                                ("work_conserving", bool, "work_conserving = True")):
        value = getattr(cls, attr, None)
        if value is None:
            raise ConfigError(f"{field}: {label}.{attr}", None, f"a class attribute {kind.__name__}, e.g. {example}")
        if not isinstance(value, kind) or (kind is str and not value.strip()):
            raise ConfigError(f"{field}: {label}.{attr}", value, f"a {'non-empty ' if kind is str else ''}{kind.__name__}, "
                              f"e.g. {example}")
    if is_reference(cls.name) or "," in cls.name or cls.name != cls.name.strip():
        raise ConfigError(f"{field}: {label}.name", cls.name, "a plain name without ':', '/', '\\', ',' or "
                          "surrounding spaces (it labels the run's results)")
    options = getattr(cls, "options", {})
    if not isinstance(options, Mapping) or not all(isinstance(k, str) and isinstance(v, Option) for k, v in options.items()):
        raise ConfigError(f"{field}: {label}.options", options,
                          "a dict of option name -> llmqueue.schedulers.Option(type, default, help)")
    clash = sorted(RESERVED_OPTIONS & set(options))
    if clash:
        raise ConfigError(f"{field}: {label}.options", clash[0], f"an option name other than {', '.join(sorted(RESERVED_OPTIONS))} "
                          "(those are [engine] keys, and make_scheduler's argument)")
    composed = cls.compose is not Scheduler.compose
    if not composed and cls.plan is Scheduler.plan:
        raise ConfigError(f"{field}: {label}.compose()", None, "a Scheduler subclass defines compose() (returning "
                          "a Plan) or plan(state) (returning a BatchPlan); this one defines neither")
    build(cls, {}, field)   # runs compose() with the options' defaults: Plan's own validation applies


def build(cls: type[Scheduler], options: Mapping[str, object], field: str = "engine.scheduler") -> Scheduler:
    """``cls(**options)``; a failure of ``compose()`` or ``__init__`` is a ConfigError saying where
    (an option refused keeps its own ``engine.KEY`` message)."""
    label = cls.__name__
    try:
        return cls(**options)
    except ConfigError as exc:
        if not exc.field.startswith("engine."):   # compose(): not a Plan, or plan.validate's message
            at = exc.field if exc.field.endswith(".compose()") else f"{label}.compose(): {exc.field}"
            raise ConfigError(f"{field}: {at}", exc.value, exc.allowed) from None
        raise   # an option's own engine.KEY message
    except Exception as exc:  # the user's compose() or __init__ failed: say where, no traceback
        at, error = where(exc, _file_of(cls))
        raise ConfigError(f"{field}: building {label}", error,
                          f"a class whose __init__ and compose() run with {'its default' if not options else 'these'} "
                          f"options (raised at {at})") from None


def check_name(cls: type[Scheduler], field: str, builtin: Mapping[str, type[Scheduler]]) -> None:
    """A user class may not take a built-in scheduler's name (results are labelled by name)."""
    if cls.name in builtin and builtin[cls.name] is not cls:
        raise ConfigError(f"{field}: {cls.__name__}.name", cls.name,
                          f"a name that is not a built-in scheduler's ({', '.join(builtin)}); choose another")


__all__ = ["HOW", "RESERVED_OPTIONS", "check_class", "check_name", "is_reference", "build", "load", "resolve", "split_reference"]
