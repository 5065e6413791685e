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


# Written into each temporary output directory while it is being filled: it identifies the directory as ours and
# names the writing process, so a later run can delete the leftovers of a killed one without ever touching a folder
# it did not create.
_PARTIAL_MARKER = ".fun_audio_chat_partial.json"
# The publish journal, written beside the output (``.<name>.publish.json``) once the new directory is complete and
# removed when publishing is over. It names the three folders involved, so whatever instant the writer dies at, the
# next run finishes the same steps (:func:`recover_output_dir`) and no folder is left that nothing names.
_JOURNAL_SUFFIX = ".publish.json"


def _publish_step(step: str) -> None:
    """Called between the steps of publishing an output directory. Does nothing; the tests replace it to kill the
    writing process at each step (``monkeypatch.setattr(output_module, "_publish_step", ...)``)."""


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _writer_is_gone(info: Mapping[str, Any]) -> bool:
    """Whether the process that wrote a marker or journal ran on this machine and no longer runs."""
    try:
        pid, host = int(info["pid"]), str(info["host"])
    except (KeyError, TypeError, ValueError):
        return False
    return host == socket.gethostname() and not _process_is_alive(pid)


def _writer_is_alive(marker: Path) -> bool:
    """Whether the marker file names a process that may still be writing (alive, another machine or unreadable)."""
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return True
    return not (isinstance(info, dict) and _writer_is_gone(info))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _writer_info(folder_name: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "created": time.time(), "target": folder_name}


def _write_partial_marker(folder: Path) -> None:
    (folder / _PARTIAL_MARKER).write_text(json.dumps(_writer_info(folder.name)) + "\n")


def _journal_path(target: Path) -> Path:
    return target.parent / f".{target.name}{_JOURNAL_SUFFIX}"


