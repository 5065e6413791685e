import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"
ORACLE = FIXTURES / "oracle"


def _stack() -> str:
    """The releases under test (CI runs the suite on the pinned and on the newest releases)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "huggingface_hub", "safetensors")
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return "stack: " + ", ".join(found)


def pytest_collection_modifyitems(config, items):
    # The 2-process tests are the longest chain of the suite: they come first (tests/markers.py). make test
    # distributes whole files (--dist loadfile): pytest-xdist 3.8's --dist loadgroup does not group anything under
    # pytest 9.2, whose items no longer take the group suffix xdist writes into their node ids.
    items.sort(key=lambda item: item.get_closest_marker("two_processes") is None)


def _share_cores_between_workers():
    """Each xdist worker gets its share of the cores for torch's intra-op threads, so that 2 workers on 2 cores do
    not run 4 threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_cores_between_workers()


def pytest_report_header(config):
    return _stack()


def pytest_terminal_summary(terminalreporter):
    # The header is hidden under -q (the README's test command); the summary always prints.
    terminalreporter.write_line(_stack())


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
