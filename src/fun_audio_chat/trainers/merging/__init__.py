"""Core-Cocktail weight merging: ``M = alpha * M1 + (1 - alpha) * M0``.

``M1`` is the tuned Fun-Audio-Chat model, ``M0`` the original text LLM it started from; base keys map onto the
``language_model.*`` prefix of our model and every tuned tensor without a base counterpart (audio encoders, the
Speech Refined Head) is kept from ``M1`` unchanged. One formula (:func:`merge_tensors`), three ways in
(:func:`merge_weights`: a model in place, a state dict, or safetensors checkpoints on disk).

On disk, tensors are merged in flat chunks of ``chunk_elements``, read with plain file I/O (no mmap) into a few
buffers allocated once, and each output shard is written incrementally (its header is known in advance). The
extra memory is at most six buffers of ``chunk_elements * 4`` bytes (about 384 MiB at the default 16 Mi
elements, a few MiB with small chunks), whatever the shard or model size, so an 8B merge fits a small machine.
The output keeps the tuned checkpoint's layout, key set, shard names and dtypes (a tied key the tuned checkpoint
omits stays omitted, so it is re-tied on load), copies its config / generation config / processor files, is
written into a temporary sibling directory and renamed into place only when complete, and carries
``merge_manifest.json``. Pickle checkpoints (``*.bin`` / ``*.pt``) are refused.

Modules, by job: :mod:`.safetensors_io` (the one reader and the shard writer), :mod:`.plan` (key mapping and
which tensors merge), :mod:`.arithmetic`, :mod:`.sources` (checkpoint paths, Hub download, the base),
:mod:`.output` (atomic directories, manifest) and :mod:`.merge` (the front ends). Only torch is needed.
"""

from __future__ import annotations

from .arithmetic import merge_tensors
from .merge import DEFAULT_CHUNK_ELEMENTS, MergeResult, merge_weights
from .output import (
    MANIFEST_NAME,
    atomic_output_dir,
    read_manifest,
    recover_output_dir,
    remove_stale_partial_dirs,
    save_merged_model,
)
from .plan import MergePlan, default_base_key_map
from .safetensors_io import PickleCheckpointError, SafetensorsCheckpoint

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "MANIFEST_NAME",
    "MergePlan",
    "MergeResult",
    "PickleCheckpointError",
    "SafetensorsCheckpoint",
    "atomic_output_dir",
    "default_base_key_map",
    "merge_tensors",
    "merge_weights",
    "read_manifest",
    "recover_output_dir",
    "remove_stale_partial_dirs",
    "save_merged_model",
]
