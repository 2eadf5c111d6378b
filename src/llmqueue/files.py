"""Output files written whole or not at all: one home for the temporary-name-and-rename rule."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name next to ``path`` (same suffix) to write; renamed over ``path`` when the block
    ends, removed if it fails or is interrupted, so ``path`` is never half-written. A failed write
    (e.g. a full disk) names ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        if exc.filename in (None, str(tmp)):   # e.g. a full disk: name the file meant, not the temporary
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
    except BaseException:
        _discard(tmp)
        raise


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
