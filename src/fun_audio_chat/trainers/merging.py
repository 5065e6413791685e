"""Core-Cocktail weight merging: ``M = alpha * M1 + (1 - alpha) * M0``.

``M1`` is the tuned Fun-Audio-Chat model, ``M0`` the original text LLM it started from (a Qwen3 causal-LM
checkpoint whose keys are ``model.*`` / ``lm_head.*``). Base keys are mapped onto the ``language_model.*``
prefix of our model; every tuned tensor without a base counterpart (the continuous audio encoder, the
discrete speech encoder, the Speech Refined Head) is kept from ``M1`` unchanged.

Three ways in, one formula:

* **in memory, on a model** -- parameters are merged in place (this is what :class:`CoreCocktailCallback`
  does at the end of stage 1); tied parameters are single tensors, so they stay tied;
* **in memory, on state dicts** -- a new dict is returned, inputs are never modified; keys that shared
  storage in the tuned dict share it in the result;
* **on disk** -- safetensors checkpoints (``model.safetensors`` or an index json plus shards) are merged
  tensor by tensor in flat chunks of ``chunk_elements``, reading with plain file I/O (no mmap) into a few
  buffers allocated once, and writing each output shard incrementally (its header is known in advance). The
  extra memory is at most six buffers of ``chunk_elements * 4`` bytes (about 384 MiB at the default 16 Mi
  elements, a few MiB with small chunks), whatever the shard or model size, so an 8B merge fits a small
  machine. The output keeps the tuned checkpoint's layout, key set, shard names and dtypes (a tied key the
  tuned checkpoint omits stays omitted, so it is re-tied on load), copies its config / generation config /
  processor files, is written into a temporary sibling directory and renamed into place only when complete,
  and carries ``merge_manifest.json``.

The arithmetic is done in float32 (float64 for float64 tensors) and cast back to the tuned tensor's dtype:
``out = (alpha * t1.float()) + ((1 - alpha) * t0.float())`` (two products, one sum, then one cast).
Pickle checkpoints (``*.bin`` / ``*.pt``) are refused: only safetensors can be read without executing code.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

MANIFEST_NAME = "merge_manifest.json"
MANIFEST_FORMAT = "fun_audio_chat.core_cocktail_merge"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_CHUNK_ELEMENTS = 16 * 1024 * 1024  # 64 MiB per fp32 temporary

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Files of a tuned checkpoint directory that describe the model rather than hold its weights; they are copied
# next to the merged weights so the result loads with ``from_pretrained`` and its processor.
_AUX_FILE_PATTERNS = ("*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken", "README.md")
_AUX_FILE_EXCLUDES = (
    SAFE_WEIGHTS_INDEX_NAME,
    "*.safetensors.index.json",
    MANIFEST_NAME,
    "trainer_state.json",
    "adapter_config.json",
    "core_cocktail_state.json",
)

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


# ----------------------------------------------------------------------------------------------------------------
# key mapping


def default_base_key_map(key: str) -> str | None:
    """Name in our model of a tensor of the base LLM checkpoint, or ``None`` when it has no counterpart.

    * ``model.X`` / ``lm_head.X`` (a ``Qwen3ForCausalLM`` checkpoint) -> ``language_model.model.X`` /
      ``language_model.lm_head.X``;
    * ``model.language_model.X`` (a Qwen3-VL checkpoint, the 8B's actual initialisation) ->
      ``language_model.model.X``; its vision tower (``model.visual.*``) has no counterpart;
    * ``language_model.X`` (the base is itself a Fun-Audio-Chat checkpoint) -> unchanged; only its LLM part
      takes part in the merge.
    """
    if key.startswith("language_model."):
        return key
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model.") :]
    if key.startswith("model.visual.") or key.startswith("visual."):
        return None
    if key.startswith("model.") or key.startswith("lm_head."):
        return "language_model." + key
    return None


# ----------------------------------------------------------------------------------------------------------------
# safetensors: a small streaming reader / writer (plain file I/O so that RSS stays at the chunk size)


@dataclass(frozen=True)
class _TensorInfo:
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
        return _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _read_safetensors_header(path: Path) -> tuple[dict[str, _TensorInfo], dict[str, str], list[str]]:
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
        infos[name] = _TensorInfo(
            name=name,
            dtype=_ST_TO_TORCH[st_dtype],
            shape=tuple(int(s) for s in spec["shape"]),
            file=path,
            start=data_start + int(begin),
            nbytes=int(end) - int(begin),
        )
    order = sorted(infos, key=lambda k: infos[k].start)
    return {k: infos[k] for k in order}, metadata, order


def _read_into_tensor(f, info: _TensorInfo, first: int, count: int) -> torch.Tensor:
    """Elements ``[first, first + count)`` of the flattened tensor, as a new 1-D tensor."""
    size = info.itemsize
    if count == 0:
        return torch.empty(0, dtype=info.dtype)
    buf = bytearray(count * size)
    f.seek(info.start + first * size)
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = f.readinto(view[got:])
        if not n:
            raise OSError(f"{info.file}: unexpected end of file while reading {info.name!r}.")
        got += n
    return torch.frombuffer(buf, dtype=torch.uint8).view(info.dtype)


class _ShardWriter:
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
            nbytes = n * _itemsize(dtype)
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
        self.infos: dict[str, _TensorInfo] = {}
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
            return _read_into_tensor(f, info, 0, info.numel).view(info.shape)

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
        if path.suffix in _PICKLE_SUFFIXES:
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
    if any(p.suffix in _PICKLE_SUFFIXES for p in path.iterdir() if p.is_file()):
        _refuse_pickle(path)
    if candidates:
        raise ValueError(f"{path} has several *.safetensors files but no {SAFE_WEIGHTS_INDEX_NAME}.")
    raise FileNotFoundError(f"no safetensors weights found in {path}")


def _looks_like_repo_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))


def _resolve_checkpoint_path(source: str | os.PathLike, role: str = "checkpoint", from_hub: bool = False) -> Path:
    """A local checkpoint path, or with ``from_hub`` the local snapshot of a Hub repo id.

    A path that does not exist is never looked up on the Hub unless asked: a typo such as ``runs/base`` is also a
    valid repo id, and merging someone else's repository into a model would go unnoticed."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not from_hub:
        if path.exists():
            return path
        hint = ""
        if _looks_like_repo_id(text):
            hint = f"; to download the Hub repo {text!r} pass base_from_hub=True (CLI: --base-from-hub)"
        raise FileNotFoundError(f"{role} checkpoint {text!r} not found on disk{hint}")
    if not _looks_like_repo_id(text):
        raise ValueError(f"{role} {text!r} is not a Hub repo id like 'org/name' (base_from_hub=True)")
    from huggingface_hub import snapshot_download

    # fetch only what merging needs
    return Path(snapshot_download(text, allow_patterns=["*.safetensors", "*.json", "*.txt", "*.jinja", "*.model"]))


def _refuse_output_overlapping_inputs(output_dir: str | os.PathLike, inputs: list[tuple[str, Path]]) -> None:
    """Refuse an output directory that is, contains or lies inside an input checkpoint: writing it (or replacing
    it with ``overwrite=True``) would delete or corrupt the input. Checked before anything is written."""
    out = Path(output_dir).expanduser().resolve()
    for role, path in inputs:
        source = Path(path).expanduser().resolve()
        if out == source:
            relation = "is"
        elif out in source.parents:
            relation = "contains"
        elif source.is_dir() and source in out.parents:
            relation = "lies inside"
        else:
            continue
        raise ValueError(
            f"output_dir {str(out)!r} {relation} the {role} checkpoint {str(source)!r}: writing it would delete or "
            "overwrite an input; choose an output directory outside the inputs."
        )


# ----------------------------------------------------------------------------------------------------------------
# the plan: which tuned tensor merges with which base tensor


@dataclass
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class MergePlan:
    """Which tuned tensors are merged (``pairs``: tuned name -> base name) and which are kept from the tuned
    model unchanged (``kept``), plus base tensors that found no counterpart (``base_unused``)."""

    pairs: dict[str, str]
    kept: list[str]
    base_unused: list[str]
    skipped_shape_mismatch: list[str]

    def __post_init__(self):
        if not self.pairs:
            raise ValueError(
                "The base checkpoint shares no tensor with the tuned model: expected a Qwen3 causal-LM checkpoint "
                "(`model.*`, `lm_head.*`) matching `language_model.*`. Pass `key_map=` for another layout."
            )


def _plan(
    tuned: Mapping[str, _Entry],
    base: Mapping[str, _Entry],
    key_map: Callable[[str], str | None],
    on_shape_mismatch: str,
    base_tie_word_embeddings: bool | None,
) -> MergePlan:
    if on_shape_mismatch not in ("error", "keep_tuned"):
        raise ValueError("on_shape_mismatch must be 'error' or 'keep_tuned'")
    target_to_base: dict[str, str] = {}
    base_unused: list[str] = []
    for bkey in base:
        target = key_map(bkey)
        if target is None or target not in tuned:
            base_unused.append(bkey)
            continue
        if target in target_to_base:
            raise ValueError(f"base tensors {target_to_base[target]!r} and {bkey!r} both map onto {target!r}")
        target_to_base[target] = bkey
    # A base LLM with tied word embeddings stores no lm_head; its head *is* the input embedding.
    head, emb = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if head in tuned and head not in target_to_base and emb in target_to_base and base_tie_word_embeddings:
        target_to_base[head] = target_to_base[emb]
    pairs: dict[str, str] = {}
    kept: list[str] = []
    mismatched: list[str] = []
    for name, entry in tuned.items():
        bkey = target_to_base.get(name)
        if bkey is None:
            kept.append(name)
            continue
        bentry = base[bkey]
        if not (entry.dtype.is_floating_point and bentry.dtype.is_floating_point):
            kept.append(name)
            continue
        if tuple(entry.shape) != tuple(bentry.shape):
            if on_shape_mismatch == "error":
                raise ValueError(
                    f"shape mismatch: tuned {name!r} {tuple(entry.shape)} vs base {bkey!r} {tuple(bentry.shape)}; "
                    "pass on_shape_mismatch='keep_tuned' to keep such tensors from the tuned model."
                )
            mismatched.append(name)
            kept.append(name)
            continue
        pairs[name] = bkey
    unmapped_llm = [k for k in kept if k.startswith("language_model.") and k not in mismatched]
    if unmapped_llm:
        logger.warning(
            "%d language_model tensors have no base counterpart and are kept from the tuned model: %s",
            len(unmapped_llm),
            unmapped_llm[:5],
        )
    return MergePlan(pairs=pairs, kept=kept, base_unused=base_unused, skipped_shape_mismatch=mismatched)


# ----------------------------------------------------------------------------------------------------------------
# the arithmetic


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


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (alpha=1 keeps the tuned model, 0 the base), got {alpha}")
    return alpha


# ----------------------------------------------------------------------------------------------------------------
# base sources


class _BaseSource:
    """Uniform read access to the base: an ``nn.Module``, a state dict, or a checkpoint on disk."""

    def __init__(self, base: Any, from_hub: bool = False):
        self.reader: SafetensorsCheckpoint | None = None
        self.tensors: Mapping[str, torch.Tensor] | None = None
        self.tie_word_embeddings: bool | None = None
        if isinstance(base, nn.Module):
            self.description = f"<in-memory {type(base).__name__}>"
            self.tensors = base.state_dict()
            cfg = getattr(base, "config", None)
            cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
            self.tie_word_embeddings = getattr(cfg, "tie_word_embeddings", None)
        elif isinstance(base, Mapping):
            self.description = "<in-memory state dict>"
            self.tensors = base
        elif isinstance(base, (str, os.PathLike)):
            self.reader = SafetensorsCheckpoint(_resolve_checkpoint_path(base, "base", from_hub=from_hub))
            self.description = str(self.reader.path)
            cfg = self.reader.config
            text_cfg = cfg.get("text_config", cfg)
            self.tie_word_embeddings = text_cfg.get("tie_word_embeddings", cfg.get("tie_word_embeddings"))
        elif isinstance(base, SafetensorsCheckpoint):
            self.reader = base
            self.description = str(base.path)
        else:
            raise TypeError(f"base must be a model, a state dict or a checkpoint path, got {type(base).__name__}")

    def entries(self) -> dict[str, _Entry]:
        if self.reader is not None:
            return {k: _Entry(i.dtype, i.shape) for k, i in self.reader.infos.items()}
        return {k: _Entry(v.dtype, tuple(v.shape)) for k, v in self.tensors.items() if torch.is_tensor(v)}

    def get(self, name: str) -> torch.Tensor:
        if self.reader is not None:
            return self.reader.get(name)
        return self.tensors[name]


# ----------------------------------------------------------------------------------------------------------------
# public entry point


def merge_weights(
    tuned: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    base: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    alpha: float = 0.5,
    *,
    output_dir: str | os.PathLike | None = None,
    key_map: Callable[[str], str | None] | None = None,
    on_shape_mismatch: str = "error",
    base_tie_word_embeddings: bool | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    copy_extra_files: bool = True,
    return_manifest: bool = False,
    base_from_hub: bool = False,
    _after_tensor: Callable[[str], None] | None = None,
):
    """Core-Cocktail merge ``M = alpha * tuned + (1 - alpha) * base`` over the tensors the two share.

    Args:
        tuned: the tuned Fun-Audio-Chat model ``M1``: an ``nn.Module`` (merged **in place**), a state dict
            (a new dict is returned) or a safetensors checkpoint directory/file (merged on disk into
            ``output_dir``, shard by shard).
        base: the original LLM ``M0``: a ``Qwen3ForCausalLM`` (or any module), its state dict, a safetensors
            checkpoint path, or a Hub repo id. Read one tensor at a time when on disk.
        alpha: weight of the tuned model; 1 keeps ``tuned``, 0 takes the base LLM (the paper uses 0.5).
        output_dir: where the on-disk merge goes (required for a checkpoint ``tuned``, and optional for a
            model, which is then saved with ``save_pretrained``). Written atomically.
        key_map: maps a base key onto a tuned key (or ``None``); defaults to :func:`default_base_key_map`.
        on_shape_mismatch: ``"error"`` (default) or ``"keep_tuned"`` for tensors whose shapes differ (e.g. a
            resized vocabulary).
        base_tie_word_embeddings: whether the base LLM ties ``lm_head`` to its input embedding (then a base
            without ``lm_head.weight`` merges the tuned head with the base embedding). Read from the base's
            config when ``None``.
        overwrite: replace an existing ``output_dir`` (the old one is removed only after the new one is
            complete).
        show_progress: tqdm progress bar (``TQDM_DISABLE=1`` also silences it).
        chunk_elements: flat chunk size of the streamed arithmetic (bounds the extra memory).
        copy_extra_files: copy config/generation/processor/tokenizer files of a tuned checkpoint directory.
        return_manifest: also return the manifest dict (alpha, sources, merged and kept tensor names).
        base_from_hub: ``base`` is a Hub repo id to download. Off by default: a local path that does not exist is
            an error, never a Hub lookup.

    An ``output_dir`` that is, contains or lies inside the tuned or base checkpoint is refused (``ValueError``)
    before anything is written.

    Returns:
        the merged model (same object), a new state dict, or the ``Path`` of the merged checkpoint; as
        ``(result, manifest)`` when ``return_manifest``.
    """
    alpha = _check_alpha(alpha)
    if chunk_elements < 1:
        raise ValueError("chunk_elements must be positive")
    key_map = key_map or default_base_key_map
    if isinstance(tuned, (str, os.PathLike)):
        tuned = _resolve_checkpoint_path(tuned, "tuned")
    source = _BaseSource(base, from_hub=base_from_hub)
    if output_dir is not None:
        inputs = [("tuned", tuned)] if isinstance(tuned, Path) else []
        if source.reader is not None:
            inputs += [("base", source.reader.path)] + [("base", f) for f in source.reader.files]
        _refuse_output_overlapping_inputs(output_dir, inputs)
    tie = base_tie_word_embeddings if base_tie_word_embeddings is not None else source.tie_word_embeddings

    if isinstance(tuned, nn.Module):
        result, manifest = _merge_module(
            tuned, source, alpha, key_map, on_shape_mismatch, tie, chunk_elements, show_progress, _after_tensor
        )
        if output_dir is not None:
            manifest["output_dir"] = str(output_dir)
            save_merged_model(tuned, output_dir, manifest, overwrite=overwrite)
    elif isinstance(tuned, Mapping):
        if output_dir is not None:
            raise ValueError("output_dir is not supported for state-dict merges; save the returned dict yourself")
        result, manifest = _merge_state_dict(
            tuned, source, alpha, key_map, on_shape_mismatch, tie, chunk_elements, show_progress, _after_tensor
        )
    elif isinstance(tuned, (str, os.PathLike)):
        if output_dir is None:
            raise ValueError("merging a checkpoint on disk needs output_dir")
        result, manifest = _merge_on_disk(
            Path(tuned),
            source,
            alpha,
            Path(output_dir),
            key_map,
            on_shape_mismatch,
            tie,
            chunk_elements,
            show_progress,
            overwrite,
            copy_extra_files,
            _after_tensor,
        )
    else:
        raise TypeError(f"tuned must be a model, a state dict or a checkpoint path, got {type(tuned).__name__}")
    return (result, manifest) if return_manifest else result


def _library_version() -> str | None:
    try:
        from .. import __version__

        return __version__
    except ImportError:  # loaded as a stand-alone module
        try:
            from importlib.metadata import version

            return version("fun-audio-chat")
        except Exception:
            return None


def _manifest(alpha: float, tuned_desc: str, base_desc: str, plan: MergePlan, **extra) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "alpha": alpha,
        "formula": "alpha * tuned + (1 - alpha) * base, computed in float32, cast to the tuned dtype",
        "tuned": tuned_desc,
        "base": base_desc,
        "merged": sorted(plan.pairs),
        "base_names": {k: plan.pairs[k] for k in sorted(plan.pairs)},
        "kept_from_tuned": sorted(plan.kept),
        "base_unused": sorted(plan.base_unused),
        "shape_mismatch_kept": sorted(plan.skipped_shape_mismatch),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "library_version": _library_version(),
        **extra,
    }


