"""Streaming safetensors access for merging: one reader (plain file I/O, no mmap) and one shard writer.

Reading with ``readinto`` into caller-owned buffers keeps the resident memory at the chunk size whatever the
checkpoint size; the writer emits a shard whose header is known up front, tensor by tensor, so a shard is never
held in memory. Pickle checkpoints (``*.bin`` / ``*.pt``) are refused: only safetensors can be read without
executing code.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# safetensors dtype names <-> torch dtypes
_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        _ST_TO_TORCH[_name] = getattr(torch, _attr)
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}


class PickleCheckpointError(ValueError):
    """Raised for checkpoints stored with pickle (``pytorch_model.bin`` ...), which merging refuses to load."""


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a safetensors file lives: dtype, shape, file and absolute byte range."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)


def _read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], list[str]]:
    """Tensor infos (in file order), the ``__metadata__`` dict, and the names in data order."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short).")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 1024 * 1024:
            raise ValueError(f"{path}: implausible safetensors header size {n}.")
        header = json.loads(f.read(n).decode("utf-8"))
    data_start = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    infos = {}
    for name, spec in header.items():
        st_dtype = spec["dtype"]
        if st_dtype not in _ST_TO_TORCH:
            raise ValueError(f"{path}: tensor {name!r} has dtype {st_dtype}, which this merger does not support.")
        begin, end = spec["data_offsets"]
        infos[name] = TensorInfo(
            name=name,
            dtype=_ST_TO_TORCH[st_dtype],
            shape=tuple(int(s) for s in spec["shape"]),
            file=path,
            start=data_start + int(begin),
            nbytes=int(end) - int(begin),
        )
    order = sorted(infos, key=lambda k: infos[k].start)
    return {k: infos[k] for k in order}, metadata, order


def read_exactly(f, view: memoryview, info: TensorInfo) -> None:
    """Fill ``view`` from ``f`` (``readinto`` may return short reads); a short file is a truncated tensor."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise OSError(
                f"{info.file}: unexpected end of file while reading tensor {info.name!r} (truncated checkpoint)."
            )
        got += n


def read_elements(f, info: TensorInfo, first: int, count: int, buffer: bytearray | None = None) -> torch.Tensor:
    """Elements ``[first, first + count)`` of the flattened tensor ``info`` as a 1-D tensor.

    With ``buffer`` (at least ``count * itemsize`` bytes) the tensor is a view of it and is valid until the buffer
    is reused; without, a new buffer is allocated."""
    nbytes = count * info.itemsize
    if nbytes == 0:
        return torch.empty(0, dtype=info.dtype)
    if buffer is None:
        buffer = bytearray(nbytes)
    f.seek(info.start + first * info.itemsize)
    read_exactly(f, memoryview(buffer)[:nbytes], info)
    return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes).view(info.dtype)


class ShardWriter:
    """Writes one safetensors file whose header (names, dtypes, shapes, offsets) is known up front, then the
    tensor bytes strictly in that order, so a shard never has to be held in memory."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._expected: list[tuple[str, int]] = []
        for name, dtype, shape in specs:
            n = 1
            for s in shape:
                n *= s
            nbytes = n * itemsize(dtype)
            header[name] = {
                "dtype": _TORCH_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._expected.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * ((8 - len(raw) % 8) % 8)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._index = 0
        self._written = 0

    def write(self, name: str, data: memoryview | bytes) -> None:
        expected_name, expected_bytes = self._expected[self._index]
        if name != expected_name:
            raise RuntimeError(f"shard writer expected {expected_name!r}, got {name!r}")
        self._f.write(data)
        self._written += len(data)
        if self._written > expected_bytes:
            raise RuntimeError(f"too many bytes written for {name!r}")

    def end_tensor(self, name: str) -> None:
        expected_name, expected_bytes = self._expected[self._index]
        if name != expected_name or self._written != expected_bytes:
            raise RuntimeError(f"tensor {name!r}: wrote {self._written} of {expected_bytes} bytes")
        self._index += 1
        self._written = 0

    def close(self) -> None:
        if self._index != len(self._expected):
            self._f.close()
            raise RuntimeError("shard closed before all tensors were written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:  # pragma: no cover
            pass


class SafetensorsCheckpoint:
    """Lazy read access to a safetensors checkpoint (single file, or index json + shards).

    ``get(name)`` reads one tensor with plain file I/O; nothing is memory-mapped and nothing is kept.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.dir, self.files, self.index = _discover_safetensors(self.path)
        self.infos: dict[str, TensorInfo] = {}
        self.file_order: dict[Path, list[str]] = {}
        self.file_metadata: dict[Path, dict[str, str]] = {}
        for file in self.files:
            infos, metadata, order = _read_safetensors_header(file)
            for name in infos:
                if name in self.infos:
                    raise ValueError(f"tensor {name!r} appears in two shards of {self.path}")
            self.infos.update(infos)
            self.file_order[file] = order
            self.file_metadata[file] = metadata
        self._config: dict | None = None

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def get(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        with open(info.file, "rb") as f:
            return read_elements(f, info, 0, info.numel).view(info.shape)

    @property
    def config(self) -> dict:
        if self._config is None:
            cfg = self.dir / "config.json" if self.dir is not None else None
            self._config = json.loads(cfg.read_text()) if cfg is not None and cfg.is_file() else {}
        return self._config

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())


def _refuse_pickle(path: Path) -> None:
    raise PickleCheckpointError(
        f"{path} holds a pickle checkpoint (*.bin/*.pt). Merging only reads safetensors, which cannot run code "
        "on load. Convert it first, e.g. `model = AutoModel...from_pretrained(path); "
        "model.save_pretrained(out, safe_serialization=True)` in a trusted environment."
    )


def _discover_safetensors(path: Path) -> tuple[Path | None, list[Path], dict | None]:
    if path.is_file():
        if path.name.endswith(".safetensors.index.json"):
            index = json.loads(path.read_text())
            files = sorted({path.parent / f for f in index["weight_map"].values()})
            return path.parent, files, index
        if path.suffix == ".safetensors":
            return path.parent, [path], None
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        raise ValueError(f"{path} is not a safetensors checkpoint.")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    index_path = path / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        files = sorted({path / f for f in index["weight_map"].values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path} lists missing shards: {[m.name for m in missing]}")
        return path, files, index
    single = path / SAFE_WEIGHTS_NAME
    if single.is_file():
        return path, [single], None
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return path, candidates, None
    if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir() if p.is_file()):
        _refuse_pickle(path)
    if candidates:
        raise ValueError(f"{path} has several *.safetensors files but no {SAFE_WEIGHTS_INDEX_NAME}.")
    raise FileNotFoundError(f"no safetensors weights found in {path}")
