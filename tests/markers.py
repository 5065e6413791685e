"""Marks shared by the test modules, and the launcher of the tests they mark."""

import sys
from pathlib import Path

import pytest

# A test that starts 2 training processes (torchrun) fills both cores of the CI machine and is among the longest of
# the suite. conftest.py runs these first: under pytest-xdist (make test: 2 workers, --dist loadfile) their files
# start at once and the other worker takes the rest of the suite meanwhile.
two_processes = pytest.mark.two_processes


def torchrun() -> list[str]:
    """The command that starts a two-process test's workers: this interpreter's torchrun."""
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