def _progress(total: int, desc: str, show: bool, unit: str = "tensor"):
    from tqdm.auto import tqdm

    kwargs: dict[str, Any] = {"total": total, "desc": desc, "unit": unit}
    if unit == "B":
        kwargs.update(unit_scale=True, unit_divisor=1024)
    if not show:
        kwargs["disable"] = True
    return tqdm(**kwargs)


def _chunked_merge_into(dest_flat: torch.Tensor, t1_flat: torch.Tensor, t0_flat: torch.Tensor, alpha, chunk):
    n = dest_flat.numel()
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        dest_flat[s:e].copy_(merge_tensors(t1_flat[s:e], t0_flat[s:e], alpha, dest_flat.dtype))


def _refuse_sharded_parameters(named: Mapping[str, torch.Tensor]) -> None:
    """In-place merging needs full local parameters: refuse FSDP (DTensor) and DeepSpeed ZeRO-3 shards."""
    for name, tensor in named.items():
        if hasattr(tensor, "ds_id") or hasattr(tensor, "device_mesh") or type(tensor).__name__ == "DTensor":
            raise RuntimeError(
                f"parameter {name!r} is sharded (FSDP / DeepSpeed ZeRO-3): an in-place merge would mix shards. "
                "Save the stage-1 model, merge on disk with merge_weights(checkpoint_dir, base, alpha, "
                "output_dir=...), and start stage 2 from the merged checkpoint (see docs/distributed.md)."
            )


