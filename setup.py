"""Build the optional compiled event loop (src/llmqueue/core/_fastcore.c; docs/performance.md).

Everything else about the package is in pyproject.toml.  The extension is optional: where no C
compiler is available the install still succeeds and the simulator uses its reference
path (identical results, slower).  The source's SHA-256 is compiled in, so a stale build (the
source edited since) is detected at import and not used.
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "src/llmqueue/core/_fastcore.c"
DIGEST = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()

setup(ext_modules=[Extension(
    "llmqueue.core._fastcore", [SOURCE], optional=True,
    define_macros=[("LLMQUEUE_FASTCORE_SHA256", f'"{DIGEST}"')],
    extra_compile_args=["-O2", "-fno-fast-math"],
)])
