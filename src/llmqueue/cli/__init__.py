"""Command line: thin wrappers that parse, load a config, call the library, write.

One module per command group (``single``: compare, simulate, capacity, policies, scenarios;
``reproduce``: the paper's report);
each has ``register(subparsers)``. User errors print one line ``llmqueue: error: ...`` and
exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from llmqueue import __version__
from llmqueue.cli import network, real, region, reproduce, single, sweep
from llmqueue.errors import LlmqueueError

EXIT_USAGE = 2
COMMAND_GROUPS = (single, region, sweep, real, network, reproduce)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmqueue", description="Stability and latency of LLM inference schedulers "
                                "(Dai, Deng, Li, Peng, arXiv 2504.07347).")
    p.add_argument("--version", action="version", version=f"llmqueue {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = args.func(args)
        except LlmqueueError as exc:
            print(f"llmqueue: error: {exc}", file=sys.stderr)
            code = EXIT_USAGE
        except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = 1
        except OSError as exc:  # e.g. an --out folder that cannot be written
            print(f"llmqueue: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
            code = EXIT_USAGE
        for message in dict.fromkeys(str(w.message) for w in caught):
            print(f"llmqueue: warning: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