@torch.no_grad()
def _merge_module(module, source, alpha, key_map, on_shape_mismatch, tie, chunk, show_progress, after_tensor):
    # state_dict(keep_vars=True) lists tied tensors under each name; merge each underlying tensor once.
    named = module.state_dict(keep_vars=True)
    _refuse_sharded_parameters(named)
    tuned_entries = {k: _Entry(v.dtype, tuple(v.shape)) for k, v in named.items()}
    plan = _plan(tuned_entries, source.entries(), key_map, on_shape_mismatch, tie)
    done: set[int] = set()
    with _progress(len(plan.pairs), "core-cocktail merge", show_progress) as bar:
        for name, bkey in plan.pairs.items():
            tensor = named[name]
            if id(tensor) not in done:
                done.add(id(tensor))
                data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
                base_t = source.get(bkey)
                _chunked_merge_into(data.view(-1), data.view(-1), base_t.reshape(-1), alpha, chunk)
                if after_tensor is not None:
                    after_tensor(name)
            bar.update(1)
    manifest = _manifest(alpha, f"<in-memory {type(module).__name__}>", source.description, plan)
    return module, manifest


@torch.no_grad()
def _merge_state_dict(tuned, source, alpha, key_map, on_shape_mismatch, tie, chunk, show_progress, after_tensor):
    tuned = {k: v for k, v in tuned.items() if torch.is_tensor(v)}
    plan = _plan(
        {k: _Entry(v.dtype, tuple(v.shape)) for k, v in tuned.items()},
        source.entries(),
        key_map,
        on_shape_mismatch,
        tie,
    )
    out: dict[str, torch.Tensor] = {}
    by_storage: dict[tuple, torch.Tensor] = {}

    def storage_key(t: torch.Tensor) -> tuple:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)

    with _progress(len(tuned), "core-cocktail merge", show_progress) as bar:
        for name, t1 in tuned.items():
            key = storage_key(t1)
            if key in by_storage:  # tied with an earlier key: keep them tied
                out[name] = by_storage[key]
            elif name in plan.pairs:
                merged = torch.empty(t1.shape, dtype=t1.dtype, device=t1.device)
                _chunked_merge_into(
                    merged.view(-1), t1.reshape(-1), source.get(plan.pairs[name]).reshape(-1), alpha, chunk
                )
                out[name] = merged
                if after_tensor is not None:
                    after_tensor(name)
            else:
                out[name] = t1  # untouched tensors are shared with the input, never modified
            by_storage[key] = out[name]
            bar.update(1)
    return out, _manifest(alpha, "<in-memory state dict>", source.description, plan)


