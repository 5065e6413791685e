"""Where a merge is written: atomic output directories, the files copied beside the weights, the manifest.

An output directory is filled as a hidden temporary sibling and renamed into place only when complete; a
directory that is, contains or lies inside an input checkpoint is refused before anything is written.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .plan import MergePlan
from .safetensors_io import PICKLE_SUFFIXES, SAFE_WEIGHTS_INDEX_NAME

logger = logging.getLogger(__name__)

MANIFEST_NAME = "merge_manifest.json"
MANIFEST_FORMAT = "fun_audio_chat.core_cocktail_merge"

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


def refuse_output_overlapping_inputs(output_dir: str | os.PathLike, inputs: list[tuple[str, Path]]) -> None:
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


def _is_aux_file(rel: str) -> bool:
    name = os.path.basename(rel)
    if any(fnmatch.fnmatch(name, pat) for pat in _AUX_FILE_EXCLUDES):
        return False
    return any(fnmatch.fnmatch(name, pat) for pat in _AUX_FILE_PATTERNS)


def aux_files(directory: Path, subfolders: bool = True) -> list[Path]:
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
            and not any(q.suffix in (".safetensors",) + PICKLE_SUFFIXES for q in p.iterdir())
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


def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False) -> _AtomicDir:
    """Context manager yielding a temporary directory that becomes ``target`` only if the block succeeds."""
    return _AtomicDir(Path(target), overwrite)


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
        refuse_output_overlapping_inputs(output_dir, on_disk)
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


def _library_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fun-audio-chat")
    except PackageNotFoundError:
        return None


def build_manifest(alpha: float, tuned_desc: str, base_desc: str, plan: MergePlan, **extra) -> dict:
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
