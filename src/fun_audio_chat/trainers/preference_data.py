"""Preference data for Fun-Audio-Chat DPO: the row format, example building and the preference collator.

One preference row (a ``datasets`` row or a plain dict; see ``docs/dpo.md`` for the full description)::

    {
        "prompt": [                                   # the conversation before the answer
            {"role": "system", "content": "You are asked to generate both text and speech tokens at the same time."},
            {"role": "user", "content": [
                {"type": "audio", "audio": "question.wav"},        # path / URL / bytes / array (+ "sampling_rate")
                {"type": "text", "text": "Please answer kindly."},  # optional text next to (or instead of) the audio
            ]},
        ],
        "chosen": [{"role": "assistant", "content": [
            {"type": "text", "text": "I'm sorry to hear that ..."},
            {"type": "audio", "speech_codes": [812, 77, ...]},     # S3 codes, or {"type": "audio", "audio": wav}
        ]}],
        "rejected": [{"role": "assistant", "content": [...]}],
        "task": "empathy",                            # robustness | instruction_following | audio_understanding | ...
    }

Each side is turned into a training example exactly as supervised fine-tuning builds one
(:func:`fun_audio_chat.processing.build_training_example`: prompt labelled ``IGNORE_INDEX`` (-100), a spoken reply as
``<|audio_bos|> <|AUDIO|> x n <|audio_eos|> <|im_end|>\\n`` with the transcript at 5 Hz and ``10 x speech-BOS + codes``
as its speech row). :class:`FunAudioChatPreferenceCollator` pads the chosen examples and then the rejected ones into
**one** batch of ``2B`` rows (chosen first), the layout ``FunAudioChatDPOTrainer`` scores in a single forward.

:func:`prepare_preference_dataset` builds the examples ahead of time (``Dataset.map``; needed when the replies are
audio clips to be tokenized with the S3 tokenizer, and faster for several epochs); the collator also accepts raw rows
and builds them on the fly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..configuration_fun_audio_chat import AUDIO_INPUT_NAMES, IGNORE_INDEX, TRANSCRIPT_INPUT_NAMES
from ..processing import FunAudioChatDataCollator, build_training_example
from ..processing.prompts import SPEECH_DELAY_TOKENS

#: Model inputs a side's example does not carry: the prompt's features are shared by both sides (stored once, as
#: ``input_features``), and the collator makes the attention masks of the padded features and speech rows.
_NOT_PER_SIDE = ("input_features", "feature_attention_mask", "speech_attention_mask")
#: Keys of one side's example (as :func:`build_training_example` returns them): the ids, the labels and the model's
#: audio and transcript inputs, except those above.
EXAMPLE_KEYS = ("input_ids", "labels") + tuple(
    name for name in AUDIO_INPUT_NAMES + TRANSCRIPT_INPUT_NAMES if name not in _NOT_PER_SIDE
)
#: Columns of a raw preference row the collator reads.
RAW_COLUMNS = ("prompt", "chosen", "rejected", "system", "task", "tools", "chat_template_kwargs")
#: Columns of a built (prepared) preference row.
BUILT_COLUMNS = tuple(f"{side}_{key}" for side in ("chosen", "rejected") for key in EXAMPLE_KEYS) + (
    "input_features",
    "task",
)
#: Precomputed reference log-probabilities: ``[text, speech]`` per row (or one number = the combined log-prob).
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


# ------------------------------------------------------------------------------------------------------ row format
def _reply_message(value: Any, side: str) -> dict:
    """The assistant message of a ``chosen``/``rejected`` field (several accepted spellings, see docs/dpo.md)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(
                f"'{side}' must hold exactly one assistant message (the answer to the prompt), got {len(value)} "
                "messages; put earlier turns in 'prompt'."
            )
        value = value[0]
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if not isinstance(value, Mapping):
        raise TypeError(f"'{side}' must be a message dict, a one-message list or a string, got {type(value).__name__}.")
    if "role" in value or "content" in value:
        if value.get("role", "assistant") != "assistant":
            raise ValueError(f"'{side}' must be an assistant message, got role {value.get('role')!r}.")
        return {"role": "assistant", "content": value.get("content")}
    # shorthand {"text": ..., "speech_codes": [...]} or {"text": ..., "audio": ..., "sampling_rate": ...}
    content: list[dict] = []
    if value.get("text"):
        content.append({"type": "text", "text": value["text"]})
    if value.get("speech_codes") is not None:
        content.append({"type": "audio", "speech_codes": value["speech_codes"]})
    elif value.get("audio") is not None:
        content.append({"type": "audio", "audio": value["audio"], "sampling_rate": value.get("sampling_rate")})
    if not content:
        raise ValueError(f"'{side}' has no text and no speech (expected 'text', 'speech_codes' or 'audio').")
    return {"role": "assistant", "content": content}


