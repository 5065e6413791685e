import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"
ORACLE = FIXTURES / "oracle"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
