"""Command line: thin wrappers that parse, load a config, call the library, write.

One module per command group (``single``: compare, simulate, capacity, policies, scenarios;
``reproduce``: the paper's report);
each has ``register(subparsers)``. User errors print one line ``llmqueue: error: ...`` and
exit with status 2; any other failure prints one line ``llmqueue: internal error: ...`` (``--debug``
shows the traceback) and exits 1; SIGINT and SIGTERM stop every command with one line saying what it
kept, exit 130 and 143 (docs/config.md, "Errors, signals and limits").
"""

from __future__ import annotations

import argparse
import importlib
import os
import sqlite3
import sys
import warnings
from collections.abc import Sequence

from llmqueue import __version__
from llmqueue.cli import common
from llmqueue.errors import LlmqueueError

EXIT_USAGE = 2
EXIT_FAILED = 1
# The command groups (modules of llmqueue.cli) and the commands each registers, in --help order.
# perf: `llmqueue CMD` imports only CMD's group (the network package alone takes 50–75 ms, the
# sweep machinery about as much); --help, no command or a command not listed here imports them all
# (docs/performance.md, "Start-up"; tests/test_startup.py checks the table against the groups).
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "single": ("compare", "simulate", "capacity", "policies", "scenarios"),
    "region": ("region",),
    "sweep": ("sweep", "max-rate", "results", "plot"),
    "real": ("engine", "calibrate", "serve", "serve-bench"),
    "network": ("network",),
    "cluster": ("cluster",),
    "reproduce": ("reproduce",),
}
DEBUG_FLAG = "--debug"
SHRINK = ("run.horizon_s or run.requests (fewer arrivals), workload.rate or workload.load, engine.token_budget, "
          "engine.kv_blocks, --grid and --seeds")


def _groups_for(argv: Sequence[str] | None) -> list[str]:
    """The groups to register for ``argv``: the one owning its command, or all of them."""
    command = next((a for a in argv or () if not a.startswith("-")), None)
    owner = [g for g, commands in COMMAND_GROUPS.items() if command in commands]
    return owner or list(COMMAND_GROUPS)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given ``argv``, with only the group of its command registered (start-up time)."""
    p = argparse.ArgumentParser(prog="llmqueue", description="Stability and latency of LLM inference schedulers "
                                "(Dai, Deng, Li, Peng, arXiv 2504.07347).")
    p.add_argument("--version", action="version", version=f"llmqueue {__version__}")
    p.add_argument(DEBUG_FLAG, action="store_true",
                   help="show the full traceback of an unexpected error (also accepted after the command)")
    sub = p.add_subparsers(dest="command", required=True)
    for name in _groups_for(argv):
        importlib.import_module(f"llmqueue.cli.{name}").register(sub)
    return p


def _split_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """``--debug`` anywhere before a ``--``: taken out, so every command accepts it."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a != DEBUG_FLAG]
    return len(head) < end, head + argv[end:]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run_command(args: argparse.Namespace, debug: bool = False) -> int:
    """Run the parsed command; every way it can end is one line on stderr and an exit status."""
    try:
        return args.func(args)
    except LlmqueueError as exc:
        print(f"llmqueue: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # SIGINT or SIGTERM the command did not handle itself
        return common.interrupted(exc, common.kept_files())
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:  # e.g. an --out folder that cannot be written, a full disk
        print(f"llmqueue: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        if debug:
            raise
        print(f"llmqueue: error: the run needs more memory than this machine has: shrink it with {SHRINK}; "
              f"{common.kept_files()}", file=sys.stderr)
        return EXIT_FAILED
    except sqlite3.Error as exc:  # a store that cannot be read or written (sweep commands name it)
        if debug:
            raise
        print(f"llmqueue: error: the results store failed: {_first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug: one line, the traceback with --debug
        if debug:
            raise
        print(f"llmqueue: internal error: {_first_line(exc)} (run again with {DEBUG_FLAG} for the traceback)",
              file=sys.stderr)
        return EXIT_FAILED


#: a caveat each run and fit of a command repeats with its own numbers: said once per command, in
#: the words of the first model that raised it (a validation's or serve-bench's simulator column)
MIX_WARNING = "batch_time.model = prefill_decode"


def _once(messages) -> list[str]:
    """The command's warnings, each once, and the prefill_decode caveat once whatever its numbers."""
    kept, mix = [], False
    for message in dict.fromkeys(messages):
        if message.startswith(MIX_WARNING):
            if mix:
                continue
            mix = True
        kept.append(message)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    debug, argv = _split_debug(list(sys.argv[1:] if argv is None else argv))
    args = build_parser(argv).parse_args(argv)
    common.WRITTEN.clear()
    with warnings.catch_warnings(record=True) as caught, common.signals_as_interrupts():
        warnings.simplefilter("always")
        code = run_command(args, debug)
        for message in _once(str(w.message) for w in caught):
            print(f"llmqueue: warning: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
