"""The Speech Refined Head's KV-cache layer for the default (uncompiled) decoding path.

The compiled path uses transformers' ``StaticLayer`` (fixed buffers, a write cursor held in a tensor), which
dynamo traces without guards on the length; attention there always spans the whole buffer, masked.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class PreallocatedKVLayer(DynamicLayer):
    """A KV-cache layer with room for the whole reply reserved up front.

    The SRH appends one position per sub-step (5 per LLM step); growing by concatenation would copy the whole
    cache every time. Writing into a reserved buffer and handing attention a view of the filled part avoids that,
    and attention costs only what has been filled so far.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, head_dim = key_states.shape
        self._key_buffer = key_states.new_empty(batch, heads, self.capacity, head_dim)
        self._value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        self.keys = self._key_buffer[:, :, :0]
        self.values = self._value_buffer[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(
                f"Speech head cache is full ({self.capacity} positions); this is a bug, please report it."
            )
        self._key_buffer[:, :, self.length : end] = key_states
        self._value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        """Forget every column from ``length`` on (they are overwritten by the next update)."""
        self.length = length
        if self.is_initialized:
            self.keys = self._key_buffer[:, :, :length]
            self.values = self._value_buffer[:, :, :length]

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length


__all__ = ["PreallocatedKVLayer"]
