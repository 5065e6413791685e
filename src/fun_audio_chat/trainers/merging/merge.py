"""The three ways into a Core-Cocktail merge, one formula (:func:`merge_weights`).

* **in memory, on a model** -- parameters are merged in place (this is what :class:`CoreCocktailCallback`
  does at the end of stage 1); tied parameters are single tensors, so they stay tied;
* **in memory, on state dicts** -- a new dict is returned, inputs are never modified; keys that shared
  storage in the tuned dict share it in the result;
* **on disk** -- safetensors checkpoints are merged tensor by tensor in flat chunks, each output shard written
  incrementally (see the package docstring for the memory bound and the output layout).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .arithmetic import StreamBuffers, check_alpha, chunked_merge_into
from .output import (
    MANIFEST_NAME,
    atomic_output_dir,
    aux_files,
    build_manifest,
    refuse_output_overlapping_inputs,
    save_merged_model,
)
from .plan import TensorEntry, default_base_key_map, plan_merge
from .safetensors_io import SAFE_WEIGHTS_INDEX_NAME, SafetensorsCheckpoint, ShardWriter
from .sources import BaseSource, resolve_checkpoint_path

DEFAULT_CHUNK_ELEMENTS = 16 * 1024 * 1024  # 64 MiB per fp32 temporary


class MergeResult(NamedTuple):
    """What :func:`merge_weights` returns: the merged model (the same object, merged in place), a new state dict,
    or the ``Path`` of the merged checkpoint -- whichever kind ``tuned`` was -- and the merge manifest (alpha,
    sources, merged and kept tensor names). Unpacks as ``merged, manifest = merge_weights(...)``."""

    merged: Any
    manifest: dict


def _tensor_merged(name: str) -> None:
    """Called after each tensor is merged or written. Does nothing; tests replace it to interrupt a merge part way
    (``monkeypatch.setattr(merge_module, "_tensor_merged", ...)``)."""


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
    base_from_hub: bool = False,
    manifest_extra: Mapping[str, Any] | None = None,
) -> MergeResult:
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
        base_from_hub: ``base`` is a Hub repo id to download. Off by default: a local path that does not exist is
            an error, never a Hub lookup.
        manifest_extra: more entries for the manifest (e.g. the training step the tuned weights come from).

    An ``output_dir`` that is, contains or lies inside the tuned or base checkpoint is refused (``ValueError``)
    before anything is written.

    Returns:
        a :class:`MergeResult` ``(merged, manifest)``: ``merged`` is the merged model (same object), a new state
        dict, or the ``Path`` of the merged checkpoint.
    """
    alpha = check_alpha(alpha)
    if chunk_elements < 1:
        raise ValueError("chunk_elements must be positive")
    key_map = key_map or default_base_key_map
    if isinstance(tuned, (str, os.PathLike)):
        tuned = resolve_checkpoint_path(tuned, "tuned")
    source = BaseSource(base, from_hub=base_from_hub)
    if output_dir is not None:
        inputs = [("tuned", tuned)] if isinstance(tuned, Path) else []
        if source.reader is not None:
            inputs += [("base", source.reader.path)] + [("base", f) for f in source.reader.files]
        refuse_output_overlapping_inputs(output_dir, inputs)
    tie = base_tie_word_embeddings if base_tie_word_embeddings is not None else source.tie_word_embeddings

    if isinstance(tuned, nn.Module):
        result, manifest = _merge_module(
            tuned, source, alpha, key_map, on_shape_mismatch, tie, chunk_elements, show_progress
        )
        manifest.update(manifest_extra or {})
        if output_dir is not None:
            manifest["output_dir"] = str(output_dir)
            save_merged_model(tuned, output_dir, manifest, overwrite=overwrite)
    elif isinstance(tuned, Mapping):
        if output_dir is not None:
            raise ValueError("output_dir is not supported for state-dict merges; save the returned dict yourself")
        result, manifest = _merge_state_dict(
            tuned, source, alpha, key_map, on_shape_mismatch, tie, chunk_elements, show_progress
        )
        manifest.update(manifest_extra or {})
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
            dict(manifest_extra or {}),
        )
    else:
        raise TypeError(f"tuned must be a model, a state dict or a checkpoint path, got {type(tuned).__name__}")
    return MergeResult(result, manifest)


