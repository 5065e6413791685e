"""Training examples in the official SFT layout: a conversation whose **last** message is the assistant reply, turned
into model inputs and labels as the official training data pipeline builds them
(docs/official-format.md#delay-tokens and #training-forward):

* prompt = the chat template of the earlier messages + ``<|im_start|>assistant\\n`` (labels -100), encoded by the
  processor's own step (:meth:`FunAudioChatProcessor.encode_prompts`, the one ``processor(...)`` runs), which also
  gives one audio row per user audio (speech pad ids x ``int(duration*25)``, continuous features,
  ``feature_exist_mask`` True, no transcript);
* a spoken reply (assistant content with an audio item: precomputed ``"speech_codes"`` or an audio clip tokenized by
  an :class:`~fun_audio_chat.processing.speech_tokenizer.S3SpeechTokenizer`) becomes
  ``<|audio_bos|> <|AUDIO|> x ceil(len(speech_ids)/5) <|audio_eos|> <|im_end|> \\n`` and adds the reply's audio row:
  ``speech_ids = 10 x speech-BOS + codes``, the transcript (the text items) in ``text_ids``, no features;
* a text reply becomes its rendered text + ``<|im_end|>\\n`` (tool calls included);
* labels equal ``input_ids`` on the reply.

Without a system message the system prompt is the speech-and-text prompt for spoken replies and the speech-to-text
prompt for text replies. Batches of these examples are :class:`~fun_audio_chat.processing.FunAudioChatDataCollator`'s
job.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ..configuration_fun_audio_chat import IGNORE_INDEX
from .prompts import SPEECH_DELAY_TOKENS

_CODE_KEYS = ("speech_codes", "codes")
_AUDIO_KEYS = ("audio", "path", "url")
# The per-audio-row keys of an example, in the order an example lists them.
_AUDIO_ROW_KEYS = ("speech_ids", "text_ids", "text_attention_mask", "feature_exist_mask")


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
        template_kwargs: passed to ``apply_chat_template`` (``speech_output`` defaults to whether the reply is spoken).

    Returns a dict of plain lists/arrays (``datasets.Dataset.map``-friendly): ``input_ids``, ``attention_mask``,
    ``labels``, per audio row ``speech_ids``, ``text_ids``, ``text_attention_mask``, ``feature_exist_mask``, and
    ``input_features`` (one (128, T) array per row with features).
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("build_training_example needs a conversation whose last message is the assistant reply.")
    prompt_messages = list(messages[:-1])
    transcript, codes = _reply_transcript_and_codes(processor, messages[-1], speech_tokenizer)
    template_kwargs.setdefault("speech_output", codes is not None)
    prompt_text = processor.apply_chat_template(
        prompt_messages, tools=tools, add_generation_prompt=True, tokenize=False, **template_kwargs
    )
    prompt_ids, rows = _encode_prompt(processor, prompt_text, processor.audios_in_conversation(prompt_messages))
    if codes is not None:
        reply_ids, reply_row = _spoken_reply(processor, codes, transcript, speech_delay_tokens)
        for key in _AUDIO_ROW_KEYS:
            rows[key].append(reply_row[key])
    else:
        reply_ids = _text_reply_ids(processor, messages, prompt_text, tools, template_kwargs)
    return _labelled_example(prompt_ids, reply_ids, rows, max_length)


def _split_reply(message: dict) -> tuple[str, list[int] | None, Any]:
    """(transcript text, precomputed codes or None, (audio source, sampling rate) or None) of an assistant message."""
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


def _reply_transcript_and_codes(processor, reply: dict, speech_tokenizer: Any) -> tuple[str, list[int] | None]:
    """The reply's transcript and its speech codes (``None`` for a text reply): given, or tokenized from its audio
    clip with ``speech_tokenizer``."""
    transcript, codes, reply_audio = _split_reply(reply)
    if reply_audio is not None:
        if speech_tokenizer is None:
            raise ValueError(
                "The assistant reply is an audio clip: pass speech_tokenizer=S3SpeechTokenizer... to turn it into "
                'speech codes, or give precomputed codes as {"type": "audio", "speech_codes": [...]}.'
            )
        source, rate = reply_audio
        codes = list(speech_tokenizer([processor.load_audio(source, sampling_rate=rate, name="assistant audio")])[0])
    return transcript, codes


def _encode_prompt(processor, prompt_text: str, waveforms: list[np.ndarray]) -> tuple[list[int], dict[str, list]]:
    """The prompt's ids and its audio rows (one per user clip), unpadded: the processor's encode step gives them as
    a padded batch of one prompt."""
    encoded = processor.encode_prompts([prompt_text], waveforms, add_special_tokens=False)
    prompt_ids = list(encoded["input_ids"][0])
    if not waveforms:
        return prompt_ids, {key: [] for key in (*_AUDIO_ROW_KEYS, "input_features")}
    speech_lengths = encoded["speech_attention_mask"].sum(-1)
    feature_lengths = encoded["feature_attention_mask"].sum(-1)
    rows = {
        "speech_ids": [row[:length].tolist() for row, length in zip(encoded["speech_ids"], speech_lengths)],
        "text_ids": [[] for _ in waveforms],  # user audio has no transcript
        "text_attention_mask": [False] * len(waveforms),
        "feature_exist_mask": encoded["feature_exist_mask"].tolist(),
        "input_features": [row[:, :length] for row, length in zip(encoded["input_features"], feature_lengths)],
    }
    return prompt_ids, rows


def _spoken_reply(processor, codes: list[int], transcript: str, speech_delay_tokens: int) -> tuple[list[int], dict]:
    """The reply's ids ``<|audio_bos|> <|AUDIO|> x groups <|audio_eos|> <|im_end|> \\n`` and its audio row (speech-BOS
    delay + codes, the transcript's ids, no features)."""
    num_codes = processor.num_speech_codes
    bad = [c for c in codes if not 0 <= c < num_codes]
    if bad:
        raise ValueError(f"speech codes must be in [0, {num_codes}); got {bad[:5]}...")
    tokenizer = processor.tokenizer
    speech_row = [processor.speech_bos_token_id] * speech_delay_tokens + list(codes)
    groups = math.ceil(len(speech_row) / processor.audio_group_size)
    reply_ids = (
        [processor.audio_bos_token_id]
        + [processor.audio_token_id] * groups
        + [processor.audio_eos_token_id, processor.im_end_token_id]
        + tokenizer("\n", add_special_tokens=False)["input_ids"]
    )
    text_ids = tokenizer(transcript, add_special_tokens=False)["input_ids"] if transcript else []
    if len(text_ids) > groups:
        warnings.warn(
            f"The transcript has {len(text_ids)} tokens but the reply has only {groups} speech groups; the model "
            "sees one transcript token per group, so the last tokens will not be trained.",
            stacklevel=3,  # the caller of build_training_example
        )
    row = {
        "speech_ids": speech_row,
        "text_ids": text_ids,
        "text_attention_mask": bool(text_ids),
        "feature_exist_mask": False,
    }
    return reply_ids, row


def _text_reply_ids(processor, messages: list[dict], prompt_text: str, tools, template_kwargs: dict) -> list[int]:
    """The ids of a text reply: the whole conversation rendered, minus the prompt (so tool calls and the closing
    ``<|im_end|>\\n`` are the template's)."""
    full_text = processor.apply_chat_template(messages, tools=tools, tokenize=False, **template_kwargs)
    if not full_text.startswith(prompt_text):
        raise ValueError("The chat template does not render the prompt as a prefix of the full conversation.")
    return processor.tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]


def _labelled_example(
    prompt_ids: list[int], reply_ids: list[int], rows: dict[str, list], max_length: int | None
) -> dict[str, Any]:
    """The example: prompt + reply ids, labels on the reply only, and the audio rows."""
    input_ids = list(prompt_ids) + list(reply_ids)
    if max_length is not None and len(input_ids) > max_length:
        raise ValueError(
            f"training example has {len(input_ids)} tokens, more than max_length={max_length}; shorten the "
            "conversation or audio (examples are never truncated)."
        )
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + list(reply_ids),
        **{key: rows[key] for key in _AUDIO_ROW_KEYS},
        "input_features": rows["input_features"],
    }


__all__ = ["build_training_example"]
