"""Training examples in the official SFT layout and the batch collator.

:func:`build_training_example` turns one conversation whose **last** message is the assistant reply into model
inputs, as the official training data pipeline builds them (docs/official-format.md#delay-tokens and #training-forward):

* prompt = the chat template of the earlier messages + ``<|im_start|>assistant\\n`` (labels -100);
* a spoken reply (assistant content with an audio item: precomputed ``"speech_codes"`` or an audio clip tokenized by
  an :class:`~fun_audio_chat.processing.speech_tokenizer.S3SpeechTokenizer`) becomes
  ``<|audio_bos|> <|AUDIO|> x ceil(len(speech_ids)/5) <|audio_eos|> <|im_end|> \\n`` with
  ``speech_ids = 10 x speech-BOS + codes`` and the transcript (the text items) in ``text_ids``;
* a text reply becomes its rendered text + ``<|im_end|>\\n`` (tool calls included);
* labels equal ``input_ids`` on the reply;
* one audio row per user audio (speech pad ids x ``int(duration*25)``, continuous features, ``feature_exist_mask``
  True, no transcript) then the reply's row (codes, no features, ``text_attention_mask`` True).

Without a system message the system prompt is the speech-and-text prompt for spoken replies and the speech-to-text
prompt for text replies.

:class:`FunAudioChatDataCollator` pads such examples into a batch (right padding, pad ``<|endoftext|>``, mask 0,
labels -100; speech ids padded with the speech pad id to the longest row; transcripts padded with the text pad id;
features zero-padded to the longest clip). It also accepts raw ``{"messages": [...]}`` rows and builds the examples
on the fly (use ``remove_unused_columns=False`` with ``Trainer`` then).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..configuration_fun_audio_chat import IGNORE_INDEX
from ._values import to_list
from .prompts import SPEECH_DELAY_TOKENS

_CODE_KEYS = ("speech_codes", "codes")
_AUDIO_KEYS = ("audio", "path", "url")


def _split_reply(message: dict) -> tuple[str, list[int] | None, Any]:
    """(transcript text, precomputed codes or None, audio source or None) of an assistant message."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or "", None, None
    texts, codes, audio = [], None, None
    for item in content:
        kind = item.get("type")
        if kind == "text":
            texts.append(item.get("text") or "")
        elif kind == "audio":
            if codes is not None or audio is not None:
                raise ValueError("An assistant reply may contain at most one audio item.")
            code_key = next((k for k in _CODE_KEYS if item.get(k) is not None), None)
            if code_key is not None:
                codes = [int(c) for c in np.asarray(item[code_key]).reshape(-1).tolist()]
            else:
                audio_key = next((k for k in _AUDIO_KEYS if item.get(k) is not None), None)
                if audio_key is None:
                    raise ValueError(
                        'An assistant audio item needs "speech_codes" (precomputed S3 codes) or an audio '
                        '("audio"/"path"/"url") to tokenize.'
                    )
                audio = (item[audio_key], item.get("sampling_rate"))
    return "\n".join(t for t in texts if t), codes, audio


