"""Plain-Python views of tensor-like values (torch tensors, numpy arrays, sequences)."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_list(value: Any) -> list:
    """``value`` as a (nested) Python list: a torch tensor (moved to the CPU), a numpy array or any iterable;
    ``None`` is the empty list."""
    if value is None:
        return []
    if hasattr(value, "detach"):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return list(value)
