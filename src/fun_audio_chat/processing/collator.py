"""The batch collator of training examples.

:class:`FunAudioChatDataCollator` pads examples (the dicts of :func:`fun_audio_chat.processing.build_training_example`)
into a batch: right padding, pad ``<|endoftext|>``, mask 0, labels -100; speech ids padded with the speech pad id to
the longest row; transcripts padded with the text pad id; features zero-padded to the longest clip. It also accepts
raw ``{"messages": [...]}`` rows and builds the examples on the fly (use ``remove_unused_columns=False`` with
``Trainer`` then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..configuration_fun_audio_chat import IGNORE_INDEX
from ._values import to_list
from .training_examples import build_training_example


def _round_up(length: int, multiple: int | None) -> int:
    if not multiple:
        return length
    return multiple * math.ceil(length / multiple)


@dataclass
class FunAudioChatDataCollator:
    """Pad training examples (from :func:`build_training_example`) into a batch of model inputs.

    Args:
        processor: the processor (pad ids come from it; also needed for ``{"messages": ...}`` rows).
        speech_tokenizer: used for on-the-fly rows whose replies are audio clips.
        padding_side: ``"right"`` (training default) or ``"left"``.
        pad_to_multiple_of: round the text length up to a multiple of this.
        speech_pad_to_multiple_of: round the speech-id width up (``None`` = longest row, as the official plugin).
        return_tensors: ``"pt"`` (torch) or ``"np"``.
        text_pad_token_id / speech_pad_token_id: override the processor's pad ids.
    """

    processor: Any = None
    speech_tokenizer: Any = None
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    speech_pad_to_multiple_of: int | None = None
    label_pad_token_id: int = IGNORE_INDEX
    return_tensors: str = "pt"
    text_pad_token_id: int | None = None
    speech_pad_token_id: int | None = None
    tools: list | None = None

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.processor is None and (self.text_pad_token_id is None or self.speech_pad_token_id is None):
            raise ValueError("FunAudioChatDataCollator needs a processor (or both text and speech pad ids).")
        if self.text_pad_token_id is None:
            self.text_pad_token_id = self.processor.text_pad_token_id
        if self.speech_pad_token_id is None:
            self.speech_pad_token_id = self.processor.speech_pad_token_id

    def _example(self, feature: dict) -> dict:
        if "input_ids" in feature:
            return feature
        if "messages" in feature:
            if self.processor is None:
                raise ValueError("Rows with 'messages' need FunAudioChatDataCollator(processor=...).")
            return build_training_example(
                self.processor,
                feature["messages"],
                tools=feature.get("tools", self.tools),
                speech_tokenizer=self.speech_tokenizer,
            )
        raise ValueError(
            f"A training row needs 'input_ids' (a built example) or 'messages'; got keys {sorted(feature)}."
        )

    def _pad_1d(self, rows: list[list[int]], width: int, value: int, side: str) -> np.ndarray:
        out = np.full((len(rows), width), value, dtype=np.int64)
        for i, row in enumerate(rows):
            if not row:
                continue
            if side == "right":
                out[i, : len(row)] = row
            else:
                out[i, width - len(row) :] = row
        return out

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        if len(features) == 0:
            raise ValueError(
                "FunAudioChatDataCollator got an empty batch (0 examples); check that the dataset is not empty "
                "after filtering and that the batch size is at least 1."
            )
        examples = [self._example(f) for f in features]
        batch: dict[str, Any] = {}

        ids = [to_list(e["input_ids"]) for e in examples]
        labels = [to_list(e.get("labels", e["input_ids"])) for e in examples]
        width = _round_up(max(len(r) for r in ids), self.pad_to_multiple_of)
        batch["input_ids"] = self._pad_1d(ids, width, self.text_pad_token_id, self.padding_side)
        batch["attention_mask"] = self._pad_1d([[1] * len(r) for r in ids], width, 0, self.padding_side)
        batch["labels"] = self._pad_1d(labels, width, self.label_pad_token_id, self.padding_side)

        speech, text, text_mask, feature_exist, feats = [], [], [], [], []
        for e in examples:
            rows = [to_list(r) for r in to_list(e.get("speech_ids"))]
            n = len(rows)
            speech.extend(rows)
            text_rows = [to_list(r) for r in to_list(e.get("text_ids"))] or [[] for _ in range(n)]
            text.extend(text_rows)
            text_mask.extend(bool(x) for x in (to_list(e.get("text_attention_mask")) or [bool(r) for r in text_rows]))
            exist = [bool(x) for x in (to_list(e.get("feature_exist_mask")) or [False] * n)]
            feature_exist.extend(exist)
            example_feats = e.get("input_features")
            example_feats = [] if example_feats is None else list(example_feats)
            if len(example_feats) != sum(exist):
                raise ValueError(
                    f"an example has {sum(exist)} audio rows with features but {len(example_feats)} feature arrays."
                )
            feats.extend(np.asarray(f, dtype=np.float32) for f in example_feats)
            if not (len(text_rows) == n and len(exist) == n):
                raise ValueError("speech_ids, text_ids and feature_exist_mask must have one entry per audio row.")

        if speech:
            speech_width = _round_up(max(len(r) for r in speech), self.speech_pad_to_multiple_of)
            batch["speech_ids"] = self._pad_1d(speech, speech_width, self.speech_pad_token_id, "right")
            batch["speech_attention_mask"] = self._pad_1d([[1] * len(r) for r in speech], speech_width, 0, "right")
            batch["feature_exist_mask"] = np.asarray(feature_exist, dtype=bool)
            if any(text_mask):
                text_width = max(len(r) for r in text)
                batch["text_ids"] = self._pad_1d(text, text_width, self.text_pad_token_id, "right")
                batch["text_attention_mask"] = np.asarray(text_mask, dtype=bool)
            if feats:
                frames = [f.shape[-1] for f in feats]
                num_mel = feats[0].shape[0]
                input_features = np.zeros((len(feats), num_mel, max(frames)), dtype=np.float32)
                feature_attention_mask = np.zeros((len(feats), max(frames)), dtype=np.int64)
                for i, f in enumerate(feats):
                    input_features[i, :, : f.shape[-1]] = f
                    feature_attention_mask[i, : f.shape[-1]] = 1
                batch["input_features"] = input_features
                batch["feature_attention_mask"] = feature_attention_mask

        if self.return_tensors == "pt":
            import torch

            return {k: torch.from_numpy(v) for k, v in batch.items()}
        if self.return_tensors in ("np", None):
            return batch
        raise ValueError(f"return_tensors must be 'pt' or 'np', got {self.return_tensors!r}")


__all__ = ["FunAudioChatDataCollator"]