def build_training_example(
    processor,
    messages: list[dict],
    *,
    tools: list | None = None,
    speech_tokenizer: Any = None,
    speech_delay_tokens: int = SPEECH_DELAY_TOKENS,
    max_length: int | None = None,
    **template_kwargs,
) -> dict[str, Any]:
    """One training example from a conversation ending with the assistant reply (see the module docstring).

    Args:
        processor: a :class:`FunAudioChatProcessor`.
        messages: chat messages; the last one has role ``assistant``.
        tools: tool schemas / functions for the system prompt (as ``apply_chat_template``).
        speech_tokenizer: callable ``audios -> list of code lists`` (e.g. ``S3SpeechTokenizer``) for replies given
            as audio instead of ``speech_codes``.
        speech_delay_tokens: speech-BOS codes in front of the reply's codes (10 in the official data).
        max_length: raise if the example is longer (nothing is ever truncated silently).

    Returns a dict of plain lists/arrays (``datasets.Dataset.map``-friendly): ``input_ids``, ``attention_mask``,
    ``labels``, per audio row ``speech_ids``, ``text_ids``, ``text_attention_mask``, ``feature_exist_mask``, and
    ``input_features`` (one (128, T) array per row with features).
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("build_training_example needs a conversation whose last message is the assistant reply.")
    prompt_messages, reply = list(messages[:-1]), messages[-1]
    transcript, codes, reply_audio = _split_reply(reply)
    if reply_audio is not None:
        if speech_tokenizer is None:
            raise ValueError(
                "The assistant reply is an audio clip: pass speech_tokenizer=S3SpeechTokenizer... to turn it into "
                'speech codes, or give precomputed codes as {"type": "audio", "speech_codes": [...]}.'
            )
        source, rate = reply_audio
        codes = list(speech_tokenizer([processor.load_audio(source, sampling_rate=rate, name="assistant audio")])[0])
    spoken = codes is not None
    tokenizer = processor.tokenizer
    template_kwargs.setdefault("speech_output", spoken)

    prompt_text = processor.apply_chat_template(
        prompt_messages, tools=tools, add_generation_prompt=True, tokenize=False, **template_kwargs
    )
    waveforms = processor.audios_in_conversation(prompt_messages)
    expanded = processor._check_and_expand([prompt_text], waveforms)
    expanded, _ = processor.get_text_with_replacements(
        expanded, audio_replacements=[processor.audio_token * processor.num_audio_tokens(len(w)) for w in waveforms]
    )
    prompt_ids = tokenizer(expanded[0], add_special_tokens=False)["input_ids"]

    newline_ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    rows_speech, rows_text, rows_text_mask, rows_feature = [], [], [], []
    for waveform in waveforms:
        rows_speech.append([processor.speech_pad_token_id] * processor.num_speech_frames(len(waveform)))
        rows_text.append([])
        rows_text_mask.append(False)
        rows_feature.append(True)

    if spoken:
        num_codes = processor.num_speech_codes
        bad = [c for c in codes if not 0 <= c < num_codes]
        if bad:
            raise ValueError(f"speech codes must be in [0, {num_codes}); got {bad[:5]}...")
        speech_row = [processor.speech_bos_token_id] * speech_delay_tokens + list(codes)
        groups = math.ceil(len(speech_row) / processor.audio_group_size)
        reply_ids = (
            [processor.audio_bos_token_id]
            + [processor.audio_token_id] * groups
            + [processor.audio_eos_token_id, processor.im_end_token_id]
            + newline_ids
        )
        text_ids = tokenizer(transcript, add_special_tokens=False)["input_ids"] if transcript else []
        if len(text_ids) > groups:
            warnings.warn(
                f"The transcript has {len(text_ids)} tokens but the reply has only {groups} speech groups; the model "
                "sees one transcript token per group, so the last tokens will not be trained.",
                stacklevel=2,
            )
        rows_speech.append(speech_row)
        rows_text.append(text_ids)
        rows_text_mask.append(bool(text_ids))
        rows_feature.append(False)
    else:
        full_text = processor.apply_chat_template(messages, tools=tools, tokenize=False, **template_kwargs)
        if not full_text.startswith(prompt_text):
            raise ValueError("The chat template does not render the prompt as a prefix of the full conversation.")
        reply_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]

    input_ids = list(prompt_ids) + list(reply_ids)
    if max_length is not None and len(input_ids) > max_length:
        raise ValueError(
            f"training example has {len(input_ids)} tokens, more than max_length={max_length}; shorten the "
            "conversation or audio (examples are never truncated)."
        )
    example: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + list(reply_ids),
        "speech_ids": rows_speech,
        "text_ids": rows_text,
        "text_attention_mask": rows_text_mask,
        "feature_exist_mask": rows_feature,
    }
    if waveforms:
        features = processor.extract_features(waveforms)
        valid = features["feature_attention_mask"].sum(-1)
        example["input_features"] = [features["input_features"][i, :, : valid[i]] for i in range(len(waveforms))]
    else:
        example["input_features"] = []
    return example


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


__all__ = ["IGNORE_INDEX", "FunAudioChatDataCollator", "build_training_example"]