def _prompt_messages(row: Mapping) -> list[dict]:
    prompt = row.get("prompt")
    if prompt is None:
        raise ValueError(
            "A preference row needs a 'prompt' (the conversation before the answer), 'chosen' and 'rejected'; "
            f"got keys {sorted(row)}."
        )
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if not messages or messages[-1].get("role") not in ("user", "tool"):
        raise ValueError("The prompt must end with a user (or tool) message.")
    system = row.get("system")
    if system and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _is_spoken(message: dict) -> bool:
    content = message.get("content")
    return isinstance(content, (list, tuple)) and any(
        isinstance(item, Mapping) and item.get("type") == "audio" for item in content
    )


def build_preference_example(
    processor,
    row: Mapping,
    *,
    speech_tokenizer: Any = None,
    speech_delay_tokens: int = SPEECH_DELAY_TOKENS,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Build both sides of one preference row (see the module docstring) into a flat, ``datasets``-friendly dict.

    Returns ``chosen_<key>`` / ``rejected_<key>`` for every key of :data:`EXAMPLE_KEYS`, the prompt's user-audio
    features once (``input_features``, shared by both sides) and ``task`` (``None`` when the row has none).
    Raises when a side is longer than ``max_length`` (nothing is truncated).

    Both sides get the same prompt: when the prompt has no system message, the speech-and-text system prompt is used
    if either answer is spoken (the text-only one otherwise).
    """
    messages = _prompt_messages(row)
    chosen = _reply_message(row.get("chosen"), "chosen")
    rejected = _reply_message(row.get("rejected"), "rejected")
    template_kwargs = dict(row.get("chat_template_kwargs") or {})
    template_kwargs.setdefault("speech_output", _is_spoken(chosen) or _is_spoken(rejected))
    tools = row.get("tools")
    if isinstance(tools, str):
        import json

        tools = json.loads(tools)
    out: dict[str, Any] = {}
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        example = build_training_example(
            processor,
            messages + [reply],
            tools=tools,
            speech_tokenizer=speech_tokenizer,
            speech_delay_tokens=speech_delay_tokens,
            max_length=max_length,
            **template_kwargs,
        )
        for key in EXAMPLE_KEYS:
            out[f"{side}_{key}"] = example[key]
        if side == "chosen":
            out["input_features"] = [np.asarray(f, dtype=np.float32) for f in example["input_features"]]
    prompt_len = sum(1 for label in out["chosen_labels"] if label == IGNORE_INDEX)
    if out["chosen_input_ids"][:prompt_len] != out["rejected_input_ids"][:prompt_len]:  # pragma: no cover - guard
        raise ValueError("chosen and rejected were built with different prompts.")
    out["task"] = row.get("task")
    return out


def prepare_preference_dataset(
    dataset,
    processor,
    *,
    speech_tokenizer: Any = None,
    speech_delay_tokens: int = SPEECH_DELAY_TOKENS,
    max_length: int | None = None,
    num_proc: int | None = None,
    keep_columns: Sequence[str] = ("ref_chosen_logps", "ref_rejected_logps"),
):
    """Build every row of a raw preference ``datasets.Dataset`` ahead of time (see :func:`build_preference_example`).

    Rows whose chosen or rejected side is longer than ``max_length`` are dropped (and counted in a warning).
    The raw columns are removed (``keep_columns`` are kept). Pass ``speech_tokenizer`` (an
    :class:`~fun_audio_chat.processing.S3SpeechTokenizer`) when answers are audio clips rather than codes.
    """
    import logging

    def build(row):
        try:
            return {
                **build_preference_example(
                    processor,
                    row,
                    speech_tokenizer=speech_tokenizer,
                    speech_delay_tokens=speech_delay_tokens,
                    max_length=max_length,
                ),
                "_too_long": False,
            }
        except ValueError as err:
            if max_length is None or "max_length" not in str(err):
                raise
            empty = {f"{side}_{key}": [] for side in ("chosen", "rejected") for key in EXAMPLE_KEYS}
            return {**empty, "input_features": [], "task": row.get("task"), "_too_long": True}

    drop = [c for c in dataset.column_names if c not in keep_columns]
    kwargs = {"num_proc": num_proc} if num_proc else {}
    built = dataset.map(build, remove_columns=drop, **kwargs)
    too_long = sum(built["_too_long"])
    if too_long:
        logging.getLogger(__name__).warning(
            "dropped %d of %d preference pairs longer than max_length=%s", too_long, len(built), max_length
        )
        built = built.filter(lambda flag: not flag, input_columns="_too_long", **kwargs)
    return built.remove_columns("_too_long")


# -------------------------------------------------------------------------------------------------------- collator
def _ref_pair(value) -> list[float]:
    """A precomputed reference log-prob as ``[text, speech]`` (one number = the combined log-prob, as text)."""
    if torch.is_tensor(value):
        value = value.tolist()
    if isinstance(value, (list, tuple, np.ndarray)):
        values = [float(v) for v in value]
        if len(values) == 1:
            return [values[0], 0.0]
        if len(values) != 2:
            raise ValueError(f"a reference log-prob must be [text, speech] or one number, got {values}")
        return values
    return [float(value), 0.0]


@dataclass
class FunAudioChatPreferenceCollator:
    """Collate preference rows into one batch of ``2B`` model rows: the ``B`` chosen examples, then the ``B`` rejected.

    Accepts raw rows (``prompt``/``chosen``/``rejected``, built on the fly) and prepared rows (from
    :func:`prepare_preference_dataset`). Output: the model inputs of :class:`FunAudioChatDataCollator` (right padded;
    audio rows in sample order: all chosen samples' audio rows, then the rejected ones'), plus

    * ``task_ids`` (B,) long: index of each row's task in ``task_names`` (-1 for rows without a task); only when
      ``task_names`` is set (the trainer sets it);
    * ``ref_chosen_logps`` / ``ref_rejected_logps`` (B, 2) float ``[text, speech]``, when the rows carry them.

    Args:
        processor: the :class:`~fun_audio_chat.processing.FunAudioChatProcessor`.
        task_names: the task vocabulary (order defines ``task_ids``).
        speech_tokenizer: tokenizes answers given as audio clips (raw rows only).
        speech_delay_tokens: speech-BOS codes in front of each spoken answer (10 in the official data).
        max_length: raise when a side is longer (raw rows; nothing is truncated).
        pad_to_multiple_of: pad the text length to a multiple of this.
    """

    processor: Any
    task_names: Sequence[str] | None = None
    speech_tokenizer: Any = None
    speech_delay_tokens: int = SPEECH_DELAY_TOKENS
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        self._collator = FunAudioChatDataCollator(
            self.processor, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of
        )

    def _built(self, row: Mapping) -> Mapping:
        if "chosen_input_ids" in row:
            return row
        return build_preference_example(
            self.processor,
            row,
            speech_tokenizer=self.speech_tokenizer,
            speech_delay_tokens=self.speech_delay_tokens,
            max_length=self.max_length,
        )

    def task_index(self, task: str | None) -> int:
        if task is None:
            return -1
        names = list(self.task_names or ())
        if task not in names:
            raise ValueError(
                f"task {task!r} is not in the trainer's task list {names}; list every task of the data in "
                "FunAudioChatDPOConfig.tasks (or task_weights) when the datasets cannot be scanned."
            )
        return names.index(task)

    def __call__(self, rows: list[Mapping]) -> dict[str, torch.Tensor]:
        built = [self._built(row) for row in rows]
        sides = []
        for side in ("chosen", "rejected"):
            for row in built:
                example = {key: row[f"{side}_{key}"] for key in EXAMPLE_KEYS}
                features = row.get("input_features")
                example["input_features"] = [] if features is None else list(features)
                sides.append(example)
        batch = self._collator(sides)
        if self.task_names is not None:
            batch["task_ids"] = torch.tensor([self.task_index(r.get("task")) for r in built], dtype=torch.long)
        for key in REF_COLUMNS:
            values = [row.get(key) for row in rows]
            if all(v is not None for v in values):
                batch[key] = torch.tensor([_ref_pair(v) for v in values], dtype=torch.float32)
            elif any(v is not None for v in values):
                raise ValueError(f"some rows of the batch have {key!r} and others do not.")
        return batch


__all__ = [
    "BUILT_COLUMNS",
    "EXAMPLE_KEYS",
    "RAW_COLUMNS",
    "REF_COLUMNS",
    "FunAudioChatPreferenceCollator",
    "build_preference_example",
    "prepare_preference_dataset",
]
