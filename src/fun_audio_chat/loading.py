"""Loading a model and its processor from ``tiny``, a checkpoint directory or a Hub repo id, with clear errors.

A directory is checked before anything heavy is imported (config present and of our model type, safetensors
weights, processor files), so a wrong path is reported in one line instead of a transformers traceback. Import
this module freely: torch and transformers are imported only when a model is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class ModelLoadError(ValueError):
    """A model source that cannot be loaded: ``source`` is what was asked for, ``reason`` says what is wrong."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def _summary(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _check_model_directory(source: str, path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(source, "expected a model directory (or a Hub repo id), got a file.")
    if not (path / "config.json").is_file():
        raise ModelLoadError(source, f"not a model directory (no config.json in {path}).")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except ValueError as err:
        raise ModelLoadError(source, f"config.json is not valid JSON ({err}).") from err
    if model_type != "funaudiochat":
        raise ModelLoadError(
            source,
            f"config.json describes a {model_type!r} model, not a Fun-Audio-Chat checkpoint (model_type "
            "'funaudiochat').",
        )
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        raise ModelLoadError(source, f"no weights (*.safetensors) in {path}.")
    if not (path / "processor_config.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ModelLoadError(
            source,
            f"no processor files in {path} (processor_config.json, tokenizer files); save the processor next to "
            "the model with processor.save_pretrained(DIR).",
        )


def load_model_and_processor(source: str, device: str = "cpu", dtype=None):
    """``(model, processor)`` from ``"tiny"`` (the built-in random model), a checkpoint directory or a Hub repo id.

    The model is moved to ``device`` (and ``dtype`` when given) and put in eval mode. Raises
    :class:`ModelLoadError` for a source that is missing, not a Fun-Audio-Chat checkpoint, incomplete, corrupt,
    or not downloadable (with ``HF_HUB_OFFLINE`` set only the local cache is used)."""
    if source == "tiny":
        from .tiny import tiny_model_and_processor

        model, processor = tiny_model_and_processor()
        return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device), processor

    path = Path(source).expanduser()
    if path.exists():
        _check_model_directory(source, path)
        location, where = str(path), "directory"
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelLoadError(source, "model directory not found (and it is not a Hub repo id like 'org/name').")
    else:
        location, where = source, "Hub repo"

    from . import FunAudioChatForConditionalGeneration, FunAudioChatProcessor

    try:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = FunAudioChatForConditionalGeneration.from_pretrained(location, **kwargs).to(device).eval()
        processor = FunAudioChatProcessor.from_pretrained(location)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
        hint = " (HF_HUB_OFFLINE is set: only the local cache is used)" if offline and where == "Hub repo" else ""
        raise ModelLoadError(source, f"could not load the {where}{hint}: {_summary(err)}") from err
    except Exception as err:  # corrupt or inconsistent files: safetensors and torch raise their own
        raise ModelLoadError(
            source, f"the {where} is corrupt or inconsistent ({type(err).__name__}: {_summary(err)})"
        ) from err
    return model, processor


__all__ = ["ModelLoadError", "load_model_and_processor"]