# ----------------------------------------------------------------------------------------------------------------
# on-disk merge


def _is_aux_file(rel: str) -> bool:
    name = os.path.basename(rel)
    if any(fnmatch.fnmatch(name, pat) for pat in _AUX_FILE_EXCLUDES):
        return False
    return any(fnmatch.fnmatch(name, pat) for pat in _AUX_FILE_PATTERNS)


def _aux_files(directory: Path, subfolders: bool = True) -> list[Path]:
    """Model-description files of a checkpoint dir (top level plus one level of subfolders such as
    ``speech_tokenizer/``), never training state (optimizer, scheduler, rng) or weights. Subfolders holding
    weights of their own (other checkpoints) are skipped."""
    found = []
    for p in sorted(directory.iterdir()):
        if p.is_file() and _is_aux_file(p.name):
            found.append(p.relative_to(directory))
        elif (
            subfolders
            and p.is_dir()
            and not p.name.startswith((".", "checkpoint-", "runs"))
            and not any(q.suffix in (".safetensors",) + _PICKLE_SUFFIXES for q in p.iterdir())
        ):
            for q in sorted(p.iterdir()):
                if q.is_file() and _is_aux_file(q.name):
                    found.append(q.relative_to(directory))
    return found


# Written into each temporary output directory while it is being filled (and removed just before it is renamed
# into place): it identifies the directory as ours and names the writing process, so a later run can delete the
# leftovers of a killed one without ever touching a folder it did not create.
_PARTIAL_MARKER = ".fun_audio_chat_partial.json"


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_partial_dirs(parent: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.partial-*`` / ``.<name>.old-*`` folders in ``parent`` left by killed merges or saves.

    Only folders carrying our marker whose writer is a process of this machine that no longer runs are removed; a
    folder without the marker, or of a live process (a merge running now), or written from another machine is left
    alone. Returns the removed folders."""
    import socket

    removed = []
    try:
        candidates = [
            p for p in Path(parent).iterdir() if p.name.startswith(".") and (".partial-" in p.name or ".old-" in p.name)
        ]
    except OSError:
        return removed
    for folder in candidates:
        marker = folder / _PARTIAL_MARKER
        try:
            if folder.is_symlink() or not folder.is_dir() or not marker.is_file():
                continue
            info = json.loads(marker.read_text())
            pid, host = int(info["pid"]), str(info["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if host != socket.gethostname() or _process_is_alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        logger.info("removed %s, left by an interrupted merge (process %d)", folder, pid)
    return removed


def _write_partial_marker(folder: Path) -> None:
    import socket

    payload = {"pid": os.getpid(), "host": socket.gethostname(), "created": time.time(), "target": folder.name}
    (folder / _PARTIAL_MARKER).write_text(json.dumps(payload) + "\n")


class _AtomicDir:
    """Write into a hidden temporary sibling of ``target``; rename it into place on success, delete it on any
    failure (including KeyboardInterrupt). A killed process leaves at most a marked ``.<name>.partial-*`` sibling
    (deleted by the next run in the same folder, see :func:`remove_stale_partial_dirs`) and never a half-written
    ``target``."""

    def __init__(self, target: Path, overwrite: bool):
        self.target = Path(target)
        self.overwrite = overwrite
        if self.target.exists() and not self.overwrite:
            if self.target.is_dir() and not any(self.target.iterdir()):
                pass  # an empty directory is fine to replace
            else:
                raise FileExistsError(f"{self.target} already exists; pass overwrite=True to replace it")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partial_dirs(self.target.parent)
        self.tmp = self.target.parent / f".{self.target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.tmp.mkdir()
        _write_partial_marker(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            (self.tmp / _PARTIAL_MARKER).unlink()
            _fsync_dir(self.tmp)
            if self.target.exists():
                if self.target.is_dir() and not any(self.target.iterdir()):
                    self.target.rmdir()
                    os.rename(self.tmp, self.target)
                else:
                    trash = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
                    os.rename(self.target, trash)
                    _write_partial_marker(trash)  # if killed before the rmtree, a later run removes it
                    os.rename(self.tmp, self.target)
                    shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(self.tmp, self.target)
            _fsync_dir(self.target.parent)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)



def _read_exactly(f, view: memoryview, info) -> None:
    """Fill ``view`` from ``f`` (``readinto`` may return short reads); a short file is a truncated tensor."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise OSError(f"{info.file}: unexpected end of file while reading tensor {info.name!r} (truncated checkpoint).")
        got += n

class _StreamBuffers:
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

    def read(self, f, info: _TensorInfo, first: int, count: int, slot: int) -> torch.Tensor:
        nbytes = count * info.itemsize
        if nbytes == 0:
            return torch.empty(0, dtype=info.dtype)
        buf = self._raw_buffer(slot, nbytes)
        view = memoryview(buf)[:nbytes]
        f.seek(info.start + first * info.itemsize)
        _read_exactly(f, view, info)
        return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(info.dtype)

    def copy_bytes(self, f, info: _TensorInfo):
        step = self.chunk * 4
        buf = self._raw_buffer(2, step)
        f.seek(info.start)
        left = info.nbytes
        while left:
            want = min(step, left)
            view = memoryview(buf)[:want]
            _read_exactly(f, view, info)
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
            size = _itemsize(out_dtype)
            if self._out is None or self._out.numel() < self.chunk * size:
                self._out = torch.empty(self.chunk * max(size, 4), dtype=torch.uint8)
            result = self._out[: n * size].view(out_dtype)
            result.copy_(w1)
        return memoryview(result.view(torch.uint8).numpy())


def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False) -> _AtomicDir:
    """Context manager yielding a temporary directory that becomes ``target`` only if the block succeeds."""
    return _AtomicDir(Path(target), overwrite)


