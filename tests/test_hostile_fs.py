"""A full or read-only output folder (issue 16): one clean line naming the file, exit 2, and no
partial file left.  Needs a small tmpfs (root and mount(8)); skipped with the reason elsewhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _mount(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) on this machine")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")


@pytest.fixture
def small_disk(tmp_path):
    where = tmp_path / "disk"
    _mount(where, "size=48k")
    yield where
    subprocess.run(["umount", str(where)], check=False)


@pytest.fixture
def read_only(tmp_path):
    where = tmp_path / "ro"
    _mount(where, "size=1m,ro")
    yield where
    subprocess.run(["umount", str(where)], check=False)


def _llmqueue(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmqueue", *args], capture_output=True, text=True, timeout=120)


def test_a_full_disk_names_the_file_and_leaves_nothing_half_written(small_disk):
    out = small_disk / "run"
    done = _llmqueue("compare", "--schedulers", "sarathi,orca", "--horizon", "300", "--out", str(out))
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("llmqueue: error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(out) in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    for f in out.rglob("*"):
        assert ".tmp" not in f.name, f"partial file left: {f}"
        if f.suffix == ".json":
            json.loads(f.read_text())            # every file kept is whole
        if f.suffix == ".png":
            assert f.read_bytes().startswith(b"\x89PNG") and f.stat().st_size > 100


def test_a_read_only_folder_is_one_clean_line(read_only):
    done = _llmqueue("simulate", "fig1", "--set", "run.horizon_s=30", "--out", str(read_only / "x"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Read-only file system" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
