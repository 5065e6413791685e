"""The merge plan: which tuned tensor merges with which base tensor, and which are kept from the tuned model.

``M1`` is the tuned Fun-Audio-Chat model, ``M0`` the original text LLM it started from (a Qwen3 causal-LM
checkpoint whose keys are ``model.*`` / ``lm_head.*``). Base keys are mapped onto the ``language_model.*``
prefix of our model; every tuned tensor without a base counterpart (the continuous audio encoder, the
discrete speech encoder, the Speech Refined Head) is kept from ``M1`` unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


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


@dataclass
class TensorEntry:
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


def plan_merge(
    tuned: Mapping[str, TensorEntry],
    base: Mapping[str, TensorEntry],
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