def _merge_on_disk(
    tuned_path,
    source,
    alpha,
    output_dir,
    key_map,
    on_shape_mismatch,
    tie,
    chunk,
    show_progress,
    overwrite,
    copy_extra_files,
    after_tensor,
):
    reader = SafetensorsCheckpoint(tuned_path)
    _refuse_output_overlapping_inputs(output_dir, [("tuned", tuned_path)] + [("tuned", f) for f in reader.files])
    tuned_entries = {k: _Entry(i.dtype, i.shape) for k, i in reader.infos.items()}
    plan = _plan(tuned_entries, source.entries(), key_map, on_shape_mismatch, tie)
    base_reader = source.reader
    base_handles: dict[Path, Any] = {}
    buffers = _StreamBuffers(chunk)

    def base_chunk(bkey: str, first: int, count: int) -> torch.Tensor:
        if base_reader is None:
            return source.get(bkey).detach().reshape(-1)[first : first + count].cpu()
        info = base_reader.infos[bkey]
        f = base_handles.get(info.file)
        if f is None:
            f = base_handles[info.file] = open(info.file, "rb")
        return buffers.read(f, info, first, count, slot=0)

    with atomic_output_dir(output_dir, overwrite) as tmp:
        try:
            bar = _progress(reader.total_bytes, "core-cocktail merge", show_progress, unit="B")
            with bar:
                for file in reader.files:
                    order = reader.file_order[file]
                    specs = [(n, reader.infos[n].dtype, reader.infos[n].shape) for n in order]
                    writer = _ShardWriter(tmp / file.name, specs, reader.file_metadata[file])
                    try:
                        with open(file, "rb") as fin:
                            for name in order:
                                info = reader.infos[name]
                                bkey = plan.pairs.get(name)
                                if bkey is None:  # kept: raw byte copy through a fixed buffer
                                    for view in buffers.copy_bytes(fin, info):
                                        writer.write(name, view)
                                        bar.update(len(view))
                                else:
                                    for s in range(0, info.numel, chunk):
                                        n = min(chunk, info.numel - s)
                                        t1 = buffers.read(fin, info, s, n, slot=1)
                                        t0 = base_chunk(bkey, s, n)
                                        writer.write(name, buffers.merge(t1, t0, alpha, info.dtype))
                                        bar.update(n * info.itemsize)
                                writer.end_tensor(name)
                                if after_tensor is not None:
                                    after_tensor(name)
                        writer.close()
                    except BaseException:
                        writer.abort()
                        raise
        finally:
            for f in base_handles.values():
                f.close()
        if reader.index is not None:
            (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(reader.index, indent=2, sort_keys=True) + "\n")
        copied = []
        if copy_extra_files and reader.dir is not None:
            for rel in _aux_files(reader.dir, subfolders=tuned_path.is_dir()):
                if rel.name in {f.name for f in reader.files}:
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(reader.dir / rel, tmp / rel)
                copied.append(str(rel))
        manifest = _manifest(
            alpha, str(tuned_path), source.description, plan, copied_files=copied, shards=[f.name for f in reader.files]
        )
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["output_dir"] = str(output_dir)
    return output_dir, manifest


