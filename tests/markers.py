"""Marks shared by the test modules."""

import pytest

# A test that starts 2 training processes (torchrun) fills both cores of the CI machine and is among the longest of
# the suite. conftest.py runs these first: under pytest-xdist (make test: 2 workers, --dist loadfile) their files
# start at once and the other worker takes the rest of the suite meanwhile.
two_processes = pytest.mark.two_processes
