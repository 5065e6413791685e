"""The merge arithmetic, ``alpha * tuned + (1 - alpha) * base``, in its three forms.

The arithmetic is done in float32 (float64 for float64 tensors) and cast back to the tuned tensor's dtype:
``out = (alpha * t1.float()) + ((1 - alpha) * t0.float())`` (two products, one sum, then one cast).
:func:`merge_tensors` is the reference; :func:`chunked_merge_into` applies it in flat chunks (in-memory merges),
:class:`StreamBuffers` does the same operations in a few buffers allocated once (the on-disk merge).
"""

from __future__ import annotations

import torch

from .safetensors_io import TensorInfo, itemsize, read_elements, read_exactly


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_tensors(tuned: torch.Tensor, base: torch.Tensor, alpha: float, out_dtype: torch.dtype | None = None):
    """``alpha * tuned + (1 - alpha) * base`` computed in fp32 (fp64 for fp64) and cast to ``out_dtype``
    (default: ``tuned.dtype``). The exact reference expression of every merge in this module."""
    out_dtype = tuned.dtype if out_dtype is None else out_dtype
    cdt = _compute_dtype(out_dtype)
    a = float(alpha)
    merged = tuned.to(cdt) * a
    merged += base.to(device=merged.device, dtype=cdt) * (1.0 - a)
    return merged.to(out_dtype)


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (alpha=1 keeps the tuned model, 0 the base), got {alpha}")
    return alpha


def chunked_merge_into(dest_flat: torch.Tensor, t1_flat: torch.Tensor, t0_flat: torch.Tensor, alpha, chunk):
    n = dest_flat.numel()
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        dest_flat[s:e].copy_(merge_tensors(t1_flat[s:e], t0_flat[s:e], alpha, dest_flat.dtype))


class StreamBuffers:
    """Fixed buffers of the streamed merge, allocated once and reused for every chunk.

    Allocating fresh multi-MiB buffers per chunk lets the C allocator's heap grow with fragmentation; reusing
    the same few buffers keeps the merge's memory at ``~(2 + 3 * 4 / itemsize) * chunk * itemsize`` bytes.
    The arithmetic is exactly :func:`merge_tensors`: two products in the compute dtype, one sum, one cast.
    """

    def __init__(self, chunk: int):
        self.chunk = chunk
        self._raw: dict[int, bytearray] = {}
        self._work: dict[tuple[torch.dtype, int], torch.Tensor] = {}
        self._out: torch.Tensor | None = None

    def _raw_buffer(self, slot: int, nbytes: int) -> bytearray:
        buf = self._raw.get(slot)
        if buf is None or len(buf) < nbytes:
            buf = self._raw[slot] = bytearray(max(nbytes, self.chunk * 4))
        return buf

    def read(self, f, info: TensorInfo, first: int, count: int, slot: int) -> torch.Tensor:
        """Elements ``[first, first + count)`` of ``info``, read into the raw buffer ``slot`` (valid until the
        next read into that slot)."""
        if count == 0:
            return torch.empty(0, dtype=info.dtype)
        return read_elements(f, info, first, count, self._raw_buffer(slot, count * info.itemsize))

    def copy_bytes(self, f, info: TensorInfo):
        step = self.chunk * 4
        buf = self._raw_buffer(2, step)
        f.seek(info.start)
        left = info.nbytes
        while left:
            want = min(step, left)
            view = memoryview(buf)[:want]
            read_exactly(f, view, info)
            yield view
            left -= want

    def _work_buffer(self, dtype: torch.dtype, slot: int) -> torch.Tensor:
        key = (dtype, slot)
        if key not in self._work:
            self._work[key] = torch.empty(self.chunk, dtype=dtype)
        return self._work[key]

    def merge(self, t1: torch.Tensor, t0: torch.Tensor, alpha: float, out_dtype: torch.dtype) -> memoryview:
        n = t1.numel()
        if n == 0:
            return memoryview(b"")
        cdt = _compute_dtype(out_dtype)
        a = float(alpha)
        w1 = self._work_buffer(cdt, 0)[:n]
        w0 = self._work_buffer(cdt, 1)[:n]
        w1.copy_(t1)
        w1.mul_(a)
        w0.copy_(t0)
        w0.mul_(1.0 - a)
        w1.add_(w0)
        if out_dtype == cdt:
            result = w1
        else:
            size = itemsize(out_dtype)
            if self._out is None or self._out.numel() < self.chunk * size:
                self._out = torch.empty(self.chunk * max(size, 4), dtype=torch.uint8)
            result = self._out[: n * size].view(out_dtype)
            result.copy_(w1)
        return memoryview(result.view(torch.uint8).numpy())
