"""Where merge inputs come from: a local checkpoint path (or, only when asked, a Hub snapshot), and uniform read
access to the base whether it is a model, a state dict or a checkpoint on disk."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .plan import TensorEntry
from .safetensors_io import SafetensorsCheckpoint


def _looks_like_repo_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))


def resolve_checkpoint_path(source: str | os.PathLike, role: str = "checkpoint", from_hub: bool = False) -> Path:
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


class BaseSource:
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
            self.reader = SafetensorsCheckpoint(resolve_checkpoint_path(base, "base", from_hub=from_hub))
            self.description = str(self.reader.path)
            cfg = self.reader.config
            text_cfg = cfg.get("text_config", cfg)
            self.tie_word_embeddings = text_cfg.get("tie_word_embeddings", cfg.get("tie_word_embeddings"))
        elif isinstance(base, SafetensorsCheckpoint):
            self.reader = base
            self.description = str(base.path)
        else:
            raise TypeError(f"base must be a model, a state dict or a checkpoint path, got {type(base).__name__}")

    def entries(self) -> dict[str, TensorEntry]:
        if self.reader is not None:
            return {k: TensorEntry(i.dtype, i.shape) for k, i in self.reader.infos.items()}
        return {k: TensorEntry(v.dtype, tuple(v.shape)) for k, v in self.tensors.items() if torch.is_tensor(v)}

    def get(self, name: str) -> torch.Tensor:
        if self.reader is not None:
            return self.reader.get(name)
        return self.tensors[name]
