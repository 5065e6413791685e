"""From generated ids to text, speech codes and waveforms.

* :func:`clean_text_ids` — drop padding and the control tokens around a reply (the official demo strips a leading
  ``<|audio_bos|>``/``<|sil|>`` run and a trailing ``<|audio_eos|>``/``<|sil|>``/``<|im_end|>`` run).
* :func:`speech_ids_to_codes` — generated speech ids to per-row lists of real codes (stop at speech EOS, drop
  BOS/pad and anything outside ``[0, num_codes)``).
* :class:`SpeechDetokenizer` — the protocol of a codes → waveform vocoder; ``fun_audio_chat.CosyVoice3Detokenizer``
  (:mod:`fun_audio_chat.token2wav`) is the native CosyVoice 3 flow-matching + HiFT model (24 kHz). Processing does
  not import it: the vocoder is a model, and processing never depends on models.
* :func:`save_audio` — write a waveform with soundfile.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..speech_codes import SpeechCodeLayout, real_speech_codes
from ._values import to_list

COSYVOICE3_SAMPLING_RATE = 24000


def clean_text_ids(
    ids: Iterable[int],
    leading: Iterable[int] = (),
    trailing: Iterable[int] = (),
    padding: Iterable[int] = (),
) -> list[int]:
    """Remove ``padding`` ids anywhere, then a run of ``leading`` ids at the start and of ``trailing`` ids at the end."""
    pad, lead, trail = set(padding), set(leading), set(trailing)
    out = [int(i) for i in ids if int(i) not in pad]
    start, end = 0, len(out)
    while start < end and out[start] in lead:
        start += 1
    while end > start and out[end - 1] in trail:
        end -= 1
    return out[start:end]


def speech_ids_to_codes(
    speech_ids: Any,
    num_codes: int,
    eos_token_id: int | None = None,
    attention_mask: Any = None,
    lengths: Sequence[int] | None = None,
) -> list[list[int]]:
    """Generated speech ids (B, S) or (S,) → one list of codes per row.

    Positions past ``lengths[b]`` or where ``attention_mask`` is 0 are ignored; each row stops at its first
    ``eos_token_id``; ids outside ``[0, num_codes)`` (speech BOS delay codes, pad) are dropped.
    """
    rows = to_list(speech_ids)
    if len(rows) == 0:
        return []
    if not isinstance(rows[0], (list, tuple)):
        rows = [rows]
        attention_mask = None if attention_mask is None else [to_list(attention_mask)]
    elif attention_mask is not None:
        attention_mask = to_list(attention_mask)
    lengths = None if lengths is None else to_list(lengths)
    layout = SpeechCodeLayout(num_codes=int(num_codes), eos_token_id=eos_token_id)
    result = []
    for b, row in enumerate(rows):
        row = [int(x) for x in row]
        if lengths is not None:
            row = row[: int(lengths[b])]
        if attention_mask is not None:
            row = [x for x, keep in zip(row, attention_mask[b]) if keep]
        codes, _ = real_speech_codes(row, layout)
        result.append(codes)
    return result


@runtime_checkable
class SpeechDetokenizer(Protocol):
    """Turns 25 Hz speech codes into a waveform.

    Implementations have a ``sampling_rate`` attribute and are callable on one list of codes, returning a 1-D float32
    waveform (numpy array or torch tensor) at that rate.
    """

    sampling_rate: int

    def __call__(self, codes: Sequence[int]) -> np.ndarray: ...


def save_audio(
    path: str | os.PathLike, waveform: Any, sampling_rate: int = COSYVOICE3_SAMPLING_RATE, format: str | None = None
) -> str:
    """Write a mono (or (channels, time)) waveform to ``path`` with soundfile (wav/flac/ogg by extension)."""
    import soundfile as sf

    if hasattr(waveform, "detach"):
        waveform = waveform.detach().float().cpu().numpy()
    data = np.asarray(waveform, dtype=np.float32)
    if data.ndim == 2 and data.shape[0] < data.shape[1]:
        data = data.T  # soundfile wants (time, channels)
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    sf.write(path, data, int(sampling_rate), format=format)
    return path


__all__ = [
    "COSYVOICE3_SAMPLING_RATE",
    "SpeechDetokenizer",
    "clean_text_ids",
    "save_audio",
    "speech_ids_to_codes",
]
