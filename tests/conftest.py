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


def pytest_report_header(config):
    return _stack()


def pytest_terminal_summary(terminalreporter):
    # The header is hidden under -q (the README's test command); the summary always prints.
    terminalreporter.write_line(_stack())


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