def save_merged_model(
    model: nn.Module,
    output_dir: str | os.PathLike,
    manifest: Mapping[str, Any] | None = None,
    *,
    processing_class: Any = None,
    overwrite: bool = False,
    **save_kwargs,
) -> Path:
    """``model.save_pretrained`` (plus the processor and the manifest) into ``output_dir``, atomically.

    With a manifest whose ``base`` / ``tuned`` name checkpoints on disk, an ``output_dir`` that is, contains or lies
    inside one of them is refused (the merged model must never replace its own inputs)."""
    output_dir = Path(output_dir)
    if manifest is not None:
        on_disk = [
            (role, Path(manifest[role]))
            for role in ("tuned", "base")
            if isinstance(manifest.get(role), str)
            and not manifest[role].startswith("<")  # "<in-memory ...>"
            and Path(manifest[role]).exists()
        ]
        _refuse_output_overlapping_inputs(output_dir, on_disk)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        if processing_class is not None and hasattr(processing_class, "save_pretrained"):
            processing_class.save_pretrained(tmp)
        if manifest is not None:
            (tmp / MANIFEST_NAME).write_text(json.dumps(dict(manifest), indent=2) + "\n")
    return output_dir


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The merge manifest of a merged checkpoint directory, or ``None`` if it has none."""
    p = Path(path) / MANIFEST_NAME
    return json.loads(p.read_text()) if p.is_file() else None


def load_safetensors_state_dict(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read (some of) a safetensors checkpoint into memory with plain file I/O."""
    reader = SafetensorsCheckpoint(path)
    return {k: reader.get(k) for k in (reader.keys() if keys is None else keys)}


__all__ = [
    "MANIFEST_NAME",
    "MergePlan",
    "PickleCheckpointError",
    "SafetensorsCheckpoint",
    "atomic_output_dir",
    "default_base_key_map",
    "load_safetensors_state_dict",
    "merge_tensors",
    "merge_weights",
    "read_manifest",
    "remove_stale_partial_dirs",
    "save_merged_model",
]