def _progress(total: int, desc: str, show: bool, unit: str = "tensor"):
    from tqdm.auto import tqdm

    kwargs: dict[str, Any] = {"total": total, "desc": desc, "unit": unit}
    if unit == "B":
        kwargs.update(unit_scale=True, unit_divisor=1024)
    if not show:
        kwargs["disable"] = True
    return tqdm(**kwargs)


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
def _merge_module(module, source, alpha, key_map, on_shape_mismatch, tie, chunk, show_progress):
    # state_dict(keep_vars=True) lists tied tensors under each name; merge each underlying tensor once.
    named = module.state_dict(keep_vars=True)
    _refuse_sharded_parameters(named)
    tuned_entries = {k: TensorEntry(v.dtype, tuple(v.shape)) for k, v in named.items()}
    plan = plan_merge(tuned_entries, source.entries(), key_map, on_shape_mismatch, tie)
    done: set[int] = set()
    with _progress(len(plan.pairs), "core-cocktail merge", show_progress) as bar:
        for name, bkey in plan.pairs.items():
            tensor = named[name]
            if id(tensor) not in done:
                done.add(id(tensor))
                data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
                base_t = source.get(bkey)
                chunked_merge_into(data.view(-1), data.view(-1), base_t.reshape(-1), alpha, chunk)
                _tensor_merged(name)
            bar.update(1)
    manifest = build_manifest(alpha, f"<in-memory {type(module).__name__}>", source.description, plan)
    return module, manifest


@torch.no_grad()
def _merge_state_dict(tuned, source, alpha, key_map, on_shape_mismatch, tie, chunk, show_progress):
    tuned = {k: v for k, v in tuned.items() if torch.is_tensor(v)}
    plan = plan_merge(
        {k: TensorEntry(v.dtype, tuple(v.shape)) for k, v in tuned.items()},
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
                chunked_merge_into(
                    merged.view(-1), t1.reshape(-1), source.get(plan.pairs[name]).reshape(-1), alpha, chunk
                )
                out[name] = merged
                _tensor_merged(name)
            else:
                out[name] = t1  # untouched tensors are shared with the input, never modified
            by_storage[key] = out[name]
            bar.update(1)
    return out, build_manifest(alpha, "<in-memory state dict>", source.description, plan)


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
    manifest_extra,
):
    reader = SafetensorsCheckpoint(tuned_path)
    refuse_output_overlapping_inputs(output_dir, [("tuned", tuned_path)] + [("tuned", f) for f in reader.files])
    tuned_entries = {k: TensorEntry(i.dtype, i.shape) for k, i in reader.infos.items()}
    plan = plan_merge(tuned_entries, source.entries(), key_map, on_shape_mismatch, tie)
    base_reader = source.reader
    base_handles: dict[Path, Any] = {}
    buffers = StreamBuffers(chunk)

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
                    writer = ShardWriter(tmp / file.name, specs, reader.file_metadata[file])
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
                                _tensor_merged(name)
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
            for rel in aux_files(reader.dir, subfolders=tuned_path.is_dir()):
                if rel.name in {f.name for f in reader.files}:
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(reader.dir / rel, tmp / rel)
                copied.append(str(rel))
        manifest = build_manifest(
            alpha,
            str(tuned_path),
            source.description,
            plan,
            copied_files=copied,
            shards=[f.name for f in reader.files],
            **manifest_extra,
        )
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["output_dir"] = str(output_dir)
    return output_dir, manifest