def _write_journal(target: Path, new: Path, old: Path) -> Path:
    """Write (and sync) the publish journal of ``target``: from here on a restart finishes publishing ``new``."""
    journal = _journal_path(target)
    payload = {**_writer_info(target.name), "new": new.name, "old": old.name}
    with open(journal, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(target.parent)
    return journal


def _finish_publish(target: Path, new: Path, old: Path, journal: Path) -> None:
    """Put ``new`` at ``target`` (the previous ``target`` goes to ``old``, then is deleted), then drop the journal.

    Idempotent: each step checks what the previous ones left, so the writer and a later recovery run the same code,
    and a kill at any point between two steps leaves a state this function finishes. Before the journal exists the
    old ``target`` is untouched; once it exists ``new`` is complete and only the renames below remain."""
    if new.is_dir():
        (new / _PARTIAL_MARKER).unlink(missing_ok=True)
        _fsync_dir(new)
        _publish_step("unmarked")
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        elif target.exists() or target.is_symlink():
            os.rename(target, old)
            _publish_step("old moved aside")
        os.rename(new, target)
        _fsync_dir(target.parent)
        _publish_step("published")
    elif not target.exists() and old.is_dir():  # never left by the steps above; put the old output back
        os.rename(old, target)
        _fsync_dir(target.parent)
    if old.exists() or old.is_symlink():
        _remove(old)
        _publish_step("old deleted")
    journal.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def _read_journal(journal: Path) -> dict | None:
    try:
        info = json.loads(journal.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not all(isinstance(info.get(k), str) for k in ("target", "new", "old")):
        return None
    return info


def recover_output_dir(target: str | os.PathLike) -> bool:
    """Finish publishing ``target`` if a merge or save that was replacing it died part way; ``True`` if it did.

    Afterwards ``target`` holds the new output when the writer had finished writing it, and the previous output
    otherwise. Every merge and save into ``target``'s folder calls this first; call it yourself (or run any merge
    into the same folder) to repair a folder before reading it. A journal of a process that still runs, or that was
    written on another machine, is left alone (``False``)."""
    target = Path(target)
    journal = _journal_path(target)
    if not journal.is_file():
        return False
    info = _read_journal(journal)
    if info is None:
        # Cut short while being written (the renames start only after it is synced): nothing was moved yet and the
        # new directory still carries its marker. Dropped unless a writer of this output is still running (it may
        # be writing this very journal now).
        if not any(
            _writer_is_alive(marker) for marker in target.parent.glob(f".{target.name}.partial-*/{_PARTIAL_MARKER}")
        ):
            journal.unlink(missing_ok=True)
        return False
    if not _writer_is_gone(info) or info["target"] != target.name:
        return False
    parent = target.parent
    names = (info["new"], info["old"])
    if any("/" in name or name in ("", ".", "..") or not name.startswith(f".{target.name}.") for name in names):
        logger.warning("ignoring %s: it names folders that are not its output's temporary siblings", journal)
        return False
    _finish_publish(target, parent / info["new"], parent / info["old"], journal)
    logger.info("finished publishing %s, interrupted in process %s", target, info["pid"])
    return True


def remove_stale_partial_dirs(parent: str | os.PathLike) -> list[Path]:
    """Repair the folder ``parent`` after killed merges or saves: finish their interrupted publishes
    (:func:`recover_output_dir`), then delete the ``.<name>.partial-*`` / ``.<name>.old-*`` folders they left.

    Only folders carrying our marker whose writer is a process of this machine that no longer runs are removed; a
    folder without the marker, or of a live process (a merge running now), or written from another machine is left
    alone, and so is every folder that a remaining publish journal names. Returns the removed folders."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    claimed: set[str] = set()
    for journal in entries:
        if journal.name.startswith(".") and journal.name.endswith(_JOURNAL_SUFFIX) and journal.is_file():
            target_name = journal.name[1 : -len(_JOURNAL_SUFFIX)]
            if not recover_output_dir(Path(parent) / target_name) and journal.exists():
                info = _read_journal(journal) or {}
                claimed.update(str(info.get(key)) for key in ("new", "old"))
    candidates = [
        p
        for p in entries
        if p.name.startswith(".") and (".partial-" in p.name or ".old-" in p.name) and p.name not in claimed
    ]
    for folder in candidates:
        marker = folder / _PARTIAL_MARKER
        try:
            if folder.is_symlink() or not folder.is_dir() or not marker.is_file():
                continue
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or not _writer_is_gone(info):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        logger.info("removed %s, left by an interrupted merge (process %s)", folder, info.get("pid"))
    return removed


class _AtomicDir:
    """Write into a hidden temporary sibling of ``target``; publish it at ``target`` on success, delete it on any
    failure (including KeyboardInterrupt).

    Publishing (docs/reliability.md#merges): the complete temporary directory is named in a journal beside the
    output, then the old ``target`` (if any) is renamed to ``.<name>.old-*``, the new one to ``target``, the old one
    deleted and the journal removed (:func:`_finish_publish`). A process killed at any instant leaves either the old
    or the new output at ``target`` once the next run in that folder (or :func:`recover_output_dir`) has finished
    the journal's steps; every temporary folder carries a marker or is named by the journal, and is deleted."""

    def __init__(self, target: Path, overwrite: bool):
        self.target = Path(target)
        self.overwrite = overwrite
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partial_dirs(self.target.parent)
        if self.target.exists() and not self.overwrite:
            if self.target.is_dir() and not any(self.target.iterdir()):
                pass  # an empty directory is fine to replace
            else:
                raise FileExistsError(f"{self.target} already exists; pass overwrite=True to replace it")
        suffix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = self.target.parent / f".{self.target.name}.partial-{suffix}"
        self.old = self.target.parent / f".{self.target.name}.old-{suffix}"

    def __enter__(self) -> Path:
        self.tmp.mkdir()
        _write_partial_marker(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            _fsync_tree(self.tmp)
            journal = _write_journal(self.target, self.tmp, self.old)
        except BaseException:
            _journal_path(self.target).unlink(missing_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        try:
            _publish_step("journal written")
            _finish_publish(self.target, self.tmp, self.old, journal)
        except BaseException:
            self._roll_back(journal)
            raise
        return False

    def _roll_back(self, journal: Path) -> None:
        """After an error while publishing (this process still runs): the old output back at ``target`` if it was
        moved aside, the new one deleted, no journal."""
        try:
            if not self.target.exists() and self.old.exists():
                os.rename(self.old, self.target)
            elif self.old.exists():  # the new output is in place; only deleting the old one failed
                shutil.rmtree(self.old, ignore_errors=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            journal.unlink(missing_ok=True)
        except OSError:  # pragma: no cover - the journal stays for the next run's recovery
            logger.exception("could not roll back the publishing of %s", self.target)


def _fsync_tree(folder: Path) -> None:
    """Sync every file and directory of ``folder`` to disk, so the journal never names a directory whose contents a
    power cut could still lose."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(folder)


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
